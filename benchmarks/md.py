"""MD speed: lMLP (ASE calculator) against GFN2-xTB (tblite), for 6-atom SN2 complexes and from 6 to 10,000 atoms.

Run (on an idle machine; the default sizes take about half an hour)::

    .venv/bin/python benchmarks/md.py --out examples/results/md-scaling

Everything runs single-threaded (``torch.set_num_threads(1)``, threadpoolctl for OpenMP and BLAS),
so both codes get one core.

1. 6-atom SN2 reactant complexes X⁻···CH3Y of ``--data``: velocity Verlet steps per second (0.5 fs,
   300 K Maxwell–Boltzmann start, best of 3 blocks), lMLP in float32 and float64 and GFN2-xTB
   (charge −1), their ratios and the geometric mean of the ratios.
2. Scaling: energy + forces calls per second at ``--sizes`` atoms of two systems,

   - "SN2 box": k copies of the Cl⁻···CH3Br reactant complex, randomly rotated on a jittered cubic
     lattice in a periodic cube at ``--density`` atoms/Å³ (xTB charge −k); at 6 atoms one isolated
     (non-periodic) complex (at 0.06 atoms/Å³ two complexes do not fit in their cube: an error);
   - "CH3Cl liquid": a periodic cube of CH3Cl (C–Cl 1.78 Å, C–H 1.09 Å, tetrahedral) at 0.91 g/cm³,
     randomly oriented on a jittered lattice (neutral);

   sizes round to the nearest multiple of 6 or 5 atoms (100 → 102 and 100), and atoms of different
   molecules (or periodic images) are at least 2 Å apart. The lMLP runs in float32 with two
   descriptor settings: the model file ``--model`` (its own cutoffs) and a condensed-phase model
   with the same networks (widths, activation, members) but random weights and the default
   ``DescriptorConfig`` cut to ``--cutoffs R A`` (radial and angular cutoff, default 6 and 4 Å; the
   radial shells beyond R dropped; the cost does not depend on the weights). Between calls
   the atoms move by a random ~0.001 Å, so every call recomputes while the Verlet list stays, as in
   MD. A point: the first call (neighbour list, set-up, compilation) is timed apart, then the best
   of 3 blocks of about ``--budget``/3 s each (at least one call per block), once with every
   member's forces (the calculator's default, for the force uncertainty) and once with the
   ensemble-mean forces only ("mean F", ``member_forces=False``). Printed with it: neighbours per
   atom (within cutoff + 1 Å skin) and angular items per atom (the calculator's choice: neighbours
   within the angular cutoff + skin, summed by moments, or their triples). The calculator backends
   "script" (the scaling runs) and "eager" are compared at 6 and 100 atoms, and "compile" at 6
   atoms with ``--compile`` (its first call compiles for tens of seconds: reported as the
   first-call time, not in the rate). GFN2-xTB
   (``tblite.ase.TBLite``, whose previous wavefunction is the next start guess, as in MD) runs at
   the requested sizes up to ``--xtb-max-atoms`` (1000 includes the 1002-atom SN2 box); failures
   (e.g. no SCF convergence) are reported, not raised.

Memory and time: the calculator evaluates pairs and angular items in blocks (bounded float
temporaries), but keeps the Verlet list's item indices: up to 24 bytes per triple, ~100 at the peak
while the list is built. Over triples (G4, non-integer ζ, or when cheaper) a 12 Å angular cutoff
at these densities gives 120,000–150,000 triples per atom (~1 µs each per call): 10,000 atoms would
need ~1.5·10⁹ triples, ~150 GB and ~25 min per call; by moments the items are the pairs. So a size
whose estimated time per call (time per item and items per atom of the largest smaller periodic size
measured, same system and setting) exceeds ``--max-seconds-per-call``, or whose items would take
more than half of the available memory, is skipped with the reason printed.

Output: a table per system (lMLP calls/s, ms/call, µs per atom and call for each setting, xTB
calls/s, ratio lMLP/xTB), the targets "time per atom 1,000 → 10,000 atoms within 1.5×" and
"100 atoms: ≥ 100 calls/s and ≥ 20× xTB" (measured against target, not asserted) and, with
``--out DIR``, ``DIR/scaling.json`` (all numbers, machine) and ``DIR/scaling.png`` (log-log time per
call against atoms, with an O(N) guide).

Options: ``--model`` (runs/sn2/model.pt; if missing, random weights with the default config),
``--data`` (SN2 data set, data/sn2_gfn2xtb.h5), ``--steps`` (timed lMLP MD steps per SN2 complex,
3000; xTB a third), ``--sizes`` (6 100 1000 10000), ``--density`` (SN2 box, 0.06 atoms/Å³),
``--cutoffs`` (6.0 4.0 Å), ``--budget`` (s per point, 10), ``--xtb-max-atoms`` (1000),
``--max-seconds-per-call`` (60), ``--compile``, ``--seed`` (0), ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import itertools
import json
import math
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.calculator import Calculator, CalculatorError
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import Stationary
from ase.neighborlist import neighbor_list
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from tblite.ase import TBLite  # imported before threadpool_limits so that its OpenMP is limited too
from threadpoolctl import threadpool_limits

try:  # ASE >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

from lmlp.calculator import SKIN, LMLPCalculator, TooCloseWarning
from lmlp.config import DescriptorConfig
from lmlp.data import read_structures
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.model import HDNNPEnsemble, fit_reference_energies
from lmlp.reference.sn2 import BOND, COMPLEX

REACTIONS = ("F+CH3F", "F+CH3Cl", "Cl+CH3Br", "Br+CH3I", "I+CH3I")
BOX_REACTION = "Cl+CH3Br"
SN2_BOX, LIQUID = "SN2 box", "CH3Cl liquid"
SN2_DENSITY = 0.06
"""SN2 box density (default), atoms/Å³."""
LIQUID_DENSITY = 0.91
"""CH3Cl liquid density, g/cm³."""
G_CM3_PER_AMU_A3 = 1.66054
"""1 amu/Å³ in g/cm³."""
MIN_DISTANCE = 2.0
"""Closest approach of atoms of different molecules (or periodic images), Å."""
JITTER = 0.25
"""Largest lattice-site displacement per axis, in lattice spacings."""
POSES, ROUNDS = 100, 200
"""Random poses tried per clashing molecule and round; rounds before giving up."""
DISPLACEMENT = 1e-3
"""Standard deviation of the random moves between calls, Å."""
BYTES_PER_ITEM = 100
"""Estimated peak memory per angular item (a triple; a pair takes less) while the Verlet list is built, bytes."""
BACKEND_SIZES = (6, 100)
"""Requested sizes at which the calculator backends are compared ("compile": the first only)."""
BLOCKS = 3
"""Timed blocks per point (the best counts)."""
RANDOM_MODEL_DATA = Path("data/sn2_tiny.h5")


# ---------------------------------------------------------------- models


def random_model(data: Path, config: DescriptorConfig, network: dict[str, Any]) -> HDNNPEnsemble:
    """float32 ensemble with random weights: descriptor ``config``, networks ``network`` (hidden,
    activation, members); standardisation and reference energies fitted on ``data``."""
    s, _ = read_structures(data)
    elements = sorted(set(s.numbers.tolist()))
    sf = SymmetryFunctions.from_config(config)
    G = sf(*map(torch.from_numpy, (s.numbers, s.positions, s.offsets)))
    e_ref = torch.from_numpy(fit_reference_energies(s.numbers, s.offsets, s.energy, elements))
    return HDNNPEnsemble(sf, Standardizer.fit(G), elements, e_ref, hidden=network["hidden"],
                         activation=network["activation"], members=network["members"]).float()


def lmlp_settings(model_path: Path, cutoffs: tuple[float, float]) -> dict[str, tuple[HDNNPEnsemble, str]]:
    """The two lMLP settings, name: (model, description): the model file (random weights with the
    default config if it is missing) and its networks on the default descriptor cut to the radial
    and angular ``cutoffs`` (Å; radial shells centred beyond the cutoff dropped)."""
    if model_path.is_file():
        from lmlp.modelfile import load_model

        model, source = load_model(model_path)[0], str(model_path)
    else:
        network = {"hidden": [25, 25], "activation": "scaled_tanh", "members": 10}
        model, source = random_model(RANDOM_MODEL_DATA, DescriptorConfig(), network), "random weights (no model file)"
    network = {key: model.hyperparameters[key] for key in ("hidden", "activation", "members")}
    radial, angular = cutoffs
    default = DescriptorConfig()
    shells = [(eta, rs) for eta, rs in zip(default.radial_eta, default.radial_rs) if rs < radial]
    config = DescriptorConfig(cutoff=radial, angular_cutoff=angular, radial_eta=[eta for eta, _ in shells],
                              radial_rs=[rs for _, rs in shells])
    condensed = random_model(RANDOM_MODEL_DATA, config, network)
    return {"model": (model, source),
            f"{radial:g}/{angular:g} Å": (condensed, "random weights, default descriptor cut to these cutoffs")}


def describe(model: HDNNPEnsemble, source: str) -> dict[str, Any]:
    """Cutoffs (Å), descriptor length, networks and source of a model."""
    d = model.descriptor
    return {"source": source, "cutoff": d.cutoff, "angular_cutoff": d.angular_cutoff, "n_functions": d.n_functions,
            "hidden": model.hyperparameters["hidden"], "members": model.members}


# ---------------------------------------------------------------- structures


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


def ch3cl() -> Atoms:
    """CH3Cl: C–Cl 1.78 Å, C–H 1.09 Å, tetrahedral angles."""
    theta = math.acos(-1 / 3)
    hydrogens = [1.09 * np.array([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi), math.cos(theta)])
                 for phi in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    return Atoms("CClH3", positions=[[0, 0, 0], [0, 0, 1.78], *hydrogens])


def molecular_box(molecule: Atoms, count: int, side: float, rng: np.random.Generator) -> Atoms:
    """``count`` randomly rotated copies of ``molecule`` on random sites of the smallest simple cubic
    lattice with at least ``count`` sites, jittered, in a periodic cube of ``side`` Å, with no atoms of
    different molecules (or periodic images) closer than ``MIN_DISTANCE``: each round, every clashing
    molecule takes the first of ``POSES`` new random poses (rotation and jitter) clear of the
    molecules that do not clash."""
    m = math.ceil(round(count ** (1 / 3), 9))
    spacing = side / m
    grid = np.stack(np.unravel_index(rng.choice(m**3, count, replace=False), (m, m, m)), axis=1)
    centres = (grid + 0.5) * spacing
    local = molecule.positions - molecule.positions.mean(0)

    def poses(molecules: np.ndarray, number: int) -> np.ndarray:
        """``number`` random poses (K, number, size, 3) of each of ``molecules``, Å."""
        rotations = Rotation.random(len(molecules) * number, rng=rng).as_matrix()
        jitter = rng.uniform(-JITTER, JITTER, (len(molecules) * number, 1, 3)) * spacing
        placed = jitter + local @ rotations.transpose(0, 2, 1)
        return centres[molecules, None, None] + placed.reshape(len(molecules), number, *local.shape)

    positions = poses(np.arange(count), 1)[:, 0]
    atoms = Atoms(numbers=np.tile(molecule.numbers, count), cell=[side] * 3, pbc=True)
    owner = np.repeat(np.arange(count), len(molecule))
    for _ in range(ROUNDS):
        moving = clashing(atoms, positions.reshape(-1, 3), owner)
        if not len(moving):
            atoms.positions = positions.reshape(-1, 3)
            atoms.wrap()
            return atoms
        fixed = np.delete(positions, moving, axis=0).reshape(-1, 3) % side
        candidates = poses(moving, POSES)
        if len(fixed):
            near = cKDTree(fixed, boxsize=side).query_ball_point(candidates.reshape(-1, 3) % side, MIN_DISTANCE,
                                                                 return_length=True)
            first = np.argmax(near.reshape(len(moving), POSES, -1).sum(2) == 0, axis=1)
        else:
            first = np.zeros(len(moving), dtype=int)
        positions[moving] = candidates[np.arange(len(moving)), first]
    raise RuntimeError(f"could not place {count} molecules {MIN_DISTANCE} Å apart in a {side:.1f} Å cube "
                       f"(too small a box or too high a density)")


def clashing(atoms: Atoms, positions: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Molecules (``owner`` of each atom) with an atom closer than ``MIN_DISTANCE`` to another
    molecule, at ``positions`` in the periodic cube ``atoms.cell``; in cubes too small for the
    minimum-image convention also to a periodic image of its own."""
    side = atoms.cell[0, 0]
    pairs = cKDTree(positions % side, boxsize=side).query_pairs(MIN_DISTANCE, output_type="ndarray")
    moving = np.unique(owner[pairs[owner[pairs[:, 0]] != owner[pairs[:, 1]]]])
    first = positions[owner == 0]
    extent = np.max(np.linalg.norm(first[:, None] - first[None], axis=2))
    if len(moving) or side > extent + MIN_DISTANCE:
        return moving
    atoms.positions = positions
    i, _, shift = neighbor_list("ijS", atoms, MIN_DISTANCE)
    return np.unique(owner[i[shift.any(1)]])


