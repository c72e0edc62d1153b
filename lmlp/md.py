"""Molecular dynamics with lMLP ensembles and uncertainty-driven active learning.

``run_md`` runs NVE (velocity Verlet), NVT (Langevin) or NPT (MTK) MD with ASE and an ``LMLPCalculator``.
``UncertaintyMonitor``, attached to any ASE dynamics, appends the structures whose ensemble
uncertainty exceeds the thresholds to an extxyz file; ``lmlp.labelling.label_file`` computes
reference labels for them and writes an lmlp HDF5 file ready for (continued) training.

Units: time fs, temperature K, energies eV, forces eV/Å, lengths Å; summaries report per-atom
energies in meV/atom and forces in meV/Å.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixCom
from ase.io.trajectory import Trajectory
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.nose_hoover_chain import IsotropicMTKNPT
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize.optimize import Dynamics
from tqdm import tqdm

try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

from lmlp.calculator import (
    ENERGY_FACTOR, FORCE_FACTOR, LMLPCalculator, UncertaintyThresholds, max_force_uncertainty,
)
from lmlp.data import read_structures
from lmlp.data.convert import H5_SUFFIXES, read_images
from lmlp.errors import LmlpError
from lmlp.model import HDNNPEnsemble

ENSEMBLES = ("nve", "nvt", "npt")
NPT_THERMOSTAT_STEPS = 100
"""NPT thermostat time constant in time steps (ASE's recommendation)."""
NPT_BAROSTAT_STEPS = 1000
"""NPT barostat time constant in time steps (ASE's recommendation)."""
KEPT_INFO = ("charge", "label")
"""Info keys of the start structure carried into flagged structures."""


class UncertaintyMonitor:
    """An observer of ASE dynamics that writes uncertain structures to an extxyz file.

    A structure is uncertain when ``thresholds.exceeded`` holds for the calculator results (an
    ``LMLPCalculator``): the ensemble energy standard deviation per atom, or the largest
    force-component standard deviation, is above its threshold. Uncertain structures are appended
    to ``path`` (a new file: an existing one is replaced at the first write), at most
    ``max_structures`` of them and at least ``min_interval`` steps apart. Each written structure
    carries the lMLP energy and forces (ensemble mean, eV and eV/Å), ``info`` charge and label of
    the simulated structure, step, time_fs (MD), energy_uncertainty (eV),
    energy_uncertainty_per_atom (eV/atom), max_force_uncertainty (eV/Å) and the per-atom array
    forces_uncertainty ((N, 3), eV/Å).

    Attach it with ``dyn.attach(monitor, interval=1)``; it also records the largest uncertainties
    seen. With ``path=None`` nothing is written.
    """

    def __init__(
        self,
        dynamics: Dynamics,
        path: str | os.PathLike | None,
        thresholds: UncertaintyThresholds,
        max_structures: int = 100,
        min_interval: int = 10,
    ) -> None:
        self.dynamics = dynamics
        self.path = None if path is None else Path(path)
        self.thresholds = thresholds
        self.max_structures = max_structures
        self.min_interval = min_interval
        self.n_uncertain = 0
        """Steps whose structure exceeded a threshold (written or not)."""
        self.n_written = 0
        self.last_written: int | None = None
        self.max_energy_uncertainty = 0.0
        """Largest energy standard deviation per atom seen, eV/atom."""
        self.max_force_uncertainty = 0.0
        """Largest force-component standard deviation seen, eV/Å."""

    def __call__(self) -> None:
        atoms = self.dynamics.atoms
        atoms.get_potential_energy()
        results = atoms.calc.results
        per_atom = results["energy_uncertainty"] / len(atoms)
        max_force = max_force_uncertainty(results)
        self.max_energy_uncertainty = max(self.max_energy_uncertainty, per_atom)
        self.max_force_uncertainty = max(self.max_force_uncertainty, max_force)
        if not self.thresholds.exceeded(results, len(atoms)):
            return
        self.n_uncertain += 1
        step = int(self.dynamics.nsteps)
        if (self.path is None or self.n_written >= self.max_structures
                or (self.last_written is not None and step - self.last_written < self.min_interval)):
            return
        self._write(atoms, results, step)

    def _write(self, atoms: Atoms, results: dict[str, Any], step: int) -> None:
        frame = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        frame.info.update({k: atoms.info[k] for k in KEPT_INFO if k in atoms.info})
        frame.info["step"] = step
        if hasattr(self.dynamics, "dt"):
            frame.info["time_fs"] = step * self.dynamics.dt / units.fs
        frame.info["energy_uncertainty"] = results["energy_uncertainty"]
        frame.info["energy_uncertainty_per_atom"] = results["energy_uncertainty"] / len(atoms)
        if "forces_uncertainty" in results:
            frame.info["max_force_uncertainty"] = max_force_uncertainty(results)
            frame.arrays["forces_uncertainty"] = np.array(results["forces_uncertainty"])
        frame.calc = SinglePointCalculator(frame, energy=results["energy"], forces=results["forces"])
        if self.n_written == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
        ase.io.write(self.path, frame, format="extxyz", append=True)
        self.n_written += 1
        self.last_written = step


class _EnergyTracker:
    """Observer: the conserved energy (eV) against its first value, the temperature and, for
    periodic cells, the volume.

    The conserved energy is E_pot + E_kin, or for NPT the MTK integrator's conserved quantity
    (which adds the thermostat and barostat energies and pV)."""

    def __init__(self, atoms: Atoms, dyn: MolecularDynamics) -> None:
        self.atoms = atoms
        self.conserved = getattr(dyn, "get_conserved_energy", None)
        self.periodic = bool(atoms.pbc.any())
        self.first: float | None = None
        self.last = 0.0
        self.max_deviation = 0.0
        self.temperatures: list[float] = []
        self.volumes: list[float] = []

    def __call__(self) -> None:
        if self.conserved is not None:
            total = self.conserved()
        else:
            total = self.atoms.get_potential_energy() + self.atoms.get_kinetic_energy()
        if self.periodic:
            self.volumes.append(self.atoms.cell.volume)
        if self.first is None:
            self.first = total
        self.last = total
        self.max_deviation = max(self.max_deviation, abs(total - self.first))
        self.temperatures.append(self.atoms.get_temperature())


@dataclass
class MDSummary:
    """What ``run_md`` did.

    Attributes:
        steps: MD steps run. n_atoms: atoms simulated. ensemble: "nve", "nvt" or "npt".
        timestep_fs: time step, fs. wall_time_s: wall-clock time of the steps, s.
        energy_drift: |E(end) − E(start)| / N in meV/atom of the conserved energy (NVE: E_tot;
            NPT: the MTK conserved quantity; None for Langevin NVT).
        max_energy_deviation: max_t |E(t) − E(start)| / N in meV/atom (likewise).
        mean_temperature: mean instantaneous temperature, K.
        mean_volume: mean cell volume, Å³ (periodic cells; None for molecules).
        max_energy_uncertainty: largest ensemble energy standard deviation per atom, meV/atom.
        max_force_uncertainty: largest force-component standard deviation, meV/Å (None without
            member forces).
        thresholds: the uncertainty thresholds, or None when the model has no validation (or test) RMSEs.
        n_uncertain: steps 0..steps above a threshold. n_flagged: structures written to ``flagged``.
        too_close_count: calculations with atoms closer than the training minimum distance.
        min_distance: that distance, Å (None: unknown, not checked).
        trajectory, flagged: the files written (None when not requested).
    """

    steps: int
    n_atoms: int
    ensemble: str
    timestep_fs: float
    wall_time_s: float
    energy_drift: float | None
    max_energy_deviation: float | None
    mean_temperature: float
    mean_volume: float | None
    max_energy_uncertainty: float
    max_force_uncertainty: float | None
    thresholds: UncertaintyThresholds | None
    n_uncertain: int
    n_flagged: int
    too_close_count: int
    min_distance: float | None
    trajectory: str | None
    flagged: str | None

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.wall_time_s if self.wall_time_s > 0 else float("inf")

    def format(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"MD {self.ensemble.upper()}: {self.steps} steps of {self.timestep_fs:g} fs "
            f"({self.steps * self.timestep_fs / 1000:g} ps), {self.n_atoms} atoms, {self.wall_time_s:.1f} s "
            f"({self.steps_per_second:.0f} steps/s), mean temperature {self.mean_temperature:.0f} K"
            + (f", mean volume {self.mean_volume:.1f} Å³" if self.mean_volume is not None else ""),
        ]
        if self.energy_drift is not None:
            lines.append(f"{'conserved' if self.ensemble == 'npt' else 'total'} energy drift {self.energy_drift:.4f} meV/atom "
                         f"(max deviation {self.max_energy_deviation:.4f} meV/atom)")
        t = self.thresholds
        limits = (f" (thresholds {t.energy_per_atom * 1000:.2f} meV/atom, {t.forces * 1000:.0f} meV/Å)"
                  if t is not None else " (no thresholds: the model file has no validation RMSEs)")
        forces = ("not computed (mean forces only)" if self.max_force_uncertainty is None
                  else f"{self.max_force_uncertainty:.0f} meV/Å")
        lines.append(f"max uncertainty: energy {self.max_energy_uncertainty:.2f} meV/atom, forces {forces}{limits}")
        lines.append(f"uncertain steps: {self.n_uncertain}"
                     + (f"; {self.n_flagged} structures written to {self.flagged}" if self.flagged else ""))
        close = (f"{self.too_close_count} calculations with atoms closer than the training minimum "
                 f"{self.min_distance:.3f} Å"
                 if self.min_distance is not None else "not checked (no training minimum distance known)")
        lines.append(f"too-close atoms: {close}")
        if self.trajectory:
            lines.append(f"trajectory: {self.trajectory}")
        return "\n".join(lines)


def read_start(path: str | os.PathLike, index: int = 0) -> Atoms:
    """Structure ``index`` of an lmlp HDF5 file or of any file ASE reads (positions Å)."""
    if not Path(path).is_file():
        raise LmlpError(f"{path}: no such file")
    if Path(path).suffix.lower() in H5_SUFFIXES:
        s, _ = read_structures(path)
        if not -len(s) <= index < len(s):
            raise LmlpError(f"{path}: no structure {index} (the file has {len(s)})")
        atoms = s.atoms(index)
        atoms.calc = None
        return atoms
    return read_images(path, index=index)[0]


def make_dynamics(
    atoms: Atoms, ensemble: str, timestep_fs: float, temperature_K: float, friction_per_fs: float,
    rng: np.random.Generator, pressure_bar: float = 1.0,
) -> MolecularDynamics:
    """Velocity Verlet ("nve"), Langevin ("nvt") or MTK isotropic NPT ("npt": Nosé–Hoover chains,
    ASE's ``IsotropicMTKNPT``, external pressure ``pressure_bar``) dynamics of ``atoms``.

    Langevin keeps the centre of mass fixed with a ``FixCom`` constraint (added to ``atoms``), not
    with ``fixcm=True``, which for a 6-atom SN2 complex at 600 K heats it to about 1500 K.
    """
    if ensemble == "nve":
        return VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    if ensemble == "npt":
        dt = timestep_fs * units.fs
        return IsotropicMTKNPT(atoms, timestep=dt, temperature_K=temperature_K, pressure_au=pressure_bar * units.bar,
                               tdamp=NPT_THERMOSTAT_STEPS * dt, pdamp=NPT_BAROSTAT_STEPS * dt)
    atoms.set_constraint([*atoms.constraints, FixCom()])
    return Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature_K,
                    friction=friction_per_fs / units.fs, fixcm=False, rng=rng)


