"""Neighbour search for large structures: lmlp ``find_neighbors`` against ASE, vesin and matscipy.

Run: ``.venv/bin/python benchmarks/neighbors.py [--sizes 1000 10000] [--cutoffs 6 12] [--repeat 3]``
(a few minutes, nearly all of it ASE at 12 Å).

Prints, one thread everywhere, for a periodic liquid-like box of each size and a non-periodic
1000-atom cluster (jittered simple-cubic lattice at 0.1 atoms/Å³; at the default sizes atoms are
≥ 1.5 Å apart) at each cutoff: the seconds per call (best of ``--repeat``; a call of over a
second is not repeated), the ratio of that time to ASE's ``neighbor_list`` in the same run, the
neighbours per atom, and whether the option returned exactly ASE's set of (i, j, cell shift)
triples. lmlp times the whole ``find_neighbors`` call, tensor conversions included. matscipy is
timed if installed (``.venv/bin/pip install matscipy``).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable

import numpy as np
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list
from threadpoolctl import threadpool_limits
from vesin import NeighborList

from lmlp.descriptors import find_neighbors

DENSITY = 0.1
"""Atoms per Å³, liquid-like."""
JITTER = 0.3
"""Largest displacement of an atom from its lattice site along each axis, Å."""
REPEAT_UNDER = 1.0
"""Only calls shorter than this, s, are repeated."""

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]
"""i (P,), j (P,) and integer cell shifts (P, 3) of the directed pairs."""
Search = Callable[[np.ndarray, np.ndarray, np.ndarray, float], Pairs]
"""(positions (N, 3) Å, cell (3, 3) Å, pbc (3,) bool, cutoff Å) -> pairs."""


def liquid(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) positions in Å and the (3, 3) cubic cell of n atoms at ``DENSITY``: n random sites
    of the smallest simple-cubic lattice with at least n sites, each moved by up to ``JITTER``."""
    rng = np.random.default_rng(seed)
    side = (n / DENSITY) ** (1 / 3)
    m = int(np.ceil(n ** (1 / 3) - 1e-9))
    sites = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    sites = sites[rng.choice(len(sites), n, replace=False)]
    positions = (sites + 0.5) * side / m + rng.uniform(-JITTER, JITTER, (n, 3))
    return positions, np.eye(3) * side


def ase_search(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> Pairs:
    return neighbor_list("ijS", Atoms(positions=positions, cell=cell, pbc=pbc), cutoff)


def lmlp_search(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> Pairs:
    """``find_neighbors``; its Cartesian shifts turned back into cell counts to compare with the others."""
    nb = find_neighbors(torch.from_numpy(positions), torch.tensor([0, len(positions)]), cutoff,
                        torch.from_numpy(cell)[None], torch.from_numpy(pbc)[None])
    shifts = nb.shifts.numpy() @ np.linalg.pinv(cell)
    return nb.pairs[0].numpy(), nb.pairs[1].numpy(), np.rint(shifts).astype(np.int64)


def vesin_search(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> Pairs:
    return NeighborList(cutoff=cutoff, full_list=True, n_threads=1).compute(positions, cell, pbc, "ijS")


def matscipy_search(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> Pairs:
    from matscipy.neighbours import neighbour_list

    # matscipy needs an invertible cell: None makes it shrink-wrap a non-periodic structure.
    return neighbour_list("ijS", positions=positions, cell=cell if pbc.any() else None, pbc=pbc, cutoff=cutoff)


def available() -> dict[str, Search]:
    """The options to time, ASE first; matscipy (not an lmlp dependency) only if installed."""
    options = {"ASE neighbor_list": ase_search, "lmlp find_neighbors": lmlp_search, "vesin": vesin_search}
    if importlib.util.find_spec("matscipy"):
        options["matscipy"] = matscipy_search
    else:
        print("matscipy not installed: skipped (.venv/bin/pip install matscipy)")
    return options


def triples(i: np.ndarray, j: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """(P, 5) int64 rows (i, j, shift) in lexicographic order, to compare pair sets exactly."""
    rows = np.column_stack([i, j, shifts]).astype(np.int64)
    return rows[np.lexsort(rows.T[::-1])]


def timed(search: Search, case: tuple, repeat: int) -> tuple[float, Pairs]:
    """Best wall time in s of up to ``repeat`` calls (stopping after one over ``REPEAT_UNDER``) and
    the last call's result."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = search(*case)
        best = min(best, time.perf_counter() - start)
        if best > REPEAT_UNDER:
            break
    return best, result


def run_case(label: str, case: tuple, options: dict[str, Search], repeat: int) -> None:
    """Time every option on ``case`` = (positions, cell, pbc, cutoff) and print one line each."""
    n_atoms = len(case[0])
    print(f"{label}:")
    reference, t_ase = None, None
    for name, search in options.items():
        elapsed, result = timed(search, case, repeat)
        found = triples(*result)
        if reference is None:
            reference, t_ase = found, elapsed
        same = "same triples as ASE" if np.array_equal(found, reference) else "DIFFERENT triples from ASE"
        print(f"  {name:20s} {elapsed:9.4f} s  {elapsed / t_ase:6.3f} x ASE  "
              f"{len(found) / n_atoms:6.1f} neighbours/atom  {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--cutoffs", type=float, nargs="+", default=[6.0, 12.0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = available()
    with threadpool_limits(1):
        warm_up = (*liquid(10, seed=0), np.ones(3, dtype=bool), 3.0)
        for search in options.values():  # first-call costs (lazy imports, thread pools) untimed
            search(*warm_up)
        for n in args.sizes:
            positions, cell = liquid(n, seed=n)
            for cutoff in args.cutoffs:
                run_case(f"periodic box, {n} atoms, {cell[0, 0]:.1f} Å side, cutoff {cutoff:g} Å",
                         (positions, cell, np.ones(3, dtype=bool), cutoff), options, args.repeat)
        positions, _ = liquid(1000, seed=1)
        for cutoff in args.cutoffs:
            run_case(f"non-periodic cluster, 1000 atoms, cutoff {cutoff:g} Å",
                     (positions, np.zeros((3, 3)), np.zeros(3, dtype=bool), cutoff), options, args.repeat)


if __name__ == "__main__":
    main()