def sn2_box(complex_: Atoms, n: int, density: float, rng: np.random.Generator) -> Atoms:
    """About ``n`` atoms of SN2 complexes at ``density`` atoms/Å³; one isolated complex for n < 9.
    ``info["charge"]``: −1 per complex."""
    count = max(1, round(n / len(complex_)))
    if count == 1:
        atoms = complex_.copy()
        atoms.positions -= atoms.positions.mean(0)
    else:
        atoms = molecular_box(complex_, count, (count * len(complex_) / density) ** (1 / 3), rng)
    atoms.info["charge"] = -count
    return atoms


def ch3cl_liquid(n: int, rng: np.random.Generator) -> Atoms:
    """About ``n`` atoms of liquid CH3Cl (``LIQUID_DENSITY``), periodic, neutral."""
    molecule = ch3cl()
    count = max(1, round(n / len(molecule)))
    volume = count * molecule.get_masses().sum() * G_CM3_PER_AMU_A3 / LIQUID_DENSITY
    atoms = molecular_box(molecule, count, volume ** (1 / 3), rng)
    atoms.info["charge"] = 0
    return atoms


def build_systems(sizes: list[int], density: float, complex_: Atoms, seed: int) -> dict[str, dict[int, Atoms]]:
    """System name: requested size: atoms."""
    rng = np.random.default_rng(seed)
    return {SN2_BOX: {n: sn2_box(complex_, n, density, rng) for n in sizes},
            LIQUID: {n: ch3cl_liquid(n, rng) for n in sizes}}


