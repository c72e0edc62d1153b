"""The SN2 reference data set: X⁻ + CH3Y → XCH3 + Y⁻ for X, Y ∈ {F, Cl, Br, I}.

All 16 ordered combinations (X = Y included): 6 atoms in the order C, H, H, H, X, Y, total
charge −1, label ``"X+CH3Y"`` (e.g. ``"F+CH3Cl"``).

Geometries always come from GFN2-xTB molecular dynamics (tblite), whatever labeller computes the
stored energies and forces afterwards. Per reaction, windows along the whole reaction path, each
defined by target C–X and C–Y distances (Å):

- separated reactants: C–X from 10 Å (a few Å beyond the 6 Å model cutoff) in even steps
  towards the ion–molecule complex, C–Y at its bond length (6 windows);
- reactant complex → transition state → product complex, piecewise linear in both distances
  (13 windows, the middle one at the approximate transition state);
- separated products, the mirror of the reactant side (6 windows);
- two unrestrained windows that start at the reactant and the product complex.

Restrained windows add k/2 (r − r0)² on both C–X and C–Y distances to the sampling forces only;
the stored labels never contain them. Each trajectory draws its centre r0 uniformly within half
the spacing to the neighbouring windows, so together the windows cover the path without gaps. Every window runs one Langevin trajectory per temperature
with its own random stream, derived from the seed and the (reaction, window, temperature)
indices, so results do not depend on execution order or worker count.

Generation is chunked per reaction (``OUT.parts/<reaction>.h5``), resumable (existing parts are
kept) and parallel over reactions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from ase import Atoms, units
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes
from ase.constraints import FixBondLength, FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary
from ase.optimize import BFGS

try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

from lmlp.data.hdf5 import read_structures, write_structures
from lmlp.data.structures import StructureSet, concatenate, split_indices
from lmlp.errors import LmlpError
from lmlp.reference.augment import displaced
from lmlp.reference.labellers import XTBCalculator, get_labeller, label_structures

HALOGENS = ("F", "Cl", "Br", "I")
REACTIONS = tuple(f"{x}+CH3{y}" for x in HALOGENS for y in HALOGENS)
"""The 16 reaction labels in their canonical order."""

CHARGE = -1
BOND = {"F": 1.40, "Cl": 1.80, "Br": 1.96, "I": 2.16}
"""Approximate C–halogen bond lengths, Å."""
COMPLEX = {"F": 2.6, "Cl": 3.2, "Br": 3.4, "I": 3.6}
"""Approximate C···halide distances in the ion–molecule complexes, Å."""
TS_STRETCH = 0.45
"""Approximate transition-state C–X and C–Y distances: bond length + this, Å."""
FAR = 10.0
"""C···halide distance of the most separated fragments, Å (model cutoff: 6 Å)."""
CH_BOND = 1.09
"""C–H bond length of the start geometries, Å."""
UMBRELLA_ANGLE = 108.5
"""H–C–Y angle of the reactant (H–C–X of the product), degrees."""
N_SEPARATED = 6
N_PATH = 13
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
"""Train, validation and test fractions of the stored split, dealt by whole trajectory per reaction."""

_C, _X, _Y = 0, 4, 5


@dataclass(frozen=True)
class Window:
    """A sampling window: start distances (Å), umbrella progress (0 reactant, 1 product)."""

    r_cx: float
    r_cy: float
    progress: float
    restrained: bool = True


@dataclass(frozen=True)
class SamplingProtocol:
    """The MD protocol of every window.

    Attributes:
        restraint_k: force constant of the distance restraints, eV/Å².
        timestep: MD time step, fs.
        friction: Langevin friction, 1/fs.
        equilibration: steps before the first kept frame.
        stride: steps between kept frames.
    """

    restraint_k: float = 5.0
    timestep: float = 0.5
    friction: float = 0.02
    equilibration: int = 100
    stride: int = 20

    def describe(self, temperatures: Sequence[float], seed: int) -> str:
        """One line for the ``sampling`` provenance attribute."""
        temps = "/".join(f"{t:g}" for t in temperatures)
        return (
            f"GFN2-xTB (tblite) Langevin MD, {self.timestep:g} fs steps, friction "
            f"{self.friction:g}/fs, T = {temps} K; {len(reaction_windows('F', 'F'))} windows per "
            f"reaction along C-X/C-Y (harmonic restraints k = {self.restraint_k:g} eV/A^2 with "
            f"jittered centres, 2 unrestrained); {self.equilibration} equilibration steps, then "
            f"every {self.stride}th step kept; seed {seed}"
        )


@dataclass
class GenerationReport:
    """What ``generate_sn2`` wrote.

    Attributes:
        path: the output file.
        n_written: structures written.
        n_failed_sampling: trajectories ended early by a failed xTB calculation.
        n_failed_labels: structures left out because the labeller failed.
        per_reaction: structures written per reaction label.
    """

    path: Path
    n_written: int
    n_failed_sampling: int
    n_failed_labels: int
    per_reaction: dict[str, int]


class RestrainedCalculator(Calculator):
    """``base`` plus harmonic distance restraints Σ k/2 (r_ij − r0)²; energy eV, forces eV/Å.

    Args:
        base: calculator of the unrestrained system.
        pairs: (P, 2) atom indices i, j of the restrained distances.
        r0: (P,) target distances, Å.
        k: force constant, eV/Å².
    """

    implemented_properties = ["energy", "forces"]

    def __init__(self, base: Calculator, pairs: np.ndarray, r0: np.ndarray, k: float) -> None:
        super().__init__()
        self.base = base
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.r0 = np.asarray(r0, dtype=np.float64)
        self.k = k

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        i, j = self.pairs.T
        d = self.atoms.positions[j] - self.atoms.positions[i]
        r = np.linalg.norm(d, axis=1)
        grad_j = (self.k * (r - self.r0) / r)[:, None] * d
        forces = np.array(self.base.get_forces(self.atoms))
        np.add.at(forces, i, grad_j)
        np.add.at(forces, j, -grad_j)
        restraint = 0.5 * self.k * np.sum((r - self.r0) ** 2)
        self.results = {"energy": self.base.get_potential_energy(self.atoms) + restraint, "forces": forces}


def parse_reaction(reaction: str) -> tuple[str, str]:
    """``"F+CH3Cl"`` -> ``("F", "Cl")``; ``LmlpError`` for anything else."""
    if reaction not in REACTIONS:
        raise LmlpError(
            f"unknown reaction {reaction!r}; expected X+CH3Y with X, Y in {', '.join(HALOGENS)}"
        )
    x, y = reaction.split("+CH3")
    return x, y


def reaction_coordinate(s: StructureSet) -> np.ndarray:
    """(n,) ξ = r(C–X) − r(C–Y) of SN2 structures (atom order C, H, H, H, X, Y), Å: negative in the
    product region, about 0 at the transition state, positive towards the reactants."""
    if not np.all(s.n_atoms == 6):
        raise LmlpError("the SN2 reaction coordinate needs 6-atom structures (C, H, H, H, X, Y)")
    xyz = s.positions.reshape(-1, 6, 3)
    return np.linalg.norm(xyz[:, _X] - xyz[:, _C], axis=1) - np.linalg.norm(xyz[:, _Y] - xyz[:, _C], axis=1)


def coverage_cells(s: StructureSet, bins: int) -> np.ndarray:
    """(n,) cell id of each SN2 structure: its reaction × one of ``bins`` equal-width bins of its
    ``reaction_coordinate`` over that reaction's range (for an even spread along every path)."""
    xi = reaction_coordinate(s)
    labels, reaction = np.unique(s.label.astype(str), return_inverse=True)
    cells = np.zeros(len(s), dtype=np.int64)
    for r in range(len(labels)):
        mine = reaction == r
        edges = np.linspace(xi[mine].min(), xi[mine].max(), bins + 1)[1:-1]
        cells[mine] = r * bins + np.searchsorted(edges, xi[mine])
    return cells


