"""Reference methods ("labellers"): energies and forces of single structures.

A ``Labeller`` turns a geometry and a total charge into a reference energy (eV) and forces
(eV/Å) with an electronic-structure program. Two are built in:

- ``XTBLabeller``: GFN2-xTB with tblite (seconds for thousands of structures);
- ``PySCFLabeller``: Kohn–Sham DFT with PySCF, B3LYP/def2-SVPD by default (seconds per structure).

Both programs are optional dependencies (``pip install 'lmlp[reference]'``) and imported lazily.
"""

from __future__ import annotations

import abc
import functools
import importlib.util
import inspect
import sys
import time
from importlib.metadata import version
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers
from ase.units import Bohr, Hartree
from threadpoolctl import threadpool_limits

from lmlp.errors import LabelError, LmlpError

XTB_SCF = {"accuracy": 0.1, "mixer_memory": 20, "max_iterations": 1000}
"""tblite SCF settings (same Hamiltonian and electronic temperature as tblite's defaults).

Accuracy 0.1 (default 1.0) tightens the SCF so that forces equal −dE/dx to ~1e-5 eV/Å instead
of ~1e-3 eV/Å, at about the same cost."""

XTB_DAMPING = (0.05, 0.02)
"""Broyden mixer damping of the first SCF attempt and of the retry (tblite's default: 0.4).

Halide anions 4–8 Å from CH3X are nearly degenerate in GFN2-xTB (partial charge transfer) and
their SCF oscillates. Of 841 perturbed geometries along the 16 SN2 paths (fresh guesses), 79
failed with tblite's defaults, 6 with damping 0.05, none after the retry with 0.02. Converged
energies agree to 1e-9 eV whatever the damping."""

_PROGRESS_SECONDS = 30.0
"""Least time between two progress lines of ``label_structures``."""


class LabelFailure(LmlpError):
    """A reference calculation did not converge for one structure."""


class Labeller(abc.ABC):
    """A reference method.

    Attributes:
        method: the method as stored with the data, e.g. ``"GFN2-xTB"``, ``"B3LYP/def2-SVPD"``.
        program: the program that computes it, e.g. ``"tblite"``, ``"pyscf"``.
        program_version: the installed version of ``program``.
    """

    method: str
    program: str
    program_version: str

    @abc.abstractmethod
    def label(self, atoms: Atoms, charge: int) -> tuple[float, np.ndarray]:
        """Energy (eV) and forces ((n_atoms, 3), eV/Å) of ``atoms`` at total charge ``charge`` (e).

        Raises ``LabelFailure`` when the SCF does not converge.
        """


class XTBCalculator(Calculator):
    """xTB energy (eV) and forces ((n_atoms, 3), eV/Å) with tblite, at total charge ``charge`` (e).

    Each call starts from the previous wavefunction; when that SCF does not converge, one retry
    with a smaller damping starts from a fresh guess (``XTB_DAMPING``). Raises
    ``CalculationFailed`` when both fail.
    """

    implemented_properties = ["energy", "forces"]

    def __init__(self, charge: int, method: str = "GFN2-xTB") -> None:
        from tblite.ase import TBLite

        super().__init__()
        self._tblite = functools.partial(TBLite, method=method, charge=charge, verbosity=0, **XTB_SCF)
        self._main = self._tblite(mixer_damping=XTB_DAMPING[0])

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        try:
            self.results = _energy_and_forces(self._main, self.atoms)
        except CalculationFailed:
            self.results = _energy_and_forces(self._tblite(mixer_damping=XTB_DAMPING[1]), self.atoms)


def _energy_and_forces(calc: Calculator, atoms: Atoms) -> dict[str, float | np.ndarray]:
    return {"energy": float(calc.get_potential_energy(atoms)), "forces": np.array(calc.get_forces(atoms))}


class XTBLabeller(Labeller):
    """GFN2-xTB with tblite. One ``XTBCalculator`` per charge is kept and reused (fast updates);
    after a failure the next structure of that charge gets a fresh one."""

    program = "tblite"

    def __init__(self, method: str = "GFN2-xTB") -> None:
        import tblite.ase  # noqa: F401  (fail here, not at the first structure)

        self.method = method
        self.program_version = version("tblite")
        self._calculators: dict[int, Calculator] = {}

    def __getstate__(self) -> dict:
        """Copies (and pickles, for worker processes) start without the cached calculators."""
        return {**self.__dict__, "_calculators": {}}

    def label(self, atoms: Atoms, charge: int) -> tuple[float, np.ndarray]:
        if charge not in self._calculators:
            self._calculators[charge] = XTBCalculator(charge, self.method)
        calc = self._calculators[charge]
        try:
            energy = calc.get_potential_energy(atoms)
            forces = calc.get_forces(atoms)
        except CalculationFailed as exc:
            del self._calculators[charge]
            raise LabelFailure(f"{self.method} failed: {exc}") from exc
        return float(energy), np.array(forces)