# ---------------------------------------------------------------- timing


def steps_per_second(atoms: Atoms, calc: Calculator, steps: int, warmup: int, blocks: int = BLOCKS) -> float:
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


@dataclass
class Rate:
    """calls_per_s: energy + forces calls per second (best block). first_call_s: the first call, s.
    calls: calls per block."""

    calls_per_s: float
    first_call_s: float
    calls: int


def call_rate(atoms: Atoms, calc: Calculator, budget: float) -> Rate:
    """Energy + forces calls per second of ``calc`` on ``atoms``, moved by a random ~``DISPLACEMENT`` Å
    between calls: the first call timed apart, then a probe call sets the block length, and the
    fastest of ``BLOCKS`` blocks of about ``budget / BLOCKS`` s (at least one call each) counts."""
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(0)
    moves = itertools.cycle([atoms.positions + rng.normal(0, DISPLACEMENT, atoms.positions.shape) for _ in range(2)])

    def block(calls: int) -> float:
        """Seconds per call over ``calls`` calls."""
        start = time.perf_counter()
        for _ in range(calls):
            atoms.positions = next(moves)
            atoms.get_forces()
            atoms.get_potential_energy()
        return (time.perf_counter() - start) / calls

    first = block(1)
    probe = block(1)
    calls = max(1, round(budget / (BLOCKS * probe)))
    times = [probe] if calls == 1 else []
    times += [block(calls) for _ in range(BLOCKS - len(times))]
    return Rate(1.0 / min(times), first, calls)