def build_geometry(x: str, y: str, r_cx: float, r_cy: float, progress: float) -> Atoms:
    """Collinear X···C···Y start geometry: C at the origin, Y on +z, X on −z (distances Å).

    The three H form an umbrella whose z component goes linearly with ``progress`` from the
    reactant (0: H tilted away from Y, H–C–Y = 108.5°) through planar (0.5) to the product (1).
    """
    z = CH_BOND * np.cos(np.radians(UMBRELLA_ANGLE)) * (1.0 - 2.0 * progress)
    rho = np.sqrt(CH_BOND**2 - z**2)
    phi = np.radians([0.0, 120.0, 240.0])
    hydrogens = np.stack([rho * np.cos(phi), rho * np.sin(phi), np.full(3, z)], axis=1)
    positions = np.concatenate([[[0.0, 0.0, 0.0]], hydrogens, [[0.0, 0.0, -r_cx], [0.0, 0.0, r_cy]]])
    return Atoms(["C", "H", "H", "H", x, y], positions=positions,
                 info={"charge": CHARGE, "label": f"{x}+CH3{y}"})


def reaction_windows(x: str, y: str) -> list[Window]:
    """The 27 sampling windows of X⁻ + CH3Y: 25 restrained ones in order along the path, from
    separated reactants to separated products, then the 2 unrestrained ones."""
    reactant = (COMPLEX[x], BOND[y])
    ts = (BOND[x] + TS_STRETCH, BOND[y] + TS_STRETCH)
    product = (BOND[x], COMPLEX[y])
    separated_x = np.linspace(FAR, COMPLEX[x], N_SEPARATED + 1)[:-1]
    separated_y = np.linspace(COMPLEX[y], FAR, N_SEPARATED + 1)[1:]
    path = []
    for t in np.linspace(0.0, 1.0, N_PATH):
        start, end, u = (reactant, ts, 2 * t) if t <= 0.5 else (ts, product, 2 * t - 1)
        r_cx, r_cy = (float(a + u * (b - a)) for a, b in zip(start, end))
        path.append(Window(r_cx, r_cy, progress=float(t)))
    return (
        [Window(float(r), BOND[y], 0.0) for r in separated_x]
        + path
        + [Window(BOND[x], float(r), 1.0) for r in separated_y]
        + [Window(*reactant, 0.0, restrained=False), Window(*product, 1.0, restrained=False)]
    )


