"""MD speed: lMLP (10-member ensemble, ASE calculator) against GFN2-xTB (tblite) per MD step.

Run: ``.venv/bin/python benchmarks/md.py [--model runs/sn2/model.pt] [--steps 3000]``.

Velocity Verlet, 0.5 fs, from 300 K Maxwell–Boltzmann velocities, everything single-threaded
(torch, OpenMP, BLAS) so that both codes get one core. Prints MD steps per second for 6-atom SN2
reactant complexes X⁻···CH3Y of the shipped data set, lMLP in float32 and float64 and GFN2-xTB
(tblite's ASE calculator, charge −1), their ratio, and the lMLP on random clusters of 30, 100 and
300 atoms (liquid-like density, ≥ 1 Å apart: nearly every pair within the 12 Å cutoff).

The model is ``--model`` if that file exists, else a 10-member ensemble with the default config's
architecture (eeACSFs, 25-25 neurons) and random weights: the cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import Stationary
from threadpoolctl import threadpool_limits

try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

from lmlp.calculator import LMLPCalculator, TooCloseWarning
from lmlp.config import DescriptorConfig
from lmlp.data import read_structures
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.model import HDNNPEnsemble, fit_reference_energies
from lmlp.reference.sn2 import BOND, COMPLEX

from descriptors import random_cluster as descriptor_cluster  # benchmarks/ is on sys.path when run as a script

REACTIONS = ("F+CH3F", "F+CH3Cl", "Cl+CH3Br", "Br+CH3I", "I+CH3I")
CLUSTERS = {30: 40, 100: 4, 300: 2}
"""Cluster size: timed MD steps."""


def random_model(data: Path) -> HDNNPEnsemble:
    """10 members, 25-25 neurons, default eeACSFs; standardisation and E_ref fitted on ``data``."""
    s, _ = read_structures(data)
    elements = sorted(set(s.numbers.tolist()))
    sf = SymmetryFunctions.from_config(DescriptorConfig())
    G = sf(*map(torch.from_numpy, (s.numbers, s.positions, s.offsets)))
    e_ref = torch.from_numpy(fit_reference_energies(s.numbers, s.offsets, s.energy, elements))
    return HDNNPEnsemble(sf, Standardizer.fit(G), elements, e_ref, hidden=[25, 25], members=10).float()


def reactant_complex(s, reaction: str) -> Atoms:
    """The structure of ``reaction`` closest to its ion–molecule complex (C–X, C–Y distances)."""
    x, y = reaction.split("+CH3")
    indices = np.flatnonzero(s.label == reaction)
    gaps = []
    for i in indices:
        p = s.positions[s.offsets[i]: s.offsets[i + 1]]
        gaps.append(abs(np.linalg.norm(p[4] - p[0]) - COMPLEX[x]) + abs(np.linalg.norm(p[5] - p[0]) - BOND[y]))
    atoms = s.atoms(int(indices[int(np.argmin(gaps))]))
    atoms.calc = None
    return atoms


def random_cluster(n: int, seed: int) -> Atoms:
    """The clusters of benchmarks/descriptors.py, as ASE atoms."""
    numbers, positions = descriptor_cluster(n, seed)
    return Atoms(numbers=numbers.numpy(), positions=positions.numpy())


def steps_per_second(atoms: Atoms, calc: Calculator, steps: int, warmup: int, blocks: int = 3) -> float:
    """Velocity Verlet steps per second: the best of ``blocks`` runs of ``steps / blocks`` steps."""
    atoms = atoms.copy()
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(warmup)
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        dyn.run(max(1, steps // blocks))
        best = min(best, (time.perf_counter() - start) / max(1, steps // blocks))
    return 1.0 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/sn2/model.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/sn2_gfn2xtb.h5"))
    parser.add_argument("--steps", type=int, default=3000, help="timed lMLP steps per SN2 complex (xTB: a third)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", TooCloseWarning)
    if args.model.is_file():
        from lmlp.modelfile import load_model

        model, _ = load_model(args.model)
        source = str(args.model)
    else:
        model, source = random_model(Path("data/sn2_tiny.h5")), "random weights (no model file)"
    print(f"lMLP: {model.members} members, hidden {model.hyperparameters['hidden']}, "
          f"{model.descriptor.n_functions} eeACSFs, cutoff {model.descriptor.cutoff:g} Å, {source}")
    print("single-threaded; velocity Verlet, 0.5 fs, 300 K start; MD steps per second (best of 3 blocks)")
    s, _ = read_structures(args.data)
    from tblite.ase import TBLite

    print(f"\n6-atom SN2 reactant complexes:\n{'reaction':10s} {'lMLP f32':>9s} {'lMLP f64':>9s} "
          f"{'GFN2-xTB':>9s} {'f32/xTB':>8s} {'f64/xTB':>8s}")
    ratios = []
    for reaction in REACTIONS:
        atoms = reactant_complex(s, reaction)
        f32 = steps_per_second(atoms, LMLPCalculator(model, dtype=torch.float32), args.steps, 50)
        f64 = steps_per_second(atoms, LMLPCalculator(model, dtype=torch.float64), args.steps, 50)
        with threadpool_limits(limits=1):
            xtb = steps_per_second(atoms, TBLite(method="GFN2-xTB", charge=-1, verbosity=0), args.steps // 3, 20)
        ratios.append((f32 / xtb, f64 / xtb))
        print(f"{reaction:10s} {f32:9.0f} {f64:9.0f} {xtb:9.0f} {f32 / xtb:7.2f}x {f64 / xtb:7.2f}x")
    mean32, mean64 = np.exp(np.mean(np.log(ratios), axis=0))
    print(f"{'geo. mean':10s} {'':29s} {mean32:7.2f}x {mean64:7.2f}x   (target: lMLP >= 1.5x faster)")

    print(f"\nlMLP on random clusters ({str(next(model.parameters()).dtype)[6:]}):")
    for n, steps in CLUSTERS.items():
        atoms = random_cluster(n, n)
        calc = LMLPCalculator(model)
        rate = steps_per_second(atoms, calc, steps, 1, blocks=1)
        nb = calc._neighbours
        print(f"  {n:4d} atoms: {rate:9.2f} steps/s ({1000 / rate:9.1f} ms/step; "
              f"{len(nb.i) / n:5.1f} neighbours/atom within cutoff + skin, {len(nb.t0):,} triples)")


if __name__ == "__main__":
    main()