def rate_numbers(rate: Rate, n: int) -> dict[str, float]:
    """calls/s, ms per call, µs per atom and call, first call (s), calls per block."""
    return {"calls_per_s": rate.calls_per_s, "ms_per_call": 1e3 / rate.calls_per_s,
            "us_per_atom": 1e6 / (rate.calls_per_s * n), "first_call_s": rate.first_call_s, "calls": rate.calls}


def lmlp_point(atoms: Atoms, model: HDNNPEnsemble, budget: float, backend: str = "script",
               mean_forces: bool = True) -> dict[str, Any]:
    """float32 calculator rates (``rate_numbers``) with member forces, and with ``mean_forces`` also
    those of ensemble-mean forces only (``member_forces=False``: "mean_forces"); neighbours and angular
    items per atom (pairs by moments or triples), and the path taken: the whole-step kernel (where
    ``backend`` matters) or blocked."""
    calc = LMLPCalculator(model, dtype=torch.float32, backend=backend)
    rate = call_rate(atoms, calc, budget)
    nb, n = calc._neighbours, len(atoms)
    whole = calc._networks.gathered and len(nb.pair_blocks) <= 1 and len(nb.angular_blocks) <= 1
    items = nb.items.shape[1]
    point = {**rate_numbers(rate, n), "neighbours_per_atom": len(nb.i) / n, "angular_items_per_atom": items / n,
             "angular_items": items, "angular_by": "moments" if nb.terms.moments else "triples",
             "path": "whole-step kernel" if whole else "blocked"}
    if mean_forces:
        mean = LMLPCalculator(model, dtype=torch.float32, backend=backend, member_forces=False)
        point["mean_forces"] = rate_numbers(call_rate(atoms, mean, budget), n)
    return point