def run_trajectory(
    start: Atoms, calc: Calculator, temperature: float, n_frames: int,
    protocol: SamplingProtocol, rng: np.random.Generator,
) -> tuple[list[Atoms], bool]:
    """Langevin MD from ``start`` at ``temperature`` (K) with ``calc`` (eV, eV/Å).

    Maxwell–Boltzmann start velocities, ``protocol.equilibration`` steps, then ``n_frames``
    frames ``protocol.stride`` steps apart, all drawn from ``rng``. Frames are new ``Atoms``
    (positions Å, ``info`` of ``start``) without velocities or results. Returns the frames and
    whether a failed calculation ended the trajectory early (the frames so far are kept).
    """
    atoms = start.copy()
    atoms.calc = calc
    atoms.set_constraint(FixCom())
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    dyn = Langevin(atoms, timestep=protocol.timestep * units.fs, temperature_K=temperature,
                   friction=protocol.friction / units.fs, fixcm=False, rng=rng)
    frames: list[Atoms] = []
    try:
        dyn.run(protocol.equilibration)
        for _ in range(n_frames):
            dyn.run(protocol.stride)
            frames.append(Atoms(atoms.numbers, positions=atoms.positions, info=dict(start.info)))
    except CalculationFailed:
        return frames, True
    return frames, False


def sample_reaction(
    reaction: str, n_frames: int, seed: int, temperatures: Sequence[float],
    protocol: SamplingProtocol,
) -> tuple[list[Atoms], int]:
    """``n_frames`` GFN2-xTB MD frames of ``reaction``, spread over all windows and temperatures.

    Every (window, temperature) trajectory has a fresh xTB calculator and its own random stream
    from ``seed`` and the (reaction, window, temperature) indices, so it does not depend on the
    other trajectories. OpenMP and BLAS run single-threaded: threaded reductions in tblite change
    the round-off, which the MD would amplify. Returns the frames (fewer if trajectories failed)
    and the number of failed trajectories.
    """
    with threadpool_limits(limits=1):
        return _sample_windows(reaction, n_frames, seed, temperatures, protocol)


