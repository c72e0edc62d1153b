"""Displaced copies of training structures ("rattling"): labelled data off the sampled MD manifold.

MD frames sample the Boltzmann distribution of the sampling temperature, so a potential trained on
them alone has seen few geometries with large forces. Displacing every atom of a frame by a few
hundredths of an ångström and labelling the copy with the same reference method adds such
geometries cheaply. A copy keeps its source's trajectory id and split, so splits by trajectory
stay honest: a copy never lands on the other side of its source.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms

from lmlp.data.structures import StructureSet, concatenate
from lmlp.errors import LmlpError
from lmlp.reference.labellers import Labeller, label_structures


def displaced(atoms: Atoms, rng: np.random.Generator, sigma: tuple[float, float]) -> Atoms:
    """A copy of ``atoms`` (positions, cell, pbc, info) with every atom moved by a Gaussian of
    root-mean-square length σ ~ U(``sigma``) Å (each Cartesian component σ/√3)."""
    width = rng.uniform(*sigma) / np.sqrt(3.0)
    return Atoms(atoms.numbers, positions=atoms.positions + rng.normal(0.0, width, atoms.positions.shape),
                 cell=atoms.cell, pbc=atoms.pbc, info=dict(atoms.info))


def augment(
    s: StructureSet, copies: int, sigma: tuple[float, float], seed: int, labeller: Labeller,
    split: str = "train", progress: bool = False,
) -> tuple[StructureSet, int]:
    """``s`` with ``copies`` labelled displaced copies of structures of its split ``split`` appended.

    Sources are drawn uniformly from the split (without replacement while ``copies`` does not exceed
    it), each copy displaced by ``displaced`` and labelled with ``labeller``, which must be the
    method ``s`` was labelled with. The copies join ``split`` and keep their source's label, charge
    and trajectory id; copies whose reference calculation fails are left out. The attribute
    ``augmentation`` records what was done. Returns the new set and the number of failed labels.
    """
    if copies < 1:
        raise LmlpError(f"copies must be >= 1, got {copies}")
    if not 0.0 < sigma[0] <= sigma[1]:
        raise LmlpError(f"sigma must be two displacements 0 < low <= high (Å), got {list(sigma)}")
    if split not in s.split or not len(s.split[split]):
        raise LmlpError(f"the structures have no (or an empty) split {split!r}; they have {sorted(s.split) or 'none'}")
    method = s.attrs.get("method")
    if method != labeller.method:
        raise LmlpError(f"the structures were labelled with {method!r}, not {labeller.method!r}: "
                        f"their energies cannot be mixed (use --method for the same method)")
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    pool = s.split[split]
    sources = rng.choice(pool, size=copies, replace=copies > len(pool))
    images = [displaced(s.atoms(int(i)), rng, sigma) for i in sources]
    for atoms in images:
        atoms.info["split"] = split
    labelled, failed = label_structures(images, labeller, progress)
    if not labelled:
        raise LmlpError(f"every reference calculation of the {copies} displaced copies failed")
    merged = concatenate([s, StructureSet.from_atoms(labelled)], keep_splits=True)
    if s.trajectory is not None:  # concatenate would renumber the copies' shared trajectory ids
        merged.trajectory = np.concatenate([s.trajectory, s.trajectory[np.delete(sources, failed)]])
    note = (f"{len(labelled)} displaced copies of {split} structures (rms displacement per atom "
            f"{sigma[0]:g}-{sigma[1]:g} A, seed {seed}, {labeller.method}) appended to {split}")
    previous = s.attrs.get("augmentation")
    merged.attrs = {**s.attrs, "augmentation": f"{previous}; {note}" if previous else note}
    return merged, len(failed)