def meminfo(key: str) -> int:
    """``key`` (e.g. "MemAvailable") of /proc/meminfo, bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/meminfo")


def lmlp_skip(previous: dict[str, Any] | None, n: int, max_seconds: float) -> dict[str, Any] | None:
    """A skip record (reason, estimates) if ``n`` atoms would take more than ``max_seconds`` per call
    or more than half of the available memory for angular items, estimated from ``previous`` (a
    measured periodic point of the same system and setting, with its atom count) at equal items per
    atom and time per item; None to measure."""
    if previous is None:
        return None
    items = previous["angular_items_per_atom"] * n
    seconds = previous["ms_per_call"] / 1e3 / max(previous["angular_items"], 1) * items
    memory, available = items * BYTES_PER_ITEM, meminfo("MemAvailable")
    if seconds <= max_seconds and memory <= available / 2:
        return None
    reason = (f"~{items:.2g} angular items ({previous['angular_items_per_atom']:,.0f}/atom at "
              f"{previous['atoms']:,} atoms, {previous['angular_by']}): "
              f"~{seconds:,.0f} s per call (limit {max_seconds:g}), ~{memory / 1e9:,.1f} GB to build "
              f"(available {available / 1e9:.0f} GB)")
    return {"skipped": reason, "estimated_angular_items": items, "estimated_seconds_per_call": seconds,
            "estimated_bytes": memory}


def xtb_point(atoms: Atoms, budget: float) -> dict[str, Any]:
    """GFN2-xTB rates (``rate_numbers``) with charge ``atoms.info["charge"]``, or a failure status."""
    calc = TBLite(method="GFN2-xTB", charge=atoms.info["charge"], verbosity=0)
    try:
        rate = call_rate(atoms, calc, budget)
    except (CalculatorError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return {"status": "no convergence" if "converge" in message.lower() else f"failed: {message}"}
    return {"status": "ok", **rate_numbers(rate, len(atoms))}


# ---------------------------------------------------------------- the two parts


def sn2_md(model: HDNNPEnsemble, data: Path, steps: int) -> dict[str, Any]:
    """MD steps per second on the 6-atom SN2 reactant complexes: lMLP float32, float64, GFN2-xTB."""
    s, _ = read_structures(data)
    print(f"\n6-atom SN2 reactant complexes, velocity Verlet 0.5 fs, 300 K start, MD steps/s "
          f"(best of {BLOCKS} blocks):")
    print(f"{'reaction':10s} {'lMLP f32':>9s} {'lMLP f64':>9s} {'GFN2-xTB':>9s} {'f32/xTB':>8s} {'f64/xTB':>8s}")
    rows = []
    for reaction in REACTIONS:
        atoms = reactant_complex(s, reaction)
        f32 = steps_per_second(atoms, LMLPCalculator(model, dtype=torch.float32), steps, 50)
        f64 = steps_per_second(atoms, LMLPCalculator(model, dtype=torch.float64), steps, 50)
        xtb = steps_per_second(atoms, TBLite(method="GFN2-xTB", charge=-1, verbosity=0), steps // 3, 20)
        rows.append({"reaction": reaction, "lmlp_float32": f32, "lmlp_float64": f64, "xtb": xtb,
                     "float32_over_xtb": f32 / xtb, "float64_over_xtb": f64 / xtb})
        print(f"{reaction:10s} {f32:9.0f} {f64:9.0f} {xtb:9.0f} {f32 / xtb:7.2f}x {f64 / xtb:7.2f}x")
    mean32, mean64 = (float(np.exp(np.mean(np.log([r[key] for r in rows]))))
                      for key in ("float32_over_xtb", "float64_over_xtb"))
    print(f"{'geo. mean':10s} {'':29s} {mean32:7.2f}x {mean64:7.2f}x   (target: lMLP >= 1.5x faster)")
    return {"steps": steps, "reactions": rows,
            "geometric_mean": {"float32_over_xtb": mean32, "float64_over_xtb": mean64}}


def scaling(systems: dict[str, dict[int, Atoms]], models: dict[str, tuple[HDNNPEnsemble, str]],
            args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """System name: one record per requested size (atoms, periodic, charge, lmlp per setting, xtb)."""
    results = {}
    for name, structures in systems.items():
        print_header(name, args.density)
        records, previous = [], dict.fromkeys(models)
        for requested, atoms in structures.items():
            n, periodic = len(atoms), bool(atoms.pbc.any())
            record = {"requested": requested, "atoms": n, "periodic": periodic, "charge": atoms.info["charge"],
                      "lmlp": {}}
            for setting, (model, _) in models.items():
                point = lmlp_skip(previous[setting], n, args.max_seconds_per_call)
                if point is None:
                    point = lmlp_point(atoms, model, args.budget)
                    if periodic:
                        previous[setting] = {**point, "atoms": n}
                record["lmlp"][setting] = point
            record["xtb"] = (xtb_point(atoms, args.budget) if requested <= args.xtb_max_atoms
                             else {"status": f"skipped (> --xtb-max-atoms {args.xtb_max_atoms})"})
            records.append(record)
            print_record(name, record)
        results[name] = records
    return results


def backends(systems: dict[str, dict[int, Atoms]], models: dict[str, tuple[HDNNPEnsemble, str]],
             results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Backend comparison at ``BACKEND_SIZES``: "script" from the scaling runs, "eager" measured,
    "compile" at the first size with ``--compile``."""
    print("\ncalculator backends (float32; script: the scaling run above; first call excluded from calls/s):")
    print(f"{'system':13s} {'atoms':>6s} {'setting':14s} {'backend':8s} {'calls/s':>9s} {'first call s':>12s}  path")
    rows = []
    for name, records in results.items():
        for record in records:
            if record["requested"] not in BACKEND_SIZES:
                continue
            atoms = systems[name][record["requested"]]
            names = ["eager"] + (["compile"] if args.compile and record["requested"] == BACKEND_SIZES[0] else [])
            for setting, (model, _) in models.items():
                if "skipped" in record["lmlp"][setting]:
                    continue
                points = {"script": record["lmlp"][setting]}
                points.update({b: lmlp_point(atoms, model, args.budget, b, mean_forces=False) for b in names})
                for backend, point in points.items():
                    rows.append({"system": name, "atoms": record["atoms"], "setting": setting, "backend": backend,
                                 **{k: point[k] for k in ("calls_per_s", "first_call_s", "path")}})
                    print(f"{name:13s} {record['atoms']:6d} {setting:14s} {backend:8s} {point['calls_per_s']:9.1f} "
                          f"{point['first_call_s']:12.2f}  {point['path']}")
    return rows