def _sample_windows(
    reaction: str, n_frames: int, seed: int, temperatures: Sequence[float],
    protocol: SamplingProtocol,
) -> tuple[list[Atoms], int]:
    """``sample_reaction`` at the current thread settings."""
    x, y = parse_reaction(reaction)
    r_index = REACTIONS.index(reaction)
    windows = reaction_windows(x, y)
    jobs = [(w, t) for w in range(len(windows)) for t in range(len(temperatures))]
    frames: list[Atoms] = []
    n_failed = 0
    for (w, t), n in zip(jobs, _spread(n_frames, len(jobs))):
        if n == 0:
            continue
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(r_index, w, t)))
        window = _jittered(windows, w, rng) if windows[w].restrained else windows[w]
        calc: Calculator = XTBCalculator(CHARGE)
        if window.restrained:
            calc = RestrainedCalculator(calc, [[_C, _X], [_C, _Y]], [window.r_cx, window.r_cy],
                                        protocol.restraint_k)
        start = build_geometry(x, y, window.r_cx, window.r_cy, window.progress)
        start.info["trajectory"] = (r_index * len(windows) + w) * len(temperatures) + t
        kept, failed = run_trajectory(start, calc, temperatures[t], int(n), protocol, rng)
        frames += kept
        n_failed += failed
    return frames, n_failed


INDEPENDENT_TEMPERATURES = (500.0, 750.0, 1000.0)
"""Temperatures (K) of the independent set's unrestrained MD from the transition-state region."""
INDEPENDENT_SIGMA = (0.05, 0.1)
"""Range of the root-mean-square displacements of an atom (Å, all three directions together) of
the displaced copies: each Cartesian component moves by a Gaussian of width σ/√3."""
INDEPENDENT_SHARES = (0.2, 0.4, 0.4)
"""Shares of a reaction's structures from the relaxed scan, displaced copies and hot MD."""
INDEPENDENT_PARTS = {0: "relaxed scan", 1: "displaced copies", **{2 + t: f"MD {T:g} K" for t, T in enumerate(INDEPENDENT_TEMPERATURES)}}
"""Part of the independent set by trajectory id modulo 10."""
_INDEPENDENT_KEY = 1000
"""Offset of the independent protocol's random-stream keys (window indices stay below it)."""


@dataclass(frozen=True)
class IndependentProtocol:
    """Sampling of the independent SN2 test set, unlike the training set's restrained MD.

    Per reaction: a relaxed scan along the C–X distance (C–X held fixed by a constraint, all
    else relaxed with BFGS to ``fmax``, from the reactant complex through the transition state to
    the product), thermally displaced copies of the scan points (every atom moved by a Gaussian
    of root-mean-square length σ drawn from ``INDEPENDENT_SIGMA``), and unrestrained Langevin MD at
    ``INDEPENDENT_TEMPERATURES`` started at the scan's transition-state point, frames ``stride`` steps
    apart after ``equilibration`` steps.
    """

    fmax: float = 0.05
    max_steps: int = 300
    timestep: float = 0.5
    friction: float = 0.01
    equilibration: int = 10
    stride: int = 10

    def describe(self, seed: int) -> str:
        """One line for the ``sampling`` provenance attribute."""
        temps = "/".join(f"{t:g}" for t in INDEPENDENT_TEMPERATURES)
        shares = "/".join(f"{s:g}" for s in INDEPENDENT_SHARES)
        return (
            f"independent protocol: GFN2-xTB (tblite) relaxed scan along C-X (BFGS to fmax {self.fmax:g} eV/A), "
            f"displaced copies of the scan points (rms displacement per atom {INDEPENDENT_SIGMA[0]:g}-"
            f"{INDEPENDENT_SIGMA[1]:g} A), "
            f"unrestrained Langevin MD from the scan's transition-state point at T = {temps} K ({self.timestep:g} fs steps, "
            f"friction {self.friction:g}/fs, every {self.stride}th step after {self.equilibration}); "
            f"shares {shares}; seed {seed}"
        )


