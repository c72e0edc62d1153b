"""In-memory structure sets: flat per-atom arrays with per-structure offsets.

A ``StructureSet`` holds ``n`` structures with ``N`` atoms in all. Structure ``i`` owns the atom
rows ``offsets[i]:offsets[i+1]`` of every per-atom array. Units: Å, eV, eV/Å, elementary charge.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field, replace

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from lmlp.errors import DataError


@dataclass
class StructureSet:
    """A set of labelled structures as flat arrays.

    Attributes:
        numbers: (N,) int64 atomic numbers.
        positions: (N, 3) float64 Cartesian positions, Å.
        forces: (N, 3) float64 reference forces, eV/Å.
        offsets: (n + 1,) int64 atom offsets; structure i is rows offsets[i]:offsets[i+1].
        energy: (n,) float64 reference total energies, eV.
        charge: (n,) int64 total charges, e.
        label: (n,) str labels, e.g. the reaction ``"F+CH3Cl"``.
        cell: (n, 3, 3) float64 cell vectors in Å, or None for molecules.
        pbc: (n, 3) bool periodic directions, or None for molecules.
        trajectory: (n,) int64 id of the MD trajectory (or other sampling run) each structure
            comes from, or None when unknown; structures of one trajectory are correlated, so
            ``split_indices`` keeps each trajectory on one side of a split.
        split: named structure-index arrays, e.g. ``{"train": ..., "validation": ..., "test": ...}``.
        attrs: provenance strings: method, program, program_version, command, created.
    """

    numbers: np.ndarray
    positions: np.ndarray
    forces: np.ndarray
    offsets: np.ndarray
    energy: np.ndarray
    charge: np.ndarray
    label: np.ndarray
    cell: np.ndarray | None = None
    pbc: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    split: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.forces = np.asarray(self.forces, dtype=np.float64).reshape(-1, 3)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.energy = np.asarray(self.energy, dtype=np.float64)
        self.charge = np.asarray(self.charge, dtype=np.int64)
        self.label = np.asarray(self.label, dtype=object)
        if self.cell is not None:
            self.cell = np.asarray(self.cell, dtype=np.float64).reshape(-1, 3, 3)
        if self.pbc is not None:
            self.pbc = np.asarray(self.pbc, dtype=bool).reshape(-1, 3)
        if self.trajectory is not None:
            self.trajectory = np.asarray(self.trajectory, dtype=np.int64)
        self.split = {k: np.asarray(v, dtype=np.int64) for k, v in self.split.items()}

    def __len__(self) -> int:
        return len(self.energy)

    @property
    def n_atoms(self) -> np.ndarray:
        """(n,) number of atoms per structure."""
        return np.diff(self.offsets)

    @property
    def structure_index(self) -> np.ndarray:
        """(N,) index of the structure each atom belongs to."""
        return np.repeat(np.arange(len(self)), self.n_atoms)

    @property
    def is_periodic(self) -> bool:
        return self.pbc is not None and bool(self.pbc.any())

    def atoms(self, i: int) -> Atoms:
        """Structure ``i`` as ASE ``Atoms`` with a single-point calculator holding its labels."""
        a, b = self.offsets[i], self.offsets[i + 1]
        atoms = Atoms(
            numbers=self.numbers[a:b],
            positions=self.positions[a:b],
            cell=None if self.cell is None else self.cell[i],
            pbc=False if self.pbc is None else self.pbc[i],
        )
        atoms.info["charge"] = int(self.charge[i])
        atoms.info["label"] = str(self.label[i])
        if self.trajectory is not None:
            atoms.info["trajectory"] = int(self.trajectory[i])
        for name, idx in self.split.items():
            if np.any(idx == i):
                atoms.info["split"] = name
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(self.energy[i]), forces=self.forces[a:b].copy()
        )
        return atoms

    def subset(self, indices: np.ndarray) -> StructureSet:
        """The structures ``indices`` (in that order); splits are dropped, attrs kept."""
        indices = np.asarray(indices, dtype=np.int64)
        counts = self.n_atoms[indices]
        starts = self.offsets[indices]
        rows = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        rows = rows + np.arange(counts.sum())
        return replace(
            self,
            numbers=self.numbers[rows],
            positions=self.positions[rows],
            forces=self.forces[rows],
            offsets=np.concatenate([[0], np.cumsum(counts)]),
            energy=self.energy[indices],
            charge=self.charge[indices],
            label=self.label[indices],
            cell=None if self.cell is None else self.cell[indices],
            pbc=None if self.pbc is None else self.pbc[indices],
            trajectory=None if self.trajectory is None else self.trajectory[indices],
            split={},
            attrs=dict(self.attrs),
        )

    def split_subset(self, name: str) -> StructureSet:
        """The structures of split ``name`` (e.g. ``"train"``)."""
        if name not in self.split:
            raise DataError(f"no split named {name!r}; the set has {sorted(self.split) or 'none'}")
        return self.subset(self.split[name])

    @classmethod
    def from_atoms(cls, images: list[Atoms], default_charge: int = 0, source: str = "") -> StructureSet:
        """Build a set from ASE ``Atoms`` whose calculators carry energy and forces.

        Charge comes from ``atoms.info["charge"]`` (else ``default_charge``), the label from
        ``atoms.info["label"]`` (else the chemical formula), the split and the trajectory id from
        ``atoms.info["split"]`` and ``atoms.info["trajectory"]`` when every image has one.
        ``source`` names the input in errors.
        """
        where = f"{source}: " if source else ""
        energies, forces, charges = [], [], []
        for i, atoms in enumerate(images):
            energy, frc = _energy_and_forces(atoms, f"{where}structure {i}")
            energies.append(energy)
            forces.append(frc)
            charges.append(_charge(atoms.info.get("charge", default_charge), f"{where}structure {i}"))
        counts = [len(a) for a in images]
        periodic = any(a.pbc.any() for a in images)
        splits = [a.info.get("split") for a in images]
        split = {}
        if images and all(s is not None for s in splits):
            for i, name in enumerate(splits):
                _check_split_name(name, f"{where}structure {i}")
            names = np.asarray(splits, dtype=object)
            split = {s: np.flatnonzero(names == s) for s in dict.fromkeys(splits)}
        trajectories = [a.info.get("trajectory") for a in images]
        trajectory = None
        if images and all(t is not None for t in trajectories):
            trajectory = np.asarray([_trajectory(t, f"{where}structure {i}") for i, t in enumerate(trajectories)])
        return cls(
            numbers=np.concatenate([a.numbers for a in images]) if images else np.zeros(0),
            positions=np.concatenate([a.positions for a in images]) if images else np.zeros((0, 3)),
            forces=np.concatenate(forces) if images else np.zeros((0, 3)),
            offsets=np.concatenate([[0], np.cumsum(counts)]),
            energy=np.asarray(energies),
            charge=np.asarray(charges, dtype=np.int64),
            label=np.asarray([str(a.info.get("label", a.get_chemical_formula())) for a in images]),
            cell=np.stack([a.cell.array for a in images]) if periodic else None,
            pbc=np.stack([a.pbc for a in images]) if periodic else None,
            trajectory=trajectory,
            split=split,
        )


_INT16 = np.iinfo(np.int16)
"""Range of the charges the HDF5 layout stores."""


def _energy_and_forces(atoms: Atoms, where: str) -> tuple[float, np.ndarray]:
    """Energy (eV) and (n, 3) forces (eV/Å) of ``atoms``' calculator; ``DataError`` unless numbers."""
    results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
    for name in ("energy", "forces"):
        if name not in results:
            raise DataError(f"{where}: missing {name}")
    energy = np.asarray(results["energy"])
    if energy.shape != () or energy.dtype.kind not in "iuf":
        raise DataError(f"{where}: energy {reprlib.repr(results['energy'])} is not a number")
    forces = np.asarray(results["forces"])
    if forces.dtype.kind not in "iuf":
        raise DataError(f"{where}: forces are not numbers")
    if forces.shape != (len(atoms), 3):
        raise DataError(f"{where}: forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
    return float(energy), forces.astype(np.float64)


def _charge(value: object, where: str) -> int:
    """``value`` as a charge in e: a whole number that fits the file format (int16); else ``DataError``."""
    number = np.asarray(value)
    whole = number.shape == () and (
        number.dtype.kind in "iu" or number.dtype.kind == "f" and float(number).is_integer()
    )
    if not whole or not _INT16.min <= int(number) <= _INT16.max:
        raise DataError(f"{where}: charge {reprlib.repr(value)} is not an integer between "
                        f"{_INT16.min} and {_INT16.max}")
    return int(number)


def _trajectory(value: object, where: str) -> int:
    """``value`` as a trajectory id: a non-negative whole number; else ``DataError``."""
    number = np.asarray(value)
    if number.shape != () or number.dtype.kind not in "iu" or int(number) < 0:
        raise DataError(f"{where}: trajectory {reprlib.repr(value)} is not a non-negative integer")
    return int(number)


def _check_split_name(name: object, where: str) -> None:
    """``DataError`` unless ``name`` is text that can name the split's HDF5 dataset."""
    if not isinstance(name, str) or name in ("", ".") or "/" in name or "\0" in name:
        raise DataError(f"{where}: split {reprlib.repr(name)} is not a name (text, not '.', without '/')")


def concatenate(sets: list[StructureSet], keep_splits: bool = False) -> StructureSet:
    """Join structure sets in order, attrs of the first set kept. Splits are dropped, or with
    ``keep_splits`` joined by name (renumbered); then every set must have a split. Trajectory ids
    are kept when every set has them, as they are if the sets share none, else shifted so that
    they share none."""
    if not sets:
        raise DataError("nothing to concatenate")
    periodic = any(s.cell is not None for s in sets)

    def cells(s: StructureSet) -> np.ndarray:
        return s.cell if s.cell is not None else np.zeros((len(s), 3, 3))

    def pbcs(s: StructureSet) -> np.ndarray:
        return s.pbc if s.pbc is not None else np.zeros((len(s), 3), dtype=bool)

    starts = np.cumsum([0] + [s.offsets[-1] for s in sets[:-1]])
    split: dict[str, np.ndarray] = {}
    if keep_splits:
        if not all(s.split for s in sets):
            raise DataError("every structure set needs a stored split to join the splits")
        first = np.cumsum([0] + [len(s) for s in sets[:-1]])
        for name in dict.fromkeys(k for s in sets for k in s.split):
            split[name] = np.concatenate([s.split.get(name, np.zeros(0, np.int64)) + f for s, f in zip(sets, first)])
    trajectory = None
    if all(s.trajectory is not None for s in sets):
        ids = [np.unique(s.trajectory) for s in sets]
        disjoint = len(np.unique(np.concatenate(ids))) == sum(map(len, ids))
        shifts = [0] * len(sets) if disjoint else np.cumsum([0] + [int(s.trajectory.max(initial=-1)) + 1 for s in sets[:-1]])
        trajectory = np.concatenate([s.trajectory + shift for s, shift in zip(sets, shifts)])
    return StructureSet(
        numbers=np.concatenate([s.numbers for s in sets]),
        positions=np.concatenate([s.positions for s in sets]),
        forces=np.concatenate([s.forces for s in sets]),
        offsets=np.concatenate([[0]] + [s.offsets[1:] + o for s, o in zip(sets, starts)]),
        energy=np.concatenate([s.energy for s in sets]),
        charge=np.concatenate([s.charge for s in sets]),
        label=np.concatenate([s.label for s in sets]),
        cell=np.concatenate([cells(s) for s in sets]) if periodic else None,
        pbc=np.concatenate([pbcs(s) for s in sets]) if periodic else None,
        trajectory=trajectory,
        attrs=dict(sets[0].attrs),
        split=split,
    )


SPLITS = ("train", "validation", "test")
"""The split names lmlp trains with: fit, choose epochs and hyperparameters, report once."""


def stratified_split(
    label: np.ndarray, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, np.ndarray]:
    """A seeded two-way train/test split that takes ``test_fraction`` of every label group
    (``split_indices`` with no validation part)."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test fraction must be in [0, 1), got {test_fraction}")
    return split_indices(label, (1.0 - test_fraction, 0.0, test_fraction), seed)


def split_indices(
    label: np.ndarray, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """A seeded train/validation/test split, stratified by label.

    Args:
        label: (n,) structure labels; each label group contributes ``fractions`` of its
            structures to the splits. Labels that occur only once are pooled into one group.
        fractions: train, validation and test fractions (each >= 0, summing to 1).
        seed: seed of the random assignment.
        groups: (n,) ids of correlated structures (e.g. MD trajectories) that must stay on one
            side; a group takes the label of its first structure. None: structures one by one.

    Returns sorted structure indices per split name (``SPLITS``); an empty validation split is
    left out. Per label group, the units (structures or groups) are shuffled and dealt to test,
    then validation, then train, a unit going where the middle of its structures falls, so that
    the structure counts come as close to the fractions as whole groups allow.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9 or fractions[0] == 0:
        raise DataError(f"split fractions must be three numbers >= 0 (train > 0) that sum to 1, got {list(fractions)}")
    label = np.asarray(label, dtype=str)
    n = len(label)
    units = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    first = np.unique(units, return_index=True)[1]  # the first structure of every unit
    sizes = np.bincount(units)
    names, unit_label, counts = np.unique(label[first], return_inverse=True, return_counts=True)
    unit_label = np.where(counts[unit_label] > 1, unit_label, len(names))
    rng = np.random.default_rng(seed)
    side = np.zeros(len(first), dtype=np.int64)  # index into SPLITS: 0 train, 1 validation, 2 test
    bounds = np.array([fractions[2], fractions[2] + fractions[1]])
    for g in np.unique(unit_label):
        members = rng.permutation(np.flatnonzero(unit_label == g))
        total = sizes[members].sum()
        if groups is None:
            n_test, n_val = (int(round(f * total)) for f in fractions[:0:-1])
            rank = np.arange(len(members))
            side[members] = np.where(rank < n_test, 2, np.where(rank < n_test + n_val, 1, 0))
        else:
            middle = np.cumsum(sizes[members]) - sizes[members] / 2
            side[members] = np.where(middle < bounds[0] * total, 2, np.where(middle < bounds[1] * total, 1, 0))
    structure_side = side[units]
    split = {name: np.flatnonzero(structure_side == k) for k, name in enumerate(SPLITS)}
    if not len(split["validation"]):
        del split["validation"]
    return split


def resplit(s: StructureSet, by: str = "trajectory", fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
            seed: int = 0) -> StructureSet:
    """``s`` with a new stored split, stratified by label: whole trajectories (``by="trajectory"``,
    needs ``s.trajectory``) or single structures (``by="random"``) dealt to train, validation and test."""
    if by not in ("trajectory", "random"):
        raise DataError(f"split by {by!r}: expected 'trajectory' or 'random'")
    if by == "trajectory" and s.trajectory is None:
        raise DataError("the structures have no trajectory ids (/structures/trajectory), so they cannot be "
                        "split by trajectory; split with by='random' (--by random), or regenerate the data")
    split = split_indices(s.label, fractions, seed, s.trajectory if by == "trajectory" else None)
    described = "/".join(f"{f:g}" for f in fractions)
    return replace(s, split=split, attrs={**s.attrs, "split": f"by {by}, train/validation/test {described}, seed {seed}"})
