"""Training batches: descriptors and derivatives equal the model's autograd path, periodic cells included."""

from __future__ import annotations

import numpy as np
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from lmlp.batch import compute_batch, predict
from lmlp.config import DescriptorConfig
from lmlp.data import StructureSet, concatenate
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.model import HDNNPEnsemble, fit_reference_energies


def periodic_and_molecular() -> StructureSet:
    """Two strained, rattled periodic Cu cells (images inside the cutoff) and a Cu cluster, EMT labels."""
    images = []
    for k, strain in enumerate((0.98, 1.03)):
        atoms = bulk("Cu", "fcc", a=3.61 * strain, cubic=True)
        atoms.rattle(0.05, seed=k)
        images.append(atoms)
    cluster = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)[:9]
    cluster.pbc = False
    cluster.cell = np.zeros((3, 3))
    images.append(cluster)
    for atoms in images:
        atoms.calc = EMT()
        atoms.get_forces()
    return concatenate([StructureSet.from_atoms(images[:2]), StructureSet.from_atoms(images[2:])])


def test_periodic_batches_equal_the_autograd_path():
    s = periodic_and_molecular()
    assert s.is_periodic and not s.pbc[2].any()
    sf = SymmetryFunctions.from_config(DescriptorConfig(cutoff=5.0, angular_cutoff=4.0), [29])
    arrays = [torch.from_numpy(a) for a in (s.numbers, s.positions, s.offsets, s.cell, s.pbc)]
    G = sf(*arrays)
    e_ref = torch.from_numpy(fit_reference_energies(s.numbers, s.offsets, s.energy, [29]))
    model = HDNNPEnsemble(sf, Standardizer.fit(G), [29], e_ref, hidden=[6], members=2).double()
    batch = compute_batch(s, sf, torch.float64)
    torch.testing.assert_close(batch.G, G, rtol=0, atol=1e-12)
    energies, forces = predict(model, batch)
    reference_energies, reference_forces = model(*arrays)
    torch.testing.assert_close(energies, reference_energies, rtol=0, atol=1e-9)
    torch.testing.assert_close(forces, reference_forces, rtol=0, atol=1e-9)
