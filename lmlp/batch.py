"""Cached descriptors of a structure set, ready for the model (computed once, not per epoch).

A ``Batch`` holds the descriptors G and dG/dR of every atom with the reference labels; ``select``
takes whole structures out of it, ``chunks`` cuts it for evaluation. Energies eV, forces eV/Å.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lmlp.data import StructureSet
from lmlp.descriptors import CentreDerivatives, SymmetryFunctions
from lmlp.model import HDNNPEnsemble

STRUCTURES_PER_CHUNK = 500
"""Structures per descriptor computation (bounds temporaries, keeps the cache-friendly size)."""


@dataclass
class Batch:
    """Descriptors and labels of a set of structures, ready for the model.

    Attributes:
        numbers: (N,) atomic numbers. offsets: (S + 1,) atom offsets.
        G: (N, F) descriptors. derivatives: dG/dR grouped by centre atom.
        energy: (S,) float64 reference energies, eV. forces: (N, 3) reference forces, eV/Å.
    """

    numbers: torch.Tensor
    offsets: torch.Tensor
    G: torch.Tensor
    derivatives: CentreDerivatives
    energy: torch.Tensor
    forces: torch.Tensor

    @property
    def n_atoms(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def structure_of_atom(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.energy), device=self.energy.device), self.n_atoms)

    def select(self, indices: torch.Tensor) -> Batch:
        """The structures ``indices`` (sorted), with atom indices renumbered."""
        indices = indices.to(self.energy.device)
        keep = torch.zeros(len(self.energy), dtype=torch.bool, device=self.energy.device)
        keep[indices] = True
        atom_keep = keep[self.structure_of_atom]
        new_atom = torch.cumsum(atom_keep, 0) - 1
        atoms = torch.nonzero(atom_keep).flatten()
        return Batch(
            numbers=self.numbers[atoms],
            offsets=torch.cat([self.offsets.new_zeros(1), torch.cumsum(self.n_atoms[indices], 0)]),
            G=self.G[atoms],
            derivatives=self.derivatives.select(atoms, new_atom),
            energy=self.energy[indices],
            forces=self.forces[atoms],
        )


    @staticmethod
    def cat(pieces: list[Batch]) -> Batch:
        """The structures of ``pieces`` in one batch (derivatives padded to the widest)."""
        if len(pieces) == 1:
            return pieces[0]
        atom_starts = np.cumsum([0] + [len(p.numbers) for p in pieces[:-1]]).tolist()
        return Batch(
            numbers=torch.cat([p.numbers for p in pieces]),
            offsets=torch.cat([pieces[0].offsets.new_zeros(1)]
                              + [p.offsets[1:] + a for p, a in zip(pieces, atom_starts)]),
            G=torch.cat([p.G for p in pieces]),
            derivatives=CentreDerivatives.cat([p.derivatives for p in pieces], atom_starts),
            energy=torch.cat([p.energy for p in pieces]),
            forces=torch.cat([p.forces for p in pieces]),
        )


    def to(self, device: torch.device) -> Batch:
        """This batch on ``device``."""
        if self.energy.device == device:
            return self
        return Batch(self.numbers.to(device), self.offsets.to(device), self.G.to(device),
                     CentreDerivatives(self.derivatives.values.to(device), self.derivatives.atom.to(device)),
                     self.energy.to(device), self.forces.to(device))


def structure_chunks(s: StructureSet, dtype: torch.dtype = torch.float64) -> Iterator[tuple[int, tuple]]:
    """Blocks of ``STRUCTURES_PER_CHUNK`` structures of ``s`` as (first atom, (numbers (N,),
    positions (N, 3) Å, offsets, cells (S, 3, 3) Å or None, pbc (S, 3) or None)): the arguments of
    ``SymmetryFunctions`` and ``find_neighbors``, lengths in ``dtype``."""
    for start in range(0, len(s), STRUCTURES_PER_CHUNK):
        part = s.subset(np.arange(start, min(start + STRUCTURES_PER_CHUNK, len(s))))
        yield int(s.offsets[start]), (
            torch.from_numpy(part.numbers), torch.from_numpy(part.positions).to(dtype), torch.from_numpy(part.offsets),
            None if part.cell is None else torch.from_numpy(part.cell).to(dtype),
            None if part.pbc is None else torch.from_numpy(part.pbc))


def compute_batch(s: StructureSet, descriptor: SymmetryFunctions, dtype: torch.dtype) -> Batch:
    """Descriptors and derivatives of every structure of ``s`` (periodic images included), computed
    once in chunks."""
    G_parts, derivative_parts, starts = [], [], []
    for first_atom, arrays in structure_chunks(s, dtype):
        G, d = descriptor.with_derivatives(*arrays)
        G_parts.append(G)
        derivative_parts.append(d.by_centre(len(arrays[0])))
        starts.append(first_atom)
    return Batch(
        numbers=torch.from_numpy(s.numbers),
        offsets=torch.from_numpy(s.offsets),
        G=torch.cat(G_parts),
        derivatives=CentreDerivatives.cat(derivative_parts, starts),
        energy=torch.from_numpy(s.energy),
        forces=torch.from_numpy(s.forces).to(dtype),
    )


def predict(model: HDNNPEnsemble, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies (M, S) eV and forces (M, N, 3) eV/Å of every member (differentiable in the weights
    unless grad mode is off)."""
    return model.from_descriptors(batch.G, batch.derivatives, batch.numbers, batch.offsets)


def chunks(batch: Batch) -> list[Batch]:
    """``batch`` cut into pieces of ``STRUCTURES_PER_CHUNK`` structures (for evaluation)."""
    n = len(batch.energy)
    return [batch.select(torch.arange(a, min(a + STRUCTURES_PER_CHUNK, n))) for a in range(0, n, STRUCTURES_PER_CHUNK)]


def predict_all(model: HDNNPEnsemble, pieces: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies (M, S) eV and forces (M, N, 3) eV/Å of every member over all ``pieces``, float64."""
    with torch.no_grad():
        predictions = [predict(model, piece) for piece in pieces]
    return torch.cat([e.double() for e, _ in predictions], 1), torch.cat([f.double() for _, f in predictions], 1)
