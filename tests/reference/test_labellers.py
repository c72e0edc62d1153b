"""Reference labellers: forces are −dE/dx, bad names are explained, failures are never stored."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator

from lmlp.errors import LabelError
from lmlp.reference import labellers
from lmlp.reference.labellers import LabelFailure, Labeller, get_labeller, label_structures
from lmlp.reference.sn2 import build_geometry


def sn2_geometry(x: str = "F", y: str = "Cl", seed: int = 0) -> Atoms:
    """A slightly distorted X⁻···CH3Y geometry near the transition state."""
    atoms = build_geometry(x, y, r_cx=2.2, r_cy=2.1, progress=0.4)
    atoms.positions += np.random.default_rng(seed).normal(0.0, 0.05, atoms.positions.shape)
    return atoms


def finite_difference_forces(
    labeller: Labeller, atoms: Atoms, charge: int, components: list[tuple[int, int]], h: float
) -> np.ndarray:
    """−dE/dx (eV/Å) of the (atom, direction) ``components`` by central differences (step h Å)."""
    forces = []
    for atom, direction in components:
        energies = []
        for step in (h, -h):
            moved = atoms.copy()
            moved.positions[atom, direction] += step
            energies.append(labeller.label(moved, charge)[0])
        forces.append(-(energies[0] - energies[1]) / (2 * h))
    return np.array(forces)


def test_xtb_forces_are_minus_gradient():
    pytest.importorskip("tblite")
    labeller = get_labeller("gfn2-xtb")
    atoms = sn2_geometry()
    energy, forces = labeller.label(atoms, -1)
    components = [(i, d) for i in range(len(atoms)) for d in range(3)]
    fd = finite_difference_forces(labeller, atoms, -1, components, h=1e-4)
    assert np.isfinite(energy)
    assert forces.shape == (6, 3)
    np.testing.assert_allclose(forces.ravel(), fd, atol=1e-4)


def test_xtb_labeller_names_method_and_program():
    pytest.importorskip("tblite")
    labeller = get_labeller("GFN2-xTB")
    assert (labeller.method, labeller.program) == ("GFN2-xTB", "tblite")
    assert labeller.program_version[0].isdigit()


def test_xtb_scf_failure_raises_label_failure_and_resets(monkeypatch):
    pytest.importorskip("tblite")

    class Failing(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=None, system_changes=None):
            raise CalculationFailed("SCF not converged in 250 cycles")

    made = []

    def calculator(charge: int, method: str = "GFN2-xTB") -> Calculator:
        made.append(charge)
        return Failing() if len(made) == 1 else real(charge, method)

    real = labellers.XTBCalculator
    monkeypatch.setattr(labellers, "XTBCalculator", calculator)
    labeller = get_labeller("gfn2-xtb")
    with pytest.raises(LabelFailure, match="SCF not converged"):
        labeller.label(sn2_geometry(), -1)
    energy, _ = labeller.label(sn2_geometry(), -1)
    assert np.isfinite(energy)
    assert made == [-1, -1]


def test_xtb_retry_converges_an_oscillating_scf():
    pytest.importorskip("tblite")
    # F⁻ 3.83 Å from CH3I: the first attempt (damping 0.05, fresh guess) fails with tblite 0.8.0
    atoms = build_geometry("F", "I", r_cx=3.8333333333333335, r_cy=2.16, progress=0.0)
    forces = labellers.XTBCalculator(-1).get_forces(atoms)
    assert np.isfinite(forces).all()


def test_unknown_method_lists_valid_names():
    with pytest.raises(LabelError, match=r"^unknown reference method 'nonsense'; valid: gfn2-xtb, pyscf$"):
        get_labeller("nonsense")


def test_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyscf" else real(name, *a))
    with pytest.raises(LabelError) as info:
        get_labeller("PySCF")
    assert str(info.value) == "method 'pyscf' needs the optional package pyscf: pip install 'lmlp[reference]'"


class Flaky(Labeller):
    """A fake labeller: fails on structures with ``info["fail"]``, else energy = charge."""

    method, program, program_version = "flaky", "test", "0"

    def label(self, atoms: Atoms, charge: int) -> tuple[float, np.ndarray]:
        if atoms.info.get("fail"):
            raise LabelFailure("did not converge")
        return float(charge), np.zeros((len(atoms), 3))


def test_failed_labels_are_counted_not_stored():
    images = [sn2_geometry(seed=i) for i in range(4)]
    images[1].info["fail"] = True
    images[3].info["charge"] = 0
    labelled, failed = label_structures(images, Flaky())
    assert failed == [1]
    assert [a.get_potential_energy() for a in labelled] == [-1.0, -1.0, 0.0]
    assert [a.info["label"] for a in labelled] == ["F+CH3Cl"] * 3
    assert all(a.calc is None for a in images)


def test_pyscf_labels_anion_and_iodine_molecule():
    pytest.importorskip("pyscf")
    labeller = get_labeller("pyscf")
    hydroxide = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]], info={"charge": -1})
    hydrogen_iodide = Atoms("HI", positions=[[0, 0, 0], [0, 0, 1.61]])
    labelled, failed = label_structures([hydroxide, hydrogen_iodide], labeller)
    assert (labeller.method, labeller.program) == ("B3LYP/def2-SVPD/RI", "pyscf")
    assert failed == []
    for atoms in labelled:
        assert np.isfinite(atoms.get_potential_energy())
        assert atoms.get_forces().shape == (2, 3)
        np.testing.assert_allclose(atoms.get_forces().sum(axis=0), 0.0, atol=5e-3)


def test_pyscf_scf_that_diis_leaves_unconverged_is_finished_by_second_order_steps(monkeypatch):
    pytest.importorskip("pyscf")
    hydroxide = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    labeller = get_labeller("pyscf", basis="def2-svp")
    energy, forces = labeller.label(hydroxide, -1)
    monkeypatch.setattr(labeller, "max_cycle", 2)  # DIIS stops after two iterations, unconverged
    newton_energy, newton_forces = labeller.label(hydroxide, -1)
    assert newton_energy == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(newton_forces, forces, atol=1e-4)
    monkeypatch.setattr(labeller, "newton_max_cycle", 1)  # too few second-order steps: a failure
    with pytest.raises(LabelFailure, match="did not converge"):
        labeller.label(hydroxide, -1)


def test_pyscf_rejects_odd_electron_count():
    pytest.importorskip("pyscf")
    with pytest.raises(LabelError, match="odd number of electrons"):
        get_labeller("pyscf").label(Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]]), 0)


@pytest.mark.slow
def test_pyscf_forces_are_minus_gradient():
    pytest.importorskip("pyscf")
    labeller = get_labeller("pyscf")
    atoms = sn2_geometry("F", "F")
    _, forces = labeller.label(atoms, -1)
    components = [(4, 2), (1, 0)]
    fd = finite_difference_forces(labeller, atoms, -1, components, h=1e-3)
    np.testing.assert_allclose([forces[i, d] for i, d in components], fd, atol=2e-3)


def test_options_reach_the_labeller_and_unknown_ones_are_errors():
    pytest.importorskip("pyscf")
    exact = get_labeller("pyscf", xc="pbe", basis="def2-svp", density_fit=False)
    assert (exact.method, exact.xc, exact.basis) == ("PBE/def2-SVP", "pbe", "def2-svp")
    with pytest.raises(LabelError, match="takes no option grid"):
        get_labeller("pyscf", grid=3)
    with pytest.raises(LabelError, match="takes no option xc"):
        get_labeller("gfn2-xtb", xc="b3lyp")


def test_pyscf_density_fitting_is_close_to_exact_integrals():
    pytest.importorskip("pyscf")
    hydroxide = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    e_ri, f_ri = get_labeller("pyscf").label(hydroxide, -1)
    e_exact, f_exact = get_labeller("pyscf", density_fit=False).label(hydroxide, -1)
    assert e_ri == pytest.approx(e_exact, abs=0.03)  # eV: ~1 mEh
    np.testing.assert_allclose(f_ri, f_exact, atol=0.01)