# ---------------------------------------------------------------- reporting


def print_header(name: str, density: float) -> None:
    """Title and column heads of a system's table."""
    what = (f"Cl⁻···CH3Br complexes at {density:g} atoms/Å³, periodic above 6 atoms; xTB charge −k"
            if name == SN2_BOX else f"CH3Cl at {LIQUID_DENSITY:g} g/cm³, periodic, neutral")
    print(f"\n{name} ({what}):")
    print(f"{'atoms':>6s}  {'lMLP setting':14s} {'calls/s':>9s} {'ms/call':>9s} {'µs/atom':>8s} {'neigh/atom':>10s} "
          f"{'ang./atom':>10s} {'1st call s':>10s} {'mean F c/s':>10s} | {'xTB calls/s':>11s} {'lMLP/xTB':>9s}")


def print_record(name: str, record: dict[str, Any]) -> None:
    """One row per lMLP setting of a size; the xTB columns on each."""
    xtb = record["xtb"]
    for k, (setting, point) in enumerate(record["lmlp"].items()):
        atoms = f"{record['atoms']:6d}" if k == 0 else " " * 6
        if "skipped" in point:
            lmlp = f"skipped: {point['skipped']}"
        else:
            lmlp = (f"{point['calls_per_s']:9.2f} {point['ms_per_call']:9.2f} {point['us_per_atom']:8.1f} "
                    f"{point['neighbours_per_atom']:10.1f} {point['angular_items_per_atom']:10.0f} "
                    f"{point['first_call_s']:10.2f} {point['mean_forces']['calls_per_s']:10.2f}")
        if xtb["status"] != "ok":
            right = f" | {xtb['status']}" if k == 0 else ""
        elif "skipped" in point:
            right = f" | {xtb['calls_per_s']:11.2f}"
        else:
            right = f" | {xtb['calls_per_s']:11.2f} {point['calls_per_s'] / xtb['calls_per_s']:8.2f}x"
        print(f"{atoms}  {setting:14s} {lmlp}{right}", flush=True)


