"""Checks on structure sets: what makes a structure unusable for training.

Array-level problems (mismatched lengths, bad offsets) make the whole set unreadable. Structure
problems (non-finite energy, positions, forces or cell, unknown elements, atoms closer than
``MIN_DISTANCE``, degenerate periodic cells or ones thinner than that) either raise, naming the
structure, or drop the structure and report it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from ase.geometry import complete_cell
from ase.neighborlist import neighbor_list

from lmlp.data.structures import StructureSet
from lmlp.elements import MAX_Z, symbol
from lmlp.errors import DataError

MIN_DISTANCE = 0.5
"""Closest allowed distance between two atoms, Å."""

_BATCH_ELEMENTS = 2_000_000
"""Pair distances computed at once when checking molecules (bounds memory)."""


@dataclass(frozen=True)
class Problem:
    """Structure ``index`` is invalid for ``reason``."""

    index: int
    reason: str


def check_offsets(offsets: np.ndarray, n_atoms: int, source: str) -> None:
    """Raise ``DataError`` unless ``offsets`` start at 0, grow by at least 1 and end at ``n_atoms``."""
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 1):
        raise DataError(f"{source}: offsets must start at 0 and increase by at least 1 per structure")
    if offsets[-1] != n_atoms:
        raise DataError(f"{source}: offsets end at {offsets[-1]}, but there are {n_atoms} atoms")


def check_arrays(s: StructureSet, source: str) -> None:
    """Raise ``DataError`` if the flat arrays of ``s`` do not fit together."""
    n_atoms = len(s.numbers)
    for name in ("positions", "forces"):
        if len(getattr(s, name)) != n_atoms:
            raise DataError(f"{source}: {name} has {len(getattr(s, name))} rows, numbers has {n_atoms}")
    check_offsets(s.offsets, n_atoms, source)
    n = len(s.offsets) - 1
    for name in ("energy", "charge", "label"):
        if len(getattr(s, name)) != n:
            raise DataError(f"{source}: {name} has {len(getattr(s, name))} entries, expected {n} structures")
    if (s.cell is None) != (s.pbc is None):
        raise DataError(f"{source}: cell and pbc must be given together")
    for name in ("cell", "pbc", "trajectory"):
        value = getattr(s, name)
        if value is not None and len(value) != n:
            raise DataError(f"{source}: {name} has {len(value)} entries, expected {n} structures")
    for name, idx in s.split.items():
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise DataError(f"{source}: split {name!r} has indices outside 0..{n - 1}")
    if s.trajectory is not None and s.trajectory.size and s.trajectory.min() < 0:
        raise DataError(f"{source}: trajectory ids must be >= 0")


def find_problems(s: StructureSet) -> list[Problem]:
    """Every invalid structure of ``s`` with its first problem, in index order."""
    problems: dict[int, str] = {}

    def flag(indices: np.ndarray, reason) -> None:
        for i in np.flatnonzero(indices):
            problems.setdefault(int(i), reason(int(i)) if callable(reason) else reason)

    atom_to_structure = s.structure_index
    flag(~np.isfinite(s.energy), "non-finite energy")
    flag(_per_structure_any(~np.isfinite(s.positions).all(axis=1), atom_to_structure, len(s)),
         "non-finite position")
    flag(_per_structure_any(~np.isfinite(s.forces).all(axis=1), atom_to_structure, len(s)),
         "non-finite force")
    unknown = (s.numbers < 1) | (s.numbers > MAX_Z)
    first_unknown = {}
    for atom in np.flatnonzero(unknown)[::-1]:
        first_unknown[int(atom_to_structure[atom])] = int(s.numbers[atom])
    flag(_per_structure_any(unknown, atom_to_structure, len(s)),
         lambda i: f"unknown element {symbol(first_unknown[i])} (lmlp supports H to Xe)")
    if s.cell is not None:
        flag(~np.isfinite(s.cell).all(axis=(1, 2)), "non-finite cell")
        thin = np.zeros(len(s), dtype=bool)
        for i in np.flatnonzero(s.pbc.any(axis=1)):
            thin[i] = np.any(s.pbc[i] & ~(_face_distances(s.cell[i]) >= MIN_DISTANCE))
        flag(thin, f"periodic cell degenerate or thinner than {MIN_DISTANCE} Å")
    finite = np.array([i not in problems for i in range(len(s))], dtype=bool)
    close = _closest_pairs(s, finite)
    flag(close[:, 0] < MIN_DISTANCE,
         lambda i: f"atoms {int(close[i, 1])} and {int(close[i, 2])} are {close[i, 0]:.3f} Å apart "
                   f"(< {MIN_DISTANCE} Å)")
    return [Problem(i, problems[i]) for i in sorted(problems)]


def validate(
    s: StructureSet, source: str, on_invalid: Literal["raise", "skip"] = "raise"
) -> tuple[StructureSet, list[Problem]]:
    """Check ``s``; return it (without invalid structures when ``on_invalid="skip"``) and the problems.

    With ``on_invalid="raise"`` the first invalid structure raises a one-line ``DataError``
    naming the source, structure index, label and problem.
    """
    check_arrays(s, source)
    problems = find_problems(s)
    if not problems:
        return s, []
    if on_invalid == "raise":
        first = problems[0]
        more = f"; {len(problems) - 1} more invalid structures" if len(problems) > 1 else ""
        raise DataError(
            f"{source}: structure {first.index} ({s.label[first.index]}): {first.reason}{more} "
            "(skip invalid structures with --skip-invalid / on_invalid: skip)"
        )
    keep = np.setdiff1d(np.arange(len(s)), [p.index for p in problems])
    new_index = np.full(len(s), -1)
    new_index[keep] = np.arange(len(keep))
    kept = s.subset(keep)
    split = {name: new_index[idx][new_index[idx] >= 0] for name, idx in s.split.items()}
    return replace(kept, split=split), problems


def _per_structure_any(atom_flags: np.ndarray, atom_to_structure: np.ndarray, n: int) -> np.ndarray:
    """(n,) True where any atom of the structure is flagged."""
    return np.bincount(atom_to_structure[atom_flags], minlength=n) > 0


def _face_distances(cell: np.ndarray) -> np.ndarray:
    """(3,) distances between opposite faces of a cell, Å, with zero vectors completed as ASE does.

    Zero for a zero vector's direction, NaN for a cell that is not finite or is degenerate.
    """
    scale = np.abs(cell).max()
    if scale == 0:
        return np.zeros(3)
    if not np.isfinite(scale):
        return np.full(3, np.nan)
    c = complete_cell(cell / scale)  # scaled to 1, so that nothing below overflows
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        faces = np.linalg.norm(np.cross(np.roll(c, -1, axis=0), np.roll(c, -2, axis=0)), axis=1)
        return np.where(cell.any(axis=1), abs(np.linalg.det(c)) / faces * scale, 0.0)


def _closest_pairs(s: StructureSet, mask: np.ndarray) -> np.ndarray:
    """(n, 3) per structure: closest distance (Å) and the two atom indices; inf where not checked.

    Molecules are handled in batches of equal size; periodic structures use ASE's neighbour list
    (minimum image included).
    """
    out = np.full((len(s), 3), np.inf)
    out[:, 1:] = -1
    counts = s.n_atoms
    periodic = s.pbc.any(axis=1) if s.pbc is not None else np.zeros(len(s), dtype=bool)
    for size in np.unique(counts[mask & ~periodic]):
        if size < 2:
            continue
        group = np.flatnonzero((counts == size) & mask & ~periodic)
        for idx in np.array_split(group, max(1, len(group) * size * size // _BATCH_ELEMENTS)):
            rows = s.offsets[idx][:, None] + np.arange(size)
            pos = s.positions[rows]
            d = np.linalg.norm(pos[:, :, None, :] - pos[:, None, :, :], axis=-1)
            d[:, np.arange(size), np.arange(size)] = np.inf
            flat = d.reshape(len(idx), -1).argmin(axis=1)
            out[idx, 0] = d.reshape(len(idx), -1)[np.arange(len(idx)), flat]
            out[idx, 1], out[idx, 2] = np.divmod(flat, size)
    for i in np.flatnonzero(mask & periodic):
        first, second, dist = neighbor_list("ijd", s.atoms(int(i)), MIN_DISTANCE)
        if len(dist):
            k = dist.argmin()
            out[i] = dist[k], first[k], second[k]
    return out
