"""Neighbour pairs and triples on flat atom arrays.

A batch of structures is given as flat arrays: ``positions`` (N, 3) Å and per-structure atom
``offsets`` (S + 1,). Pairs are directed: ``pairs[:, p] = (i, j)`` means atom j is within the
cutoff of centre i; ``vectors[p] = R_j − R_i (+ cell shift)`` in Å. Triples are unordered
neighbour pairs (j < k in pair order) of one centre, given as two pair indices.

Small molecules of a batch share one vectorised all-pairs search; periodic and larger structures
use vesin's cell list (linear in the number of atoms in time and memory), one call per structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vesin import NeighborList

from lmlp.errors import DataError

ALL_PAIRS_MAX_ATOMS = 256
"""Molecules up to this size use the dense all-pairs search; larger ones vesin's cell list."""


@dataclass
class Neighbors:
    """Directed neighbour pairs of a batch.

    Attributes:
        pairs: (2, P) int64 centre and neighbour atom indices.
        shifts: (P, 3) float Cartesian image shifts in Å (zero for molecules).
    """

    pairs: torch.Tensor
    shifts: torch.Tensor

    def vectors(self, positions: torch.Tensor) -> torch.Tensor:
        """(P, 3) R_j − R_i + shift in Å; differentiable in ``positions``."""
        return positions[self.pairs[1]] - positions[self.pairs[0]] + self.shifts


def find_neighbors(
    positions: torch.Tensor,
    offsets: torch.Tensor,
    cutoff: float,
    cells: torch.Tensor | None = None,
    pbc: torch.Tensor | None = None,
) -> Neighbors:
    """All directed pairs (i, j), i ≠ j (or periodic images), with |R_j − R_i + shift| < cutoff.

    Args:
        positions: (N, 3) Å.
        offsets: (S + 1,) atom offsets of the S structures.
        cutoff: Å.
        cells: (S, 3, 3) Å cell vectors (rows), or None for molecules.
        pbc: (S, 3) bool periodic directions, or None.

    Raises:
        DataError: a structure is periodic along cell vectors that span no volume (area, length).
    """
    counts = (offsets[1:] - offsets[:-1]).cpu()
    periodic = pbc.any(dim=1).cpu() if pbc is not None else torch.zeros(len(counts), dtype=torch.bool)
    dense = ~periodic & (counts <= ALL_PAIRS_MAX_ATOMS)
    parts = [_all_pairs(positions, offsets.cpu(), counts, dense, cutoff)]
    for s in torch.nonzero(~dense).flatten().tolist():
        parts.append(_cell_list_pairs(positions, int(offsets[s]), int(offsets[s + 1]), cutoff,
                                      None if cells is None else cells[s], None if pbc is None else pbc[s]))
    pairs = torch.cat([p for p, _ in parts], dim=1).to(positions.device)
    shifts = torch.cat([s for _, s in parts]).to(device=positions.device, dtype=positions.dtype)
    return Neighbors(pairs=pairs, shifts=shifts)


def _all_pairs(
    positions: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, use: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs within ``cutoff`` of every structure flagged in ``use``, from all intra-structure pairs."""
    counts = torch.where(use, counts, torch.zeros_like(counts))
    n_pairs = counts * counts
    structure = torch.repeat_interleave(torch.arange(len(counts)), n_pairs)
    first = torch.cumsum(n_pairs, 0) - n_pairs
    local = torch.arange(int(n_pairs.sum())) - first[structure]
    size = counts[structure]
    i = offsets[:-1][structure] + local // size
    j = offsets[:-1][structure] + local % size
    keep = i != j
    i, j = i[keep], j[keep]
    with torch.no_grad():
        d = (positions[j.to(positions.device)] - positions[i.to(positions.device)]).norm(dim=1).cpu()
    keep = d < cutoff
    pairs = torch.stack([i[keep], j[keep]])
    return pairs, torch.zeros(pairs.shape[1], 3, dtype=torch.float64)


def _cell_list_pairs(
    positions: torch.Tensor, start: int, end: int, cutoff: float, cell: torch.Tensor | None,
    pbc: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, P) pairs and (P, 3) float64 Cartesian shifts in Å of atoms ``start:end`` from vesin's
    cell list, periodic images included, on ``torch.get_num_threads()`` threads.

    vesin ignores the cell along non-periodic directions, so a molecule's cell and a slab's third
    vector may be zero; periodic directions need cell vectors that span a volume (area, length).
    """
    box = np.zeros((3, 3)) if cell is None else cell.detach().cpu().double().numpy()
    periodic = np.zeros(3, dtype=bool) if pbc is None else np.asarray(pbc.cpu(), dtype=bool)
    if np.linalg.matrix_rank(box[periodic]) < periodic.sum():
        raise DataError(f"the structure of atoms {start} to {end - 1} is periodic along {periodic.tolist()} "
                        f"but its cell vectors there, {box[periodic].tolist()} Å, are zero or linearly dependent")
    search = NeighborList(cutoff=cutoff, full_list=True, n_threads=torch.get_num_threads())
    ij, shifts = search.compute(positions[start:end].detach().cpu().double().numpy(), box, periodic, "PS")
    pairs = torch.from_numpy(ij.T.astype(np.int64) + start)
    return pairs, torch.from_numpy(shifts @ box)


def find_triples(pairs: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """(2, Q) pair indices (p, q), p < q, of every two pairs that share their centre atom.

    Args:
        pairs: (2, P) directed pairs, any order.
        n_atoms: number of atoms N.
    """
    centre = pairs[0]
    order = torch.argsort(centre, stable=True)
    counts = torch.bincount(centre, minlength=n_atoms)
    start = torch.cumsum(counts, 0) - counts
    n_combos = counts * counts
    atom = torch.repeat_interleave(torch.arange(n_atoms, device=pairs.device), n_combos)
    local = torch.arange(int(n_combos.sum()), device=pairs.device) - (torch.cumsum(n_combos, 0) - n_combos)[atom]
    a, b = local // counts[atom], local % counts[atom]
    keep = a < b
    first = order[start[atom[keep]] + a[keep]]
    second = order[start[atom[keep]] + b[keep]]
    return torch.stack([first, second])