def point_at(records: list[dict[str, Any]], requested: int, setting: str) -> dict[str, Any] | None:
    """The measured lMLP point of ``setting`` at a requested size, or None."""
    for record in records:
        if record["requested"] == requested and "skipped" not in record["lmlp"][setting]:
            return {**record["lmlp"][setting], "xtb": record["xtb"]}
    return None


def verdict(value: float | None, target: float, unit: str, at_most: bool = False) -> str:
    """"measured (target ≥ or ≤ target): met/MISSED", or "not measured"."""
    if value is None:
        return "not measured"
    met = value <= target if at_most else value >= target
    return f"{value:.2f}{unit} (target {'<=' if at_most else '>='} {target:g}{unit}): {'met' if met else 'MISSED'}"


def checks(results: dict[str, list[dict[str, Any]]], settings: list[str]) -> list[dict[str, Any]]:
    """Measured against target (printed, not asserted): time per atom 1,000 → 10,000 atoms within
    1.5×; at 100 atoms ≥ 100 calls/s and ≥ 20× xTB."""
    print("\ntargets (measured vs target; not asserted):")
    rows = []
    for name, records in results.items():
        for setting in settings:
            small, large = point_at(records, 1000, setting), point_at(records, 10000, setting)
            growth = large["us_per_atom"] / small["us_per_atom"] if small and large else None
            point = point_at(records, 100, setting)
            rate = point["calls_per_s"] if point else None
            mean = point["mean_forces"]["calls_per_s"] if point else None
            ratio = rate / point["xtb"]["calls_per_s"] if point and point["xtb"]["status"] == "ok" else None
            print(f"  {name}, {setting}: time per atom 10,000 / 1,000 atoms {verdict(growth, 1.5, 'x', at_most=True)}")
            print(f"  {name}, {setting}: 100 atoms calls/s {verdict(rate, 100, '')} "
                  f"(mean forces only: {verdict(mean, 100, '')}); lMLP/xTB {verdict(ratio, 20, 'x')}")
            rows.append({"system": name, "setting": setting, "us_per_atom_10000_over_1000": growth,
                         "calls_per_s_100": rate, "mean_forces_calls_per_s_100": mean, "over_xtb_100": ratio})
    return rows


