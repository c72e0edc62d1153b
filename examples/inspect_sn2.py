"""Scripting lmlp's Python API: load the shipped SN2 data, compute eeACSFs, evaluate a model.

Run: ``.venv/bin/python examples/inspect_sn2.py [runs/sn2-quick/model.pt]``
"""

import sys

import numpy as np
import torch

from lmlp.config import DescriptorConfig
from lmlp.data import read_structures, summarize
from lmlp.descriptors import SymmetryFunctions

summary = summarize("data/sn2_gfn2xtb.h5")
print(f"{summary.n_structures} structures, reactions: {', '.join(summary.labels)}")

data, _ = read_structures("data/sn2_gfn2xtb.h5")
test = data.split_subset("test")
first = test.subset(np.arange(3))
numbers, positions, offsets = (torch.from_numpy(a) for a in (first.numbers, first.positions, first.offsets))
descriptor = SymmetryFunctions.from_config(DescriptorConfig())
G = descriptor(numbers, positions, offsets)
print(f"eeACSFs of the first test structure's carbon atom ({descriptor.n_functions} functions):")
print(np.array2string(G[0, :10].numpy(), precision=3), "...")

if len(sys.argv) > 1:
    from lmlp.modelfile import load_model

    model, metadata = load_model(sys.argv[1])
    energies, forces = model(numbers, positions.to(next(model.parameters()).dtype), offsets)
    mean, spread = energies.mean(0), energies.std(0)
    for i in range(len(first)):
        print(f"{first.label[i]:10s} reference {first.energy[i]:.4f} eV, lMLP {mean[i]:.4f} ± "
              f"{spread[i]:.4f} eV (ensemble std, ddof 1)")