def sample_independent(reaction: str, n_frames: int, seed: int,
                       protocol: IndependentProtocol = IndependentProtocol()) -> tuple[list[Atoms], int]:
    """About ``n_frames`` structures of ``reaction`` by the ``IndependentProtocol``.

    Random streams are keyed by ``seed``, the reaction and the part, disjoint from the training
    protocol's windows. Trajectory ids tell the parts apart: ``INDEPENDENT_PARTS`` maps
    ``id % 10`` to the part (the scan, its displaced copies, the MD run at each temperature).
    Returns the frames and the number of failed scan points or trajectories.
    """
    with threadpool_limits(limits=1):
        x, y = parse_reaction(reaction)
        r_index = REACTIONS.index(reaction)
        n_scan, n_displaced, n_md = _independent_counts(n_frames)
        scan, n_failed = relaxed_scan(x, y, n_scan, protocol)
        first_id = (r_index + len(REACTIONS)) * 10_000
        for atoms in scan:
            atoms.info["trajectory"] = first_id
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(r_index, _INDEPENDENT_KEY, 0)))
        displaced = [_displaced(scan[k % len(scan)], rng, first_id + 1) for k in range(n_displaced)] if scan else []
        frames = scan + displaced
        if not scan:
            return frames, n_failed
        top = _barrier_top(scan, x)
        md = SamplingProtocol(timestep=protocol.timestep, friction=protocol.friction,
                              equilibration=protocol.equilibration, stride=protocol.stride)
        for t, n in enumerate(_spread(n_md, len(INDEPENDENT_TEMPERATURES))):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(r_index, _INDEPENDENT_KEY + 1 + t, 0)))
            start = Atoms(top.numbers, positions=top.positions, info={**_plain_info(top), "trajectory": first_id + 2 + t})
            kept, failed = run_trajectory(start, XTBCalculator(CHARGE), INDEPENDENT_TEMPERATURES[t], int(n), md, rng)
            frames += kept
            n_failed += failed
        for atoms in frames:
            atoms.info.pop("scan_energy", None)
        return frames, n_failed


def _independent_counts(n_frames: int) -> tuple[int, int, int]:
    """Scan points (at least 3), displaced copies and MD frames of one reaction."""
    n_scan = max(3, int(round(INDEPENDENT_SHARES[0] * n_frames)))
    n_displaced = int(round(INDEPENDENT_SHARES[1] * n_frames))
    return n_scan, n_displaced, max(0, n_frames - n_scan - n_displaced)


def relaxed_scan(x: str, y: str, n_points: int, protocol: IndependentProtocol) -> tuple[list[Atoms], int]:
    """GFN2-xTB geometries along C–X from 1.5 Å beyond the reactant complex to 0.1 Å inside the
    C–X bond, C–X fixed and the rest relaxed, each point started from the previous one.

    Returns the relaxed points (``info["scan_energy"]``: xTB energy, eV) and the number of
    points whose calculation failed (left out).
    """
    atoms = build_geometry(x, y, COMPLEX[x] + 1.5, BOND[y], 0.0)
    points: list[Atoms] = []
    n_failed = 0
    for r_cx in np.linspace(COMPLEX[x] + 1.5, BOND[x] - 0.1, n_points):
        atoms.set_constraint()
        atoms.set_distance(_C, _X, float(r_cx), fix=0)
        atoms.set_constraint(FixBondLength(_C, _X))
        atoms.calc = XTBCalculator(CHARGE)
        try:
            BFGS(atoms, logfile=None).run(fmax=protocol.fmax, steps=protocol.max_steps)
            energy = atoms.get_potential_energy()
        except CalculationFailed:
            n_failed += 1
            atoms = points[-1].copy() if points else build_geometry(x, y, float(r_cx), BOND[y], 0.0)
            continue
        points.append(Atoms(atoms.numbers, positions=atoms.positions,
                            info={**_plain_info(atoms), "scan_energy": float(energy)}))
    return points, n_failed


def _barrier_top(scan: list[Atoms], x: str) -> Atoms:
    """The highest scan point between the reactant complex and the C–X bond (the approximate
    transition state; for a submerged barrier the separated reactants lie higher), else the last."""
    inside = [a for a in scan if BOND[x] < a.get_distance(_C, _X) < COMPLEX[x]] or scan[-1:]
    return max(inside, key=lambda a: a.info["scan_energy"])


def _plain_info(atoms: Atoms) -> dict:
    """The charge and label of ``atoms.info``."""
    return {"charge": atoms.info["charge"], "label": atoms.info["label"]}


def _displaced(atoms: Atoms, rng: np.random.Generator, trajectory: int) -> Atoms:
    """``augment.displaced`` copy of ``atoms`` (σ ~ U(INDEPENDENT_SIGMA)) with trajectory id ``trajectory``."""
    copy = displaced(atoms, rng, INDEPENDENT_SIGMA)
    copy.info["trajectory"] = trajectory
    return copy