class PySCFLabeller(Labeller):
    """Closed-shell Kohn–Sham DFT with PySCF (restricted, spin 0) and analytic gradients.

    Elements beyond Kr (here I) get the def2 effective core potential of the basis. With
    ``density_fit`` (the default) the Coulomb and exchange integrals use density fitting with
    PySCF's default auxiliary basis for the orbital basis (def2-universal-JKFIT for def2 bases):
    about 1.3× faster for the SN2 anions here, total energies within ~1 mEh of the exact
    integrals, a shift that is nearly constant along a reaction path; the method name then ends
    in "/RI".
    """

    program = "pyscf"
    max_cycle = 50
    """DIIS iterations (PySCF's default); an SCF that has not converged then continues from its last
    density with up to ``newton_max_cycle`` second-order (Newton) steps, which converge where DIIS
    oscillates (about 3 % of the SN2 structures) before the structure counts as failed."""
    newton_max_cycle = 50

    def __init__(self, xc: str = "b3lyp", basis: str = "def2-svpd", density_fit: bool = True) -> None:
        import pyscf  # noqa: F401  (fail here, not at the first structure)

        self.xc = xc
        self.basis = basis
        self.density_fit = density_fit
        self.method = f"{xc.upper()}/{_basis_name(basis)}" + ("/RI" if density_fit else "")
        self.program_version = version("pyscf")

    def label(self, atoms: Atoms, charge: int) -> tuple[float, np.ndarray]:
        from pyscf import dft, gto

        symbols = atoms.get_chemical_symbols()
        if (int(atoms.numbers.sum()) - charge) % 2:
            raise LabelError(
                f"{atoms.get_chemical_formula()} at charge {charge} has an odd number of electrons; "
                f"{self.method} here is closed-shell (spin 0)"
            )
        mol = gto.M(
            atom=[(s, tuple(p)) for s, p in zip(symbols, atoms.positions)],
            unit="Angstrom",
            basis=self.basis,
            ecp={s: self.basis for s in set(symbols) if atomic_numbers[s] > 36},
            charge=charge,
            spin=0,
            verbose=0,
        )
        mf = dft.RKS(mol)
        mf.xc = self.xc
        if self.density_fit:
            mf = mf.density_fit()
        mf.max_cycle = self.max_cycle
        energy = mf.kernel()
        if not mf.converged:
            mf = mf.newton()
            mf.max_cycle = self.newton_max_cycle
            energy = mf.kernel(dm0=mf.make_rdm1())
        if not mf.converged:
            raise LabelFailure(f"{self.method} SCF did not converge (DIIS, then second-order steps)")
        gradient = mf.nuc_grad_method().kernel()
        return float(energy) * Hartree, -np.asarray(gradient) * (Hartree / Bohr)


def _basis_name(basis: str) -> str:
    """Conventional spelling of a basis name: ``"def2-svpd"`` -> ``"def2-SVPD"``."""
    if basis.lower().startswith("def2-"):
        return "def2-" + basis[5:].upper()
    return basis


_LABELLERS: dict[str, tuple[str, type[Labeller]]] = {
    "gfn2-xtb": ("tblite", XTBLabeller),
    "pyscf": ("pyscf", PySCFLabeller),
}


def get_labeller(method: str, **options: Any) -> Labeller:
    """The labeller named ``method`` (case-insensitive): ``"gfn2-xtb"`` or ``"pyscf"``, built with
    ``options`` (for PySCF: ``xc``, ``basis``, ``density_fit``).

    Raises ``LabelError`` for an unknown name, an option the labeller does not take, or a missing
    optional package.
    """
    key = method.lower()
    if key not in _LABELLERS:
        raise LabelError(f"unknown reference method {method!r}; valid: {', '.join(_LABELLERS)}")
    package, cls = _LABELLERS[key]
    if importlib.util.find_spec(package) is None:
        raise LabelError(
            f"method {key!r} needs the optional package {package}: pip install 'lmlp[reference]'"
        )
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise LabelError(f"method {key!r} takes no option {', '.join(unknown)} (it takes: {', '.join(sorted(known)) or 'none'})")
    return cls(**options)


def label_structures(
    images: list[Atoms], labeller: Labeller, progress: bool = False
) -> tuple[list[Atoms], list[int]]:
    """Label ``images`` with ``labeller``; return the labelled copies and the failed indices.

    The charge of each structure is ``atoms.info.get("charge", 0)``. Every labelled copy carries
    a ``SinglePointCalculator`` with energy (eV) and forces ((n_atoms, 3), eV/Å). Structures
    whose SCF fails are left out; their indices are returned. With ``progress``, a line on
    stderr at most every 30 s. Runs single-threaded (OpenMP, BLAS), as in worker processes, so the
    labels do not depend on the thread or worker count (threaded reductions change the round-off).
    """
    labelled: list[Atoms] = []
    failed: list[int] = []
    last = time.monotonic()
    with threadpool_limits(limits=1):
        for i, atoms in enumerate(images):
            try:
                energy, forces = labeller.label(atoms, int(atoms.info.get("charge", 0)))
            except LabelFailure:
                failed.append(i)
                continue
            copy = atoms.copy()
            copy.calc = SinglePointCalculator(copy, energy=energy, forces=forces)
            labelled.append(copy)
            if progress and time.monotonic() - last > _PROGRESS_SECONDS:
                last = time.monotonic()
                print(f"labelled {i + 1}/{len(images)} structures with {labeller.method} "
                      f"({len(failed)} failed)", file=sys.stderr, flush=True)
    return labelled, failed