def _check_arguments(ensemble: str, temperature_K: float, timestep_fs: float, steps: int,
                     friction_per_fs: float, trajectory_interval: int) -> None:
    if ensemble not in ENSEMBLES:
        raise LmlpError(f"unknown ensemble {ensemble!r}; valid: {', '.join(ENSEMBLES)}")
    if steps < 0:
        raise LmlpError(f"steps must be >= 0, got {steps}")
    if not timestep_fs > 0:
        raise LmlpError(f"the time step must be > 0 fs, got {timestep_fs}")
    thermostat = ensemble in ("nvt", "npt")
    if not temperature_K >= 0 or (thermostat and temperature_K == 0):
        raise LmlpError(f"the temperature must be {'> 0' if thermostat else '>= 0'} K, got {temperature_K}")
    if ensemble == "nvt" and not friction_per_fs > 0:
        raise LmlpError(f"the Langevin friction must be > 0 per fs, got {friction_per_fs}")
    if trajectory_interval < 1:
        raise LmlpError(f"the trajectory interval must be >= 1 step, got {trajectory_interval}")


def run_md(
    model: str | os.PathLike | HDNNPEnsemble,
    start: str | os.PathLike | Atoms,
    ensemble: str = "nve",
    temperature_K: float = 300.0,
    timestep_fs: float = 0.5,
    steps: int = 1000,
    out_trajectory: str | os.PathLike | None = None,
    seed: int = 0,
    flagged_path: str | os.PathLike | None = None,
    friction_per_fs: float = 0.01,
    start_index: int = 0,
    trajectory_interval: int = 10,
    max_flagged: int = 100,
    flag_interval: int = 10,
    energy_factor: float = ENERGY_FACTOR,
    force_factor: float = FORCE_FACTOR,
    dtype: torch.dtype | None = None,
    min_distance: float | None = None,
    metadata: dict[str, Any] | None = None,
    observers: Sequence[tuple[Callable[[Atoms], None], int]] = (),
    threads: int | None = 1,
    progress: bool = False,
    pressure_bar: float = 1.0,
    backend: str = "script",
    member_forces: bool = True,
) -> MDSummary:
    """Run MD of ``start`` with the lMLP ``model`` and return a summary.

    Args:
        model: a model file or an ``HDNNPEnsemble`` (then ``metadata`` gives its validation RMSEs).
        start: a structure file (lmlp HDF5 or anything ASE reads; structure ``start_index``) or
            ``Atoms`` (copied).
        ensemble: "nve" (velocity Verlet), "nvt" (Langevin, ``friction_per_fs`` in 1/fs) or "npt"
            (MTK, isotropic cell fluctuations at ``pressure_bar``; needs a cell periodic in x, y, z).
        temperature_K: Maxwell–Boltzmann start velocities (zero centre-of-mass momentum) and, for
            NVT, the bath temperature, K.
        timestep_fs, steps: time step (fs) and number of steps.
        out_trajectory: ASE trajectory file, written every ``trajectory_interval`` steps.
        seed: seeds the start velocities and the Langevin noise.
        flagged_path: extxyz file for uncertain structures (``UncertaintyMonitor``: at most
            ``max_flagged``, at least ``flag_interval`` steps apart), with thresholds
            ``energy_factor`` and ``force_factor`` × the model's mean member validation RMSEs.
        dtype: precision of the lMLP (default: the model's; float64 for tight energy conservation).
        min_distance: training minimum interatomic distance, Å (default: from the model file).
        observers: extra (function, interval) pairs, called with the simulated ``Atoms``.
        threads: torch threads during the run (None: leave torch's setting). Small molecules are
            overhead-bound and run fastest on one; several threads can make every step wait for a
            busy core.
        progress: show a progress bar.
        pressure_bar: NPT external pressure, bar.
        backend: the calculator's kernel backend (``LMLPCalculator``).
        member_forces: compute every member's forces for the force uncertainty (``LMLPCalculator``);
            False: ensemble-mean forces only, faster for condensed systems, flagged by energy alone.
    """
    _check_arguments(ensemble, temperature_K, timestep_fs, steps, friction_per_fs, trajectory_interval)
    atoms = start.copy() if isinstance(start, Atoms) else read_start(start, start_index)
    if ensemble == "npt" and not atoms.pbc.all():
        raise LmlpError(f"NPT needs a cell periodic in x, y and z; the start structure has pbc {atoms.pbc.tolist()}")
    calc = LMLPCalculator(model, dtype=dtype, min_distance=min_distance, metadata=metadata, backend=backend,
                         member_forces=member_forces)
    thresholds = UncertaintyThresholds.from_metadata(calc.metadata, energy_factor, force_factor)
    if flagged_path is not None and thresholds is None:
        raise LmlpError("the model file has no validation or test RMSEs (metadata validation_rmse_e, test_rmse_e): "
                        "no uncertainty thresholds to flag structures with")
    atoms.calc = calc
    atoms.get_potential_energy()  # unknown elements fail here, before any file is written
    rng = np.random.default_rng(seed)
    if temperature_K > 0:
        thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
        Stationary(atoms)
    dyn = make_dynamics(atoms, ensemble, timestep_fs, temperature_K, friction_per_fs, rng, pressure_bar)
    monitor = UncertaintyMonitor(dyn, flagged_path, thresholds or UncertaintyThresholds(np.inf, np.inf),
                                 max_flagged, flag_interval)
    energy = _EnergyTracker(atoms, dyn)
    dyn.attach(monitor, interval=1)
    dyn.attach(energy, interval=1)
    for function, interval in observers:
        dyn.attach(function, interval, atoms)
    with _trajectory(dyn, out_trajectory, trajectory_interval):
        wall = _run(dyn, steps, threads, progress)
    per_atom = 1000.0 / len(atoms) if ensemble != "nvt" else None
    return MDSummary(
        steps=steps, n_atoms=len(atoms), ensemble=ensemble, timestep_fs=timestep_fs, wall_time_s=wall,
        energy_drift=abs(energy.last - energy.first) * per_atom if per_atom else None,
        max_energy_deviation=energy.max_deviation * per_atom if per_atom else None,
        mean_temperature=float(np.mean(energy.temperatures)),
        mean_volume=float(np.mean(energy.volumes)) if energy.volumes else None,
        max_energy_uncertainty=monitor.max_energy_uncertainty * 1000,
        max_force_uncertainty=monitor.max_force_uncertainty * 1000 if member_forces else None,
        thresholds=thresholds, n_uncertain=monitor.n_uncertain, n_flagged=monitor.n_written,
        too_close_count=calc.too_close_count, min_distance=calc.min_distance,
        trajectory=None if out_trajectory is None else str(out_trajectory),
        flagged=None if flagged_path is None else str(flagged_path),
    )


@contextlib.contextmanager
def _trajectory(dyn: MolecularDynamics, path: str | os.PathLike | None, interval: int) -> Iterator[None]:
    """Write ``dyn``'s atoms (with energy and forces) to an ASE trajectory every ``interval`` steps."""
    if path is None:
        yield
        return
    with Trajectory(path, "w", dyn.atoms) as trajectory:
        dyn.attach(trajectory.write, interval=interval)
        yield


def _run(dyn: MolecularDynamics, steps: int, threads: int | None, progress: bool) -> float:
    """Run ``steps`` steps on ``threads`` torch threads (with a progress bar if asked); return the
    wall time, s. Torch's thread count is restored afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with tqdm(total=steps, unit="step", disable=not progress, mininterval=0.5) as bar:
            dyn.attach(lambda: bar.update(dyn.nsteps - bar.n), interval=1)
            start = time.perf_counter()
            dyn.run(steps)
            return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