def _jittered(windows: list[Window], w: int, rng: np.random.Generator) -> Window:
    """Restrained window ``w`` moved towards a neighbour along the path by up to half the spacing."""
    u = rng.uniform(-0.5, 0.5)
    last = sum(win.restrained for win in windows) - 1
    here, there = windows[w], windows[min(max(w + (1 if u > 0 else -1), 0), last)]
    f = abs(u)
    return Window(here.r_cx + f * (there.r_cx - here.r_cx), here.r_cy + f * (there.r_cy - here.r_cy),
                  here.progress + f * (there.progress - here.progress))


def _spread(n: int, k: int) -> np.ndarray:
    """(k,) non-negative ints summing to ``n``, as equal as possible, the larger ones spaced evenly."""
    return np.diff(np.arange(k + 1) * n // k)


@dataclass(frozen=True)
class _Chunk:
    """One reaction's share of a generation run."""

    reaction: str
    n_structures: int
    seed: int
    method: str
    temperatures: tuple[float, ...]
    protocol: SamplingProtocol
    path: Path
    settings: dict[str, str]
    progress: bool
    sampling: str = "md"


def _make_part(chunk: _Chunk) -> str:
    """Sample, label and write one reaction's part file; return a one-line summary.

    Labelling runs single-threaded (``label_structures``) in-process as in workers, so the labels
    do not depend on the worker count.
    """
    if chunk.sampling == "independent":
        images, n_failed_sampling = sample_independent(chunk.reaction, chunk.n_structures, chunk.seed)
    else:
        images, n_failed_sampling = sample_reaction(
            chunk.reaction, chunk.n_structures, chunk.seed, chunk.temperatures, chunk.protocol
        )
    labelled, failed = label_structures(images, get_labeller(chunk.method), chunk.progress)
    part = StructureSet.from_atoms(labelled, default_charge=CHARGE)
    part.attrs = {**chunk.settings, "reaction": chunk.reaction,
                  "n_failed_sampling": str(n_failed_sampling), "n_failed_labels": str(len(failed))}
    write_structures(chunk.path, part)
    return (f"{chunk.reaction}: {len(part)} structures, {n_failed_sampling} failed trajectories, "
            f"{len(failed)} failed labels")


def _read_part(chunk: _Chunk) -> tuple[StructureSet, int, int]:
    """A finished part, its failed trajectories and failed labels; it must match the settings."""
    part, _ = read_structures(chunk.path)
    for key, value in chunk.settings.items():
        if part.attrs.get(key) != value:
            raise LmlpError(
                f"{chunk.path} was made with other settings ({key}: {part.attrs.get(key)!r}, "
                f"now {value!r}); delete {chunk.path.parent} to start over"
            )
    return part, int(part.attrs["n_failed_sampling"]), int(part.attrs["n_failed_labels"])


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """OMP_NUM_THREADS=1 for processes started inside (each worker is one core)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old


def _make_parts(chunks: list[_Chunk], workers: int, progress: bool) -> None:
    """Write the missing part files, in this process or in up to ``workers`` spawned processes."""
    todo = [c for c in chunks if not c.path.exists()]
    if progress and len(todo) < len(chunks):
        _say(f"{len(chunks) - len(todo)} of {len(chunks)} reactions already done")
    if workers == 1 or len(todo) <= 1:
        for chunk in todo:
            summary = _make_part(chunk)
            if progress:
                _say(summary)
        return
    with _single_threaded_children(), ProcessPoolExecutor(
        min(workers, len(todo)), mp_context=get_context("spawn")
    ) as pool:
        futures = [pool.submit(_make_part, c) for c in todo]
        try:
            for future in as_completed(futures):
                summary = future.result()
                if progress:
                    _say(summary)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check_arguments(
    n_structures: int, seed: int, workers: int, temperatures: Sequence[float],
    reactions: list[str] | None,
) -> list[str]:
    """The requested reactions in canonical order; ``LmlpError`` for unusable arguments."""
    chosen = set(REACTIONS if reactions is None else reactions)
    for reaction in chosen:
        parse_reaction(reaction)
    share = _spread(n_structures, len(REACTIONS))
    if n_structures < 1 or any(share[REACTIONS.index(r)] == 0 for r in chosen):
        raise LmlpError(f"n_structures={n_structures} leaves reactions without structures; "
                        f"use at least {len(REACTIONS)}")
    if seed < 0:
        raise LmlpError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise LmlpError(f"workers must be >= 1, got {workers}")
    if not temperatures or min(temperatures) <= 0:
        raise LmlpError(f"temperatures must be positive kelvin, got {list(temperatures)}")
    return [r for r in REACTIONS if r in chosen]


def generate_sn2(
    out: Path,
    n_structures: int = 9000,
    seed: int = 0,
    method: str = "gfn2-xtb",
    workers: int = 1,
    temperatures: Sequence[float] = (300, 600, 1000),
    reactions: list[str] | None = None,
    command: str = "",
    progress: bool = False,
    protocol: SamplingProtocol = SamplingProtocol(),
    sampling: str = "md",
) -> GenerationReport:
    """Sample, label and write the SN2 data set to ``out`` (HDF5), resumably.

    Args:
        out: output file; parts go to ``<out>.parts/<reaction>.h5`` and are removed at the end.
        n_structures: budget for all 16 reactions, spread evenly over reactions, windows and
            temperatures (failed trajectories and labels make the result a little smaller).
        seed: seeds the MD of every (reaction, window, temperature) and the stored split.
        method: labeller of the stored energies and forces, ``"gfn2-xtb"`` or ``"pyscf"``;
            the MD sampling always uses GFN2-xTB.
        workers: processes, one reaction each at a time (1: in this process).
        temperatures: MD temperatures, K.
        reactions: only these labels (e.g. ``["F+CH3Cl"]``), each with its share of
            ``n_structures``; default all 16.
        command: how the file was made, stored as provenance.
        progress: print a line per finished reaction (and labelling progress) on stderr.
        protocol: MD settings of every window.
        sampling: ``"md"``, the training protocol (restrained MD windows along the path,
            ``temperatures``, ``protocol``), or ``"independent"``, the ``IndependentProtocol``
            of a test set made differently (relaxed scans, displaced copies, hot MD).

    A restarted run keeps the parts that exist (they must come from the same settings). Every
    structure records its trajectory id. The ``"md"`` output holds a train/validation/test split
    (``SPLIT_FRACTIONS``) dealt by whole trajectory, stratified per reaction; the
    ``"independent"`` output is all test. Provenance attributes: method, program,
    program_version, sampling, command and created.
    """
    out = Path(out)
    chosen = _check_arguments(n_structures, seed, workers, temperatures, reactions)
    if sampling not in ("md", "independent"):
        raise LmlpError(f"sampling protocol {sampling!r}: expected 'md' or 'independent'")
    labeller = get_labeller(method)
    parts = out.with_name(out.name + ".parts")
    temps = tuple(float(t) for t in temperatures)
    described = protocol.describe(temps, seed) if sampling == "md" else IndependentProtocol().describe(seed)
    settings = {"method": labeller.method, "sampling": described, "n_structures": str(n_structures)}
    share = _spread(n_structures, len(REACTIONS))
    chunks = [
        _Chunk(r, int(share[REACTIONS.index(r)]), seed, method, temps, protocol,
               parts / f"{r}.h5", settings, progress, sampling)
        for r in chosen
    ]
    _make_parts(chunks, workers, progress)
    finished = [_read_part(c) for c in chunks]
    merged = concatenate([part for part, _, _ in finished])
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    merged = replace(
        merged,
        split=(split_indices(merged.label, SPLIT_FRACTIONS, seed, merged.trajectory) if sampling == "md"
               else {"test": np.arange(len(merged))}),
        attrs={"method": labeller.method, "program": labeller.program,
               "program_version": labeller.program_version, "sampling": settings["sampling"],
               "command": command, "created": created},
    )
    write_structures(out, merged)
    shutil.rmtree(parts)
    return GenerationReport(
        path=out,
        n_written=len(merged),
        n_failed_sampling=sum(n for _, n, _ in finished),
        n_failed_labels=sum(n for _, _, n in finished),
        per_reaction={c.reaction: len(part) for c, (part, _, _) in zip(chunks, finished)},
    )