def machine() -> dict[str, Any]:
    """Versions, CPU model, cores, memory and date."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "logical_cpus": sum(line.startswith("processor") for line in cpuinfo), "threads": 1,
            "memory_gb": meminfo("MemTotal") / 1e9, "python": platform.python_version(),
            **{package: importlib.metadata.version(package) for package in ("torch", "numpy", "ase", "tblite")}}


def plot(results: dict[str, list[dict[str, Any]]], settings: list[str], path: Path) -> None:
    """Log-log time per call (ms) against atoms: one line per code, setting and system; O(N) guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    codes = [(f"lMLP {s}", lambda r, s=s: r["lmlp"][s]) for s in settings] + [("GFN2-xTB", lambda r: r["xtb"])]
    points = []
    for (label, get), color in zip(codes, ("C0", "C1", "C3")):
        for (name, records), (style, marker) in zip(results.items(), (("-", "o"), ("--", "s"))):
            xy = [(r["atoms"], get(r)["ms_per_call"]) for r in records if "ms_per_call" in get(r)]
            if xy:
                ax.plot(*zip(*xy), style, marker=marker, color=color, label=f"{label}, {name}")
                points += xy
    if points:
        n = np.array([p[0] for p in points], dtype=float)
        anchor = float(np.exp(np.median(np.log([p[1] / p[0] for p in points]))))
        grid = np.array([n.min(), n.max()])
        ax.plot(grid, anchor * grid, ":", color="grey", label="∝ N (guide)")
    ax.set(xscale="log", yscale="log", xlabel="atoms", ylabel="time per energy + forces call, ms",
           title="single-threaded energy + forces calls")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/sn2/model.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/sn2_gfn2xtb.h5"))
    parser.add_argument("--steps", type=int, default=3000, help="timed lMLP MD steps per SN2 complex (xTB: a third)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[6, 100, 1000, 10000], help="atoms per system")
    parser.add_argument("--density", type=float, default=SN2_DENSITY, help="SN2 box density, atoms/Å³")
    parser.add_argument("--cutoffs", type=float, nargs=2, default=(6.0, 4.0), metavar=("RADIAL", "ANGULAR"),
                        help="radial and angular cutoff of the condensed-phase setting, Å")
    parser.add_argument("--budget", type=float, default=10.0, help="timed seconds per point (at least 3 calls)")
    parser.add_argument("--xtb-max-atoms", type=int, default=1000, help="largest requested size given to GFN2-xTB")
    parser.add_argument("--max-seconds-per-call", type=float, default=60.0,
                        help="skip lMLP sizes estimated to take longer per call")
    parser.add_argument("--compile", action="store_true", help='also time backend "compile" at the smallest size')
    parser.add_argument("--seed", type=int, default=0, help="structure seed")
    parser.add_argument("--out", type=Path, help="directory for scaling.json and scaling.png")
    return parser.parse_args()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both parts; all numbers."""
    models = lmlp_settings(args.model, tuple(args.cutoffs))
    model_info = {name: describe(*value) for name, value in models.items()}
    for name, info in model_info.items():
        print(f"lMLP {name}: {info['members']} members, hidden {info['hidden']}, {info['n_functions']} eeACSFs, "
              f"cutoff {info['cutoff']:g} Å, angular {info['angular_cutoff']:g} Å, {info['source']}")
    md = sn2_md(models["model"][0], args.data, args.steps)
    s, _ = read_structures(args.data)
    systems = build_systems(args.sizes, args.density, reactant_complex(s, BOX_REACTION), args.seed)
    print(f"\nenergy + forces calls, float32, single-threaded; atoms moved ~{DISPLACEMENT:g} Å between calls; "
          f"best of {BLOCKS} blocks of ~{args.budget / BLOCKS:g} s; neighbours within cutoff + {SKIN:g} Å skin, "
          f"angular items (pairs by moments or triples) within angular cutoff + skin")
    results = scaling(systems, models, args)
    return {"machine": machine(), "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "models": model_info, "sn2_md": md, "scaling": results,
            "backends": backends(systems, models, results, args), "targets": checks(results, list(models))}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", TooCloseWarning)
    with threadpool_limits(limits=1):
        report = run(args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scaling.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        plot(report["scaling"], list(report["models"]), args.out / "scaling.png")
        print(f"\nwrote {args.out / 'scaling.json'} and {args.out / 'scaling.png'}")


if __name__ == "__main__":
    main()
