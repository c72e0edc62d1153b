"""Descriptor throughput: lmlp eeACSF (G, G + dG/dR; float32, float64) against dscribe ACSF (G).

Run: ``.venv/bin/python benchmarks/descriptors.py [--data data/sn2_gfn2xtb.h5] [--threads 2]``.
Prints structures per second on the shipped SN2 set, the ratio to dscribe, and the scaling with
molecule size on random clusters (6, 30, 100, 300 atoms): the cost per atom follows the number of
neighbour pairs within the cutoff (G5 with integer ζ, by moments) or of their triples (else), the
cost per pair or triple stays flat.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from ase import Atoms

from lmlp.config import DescriptorConfig
from lmlp.data import read_structures
from lmlp.descriptors import SymmetryFunctions, find_neighbors, find_triples

CHUNK = 500


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls, s."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def chunks(numbers, positions, offsets):
    for c in range(0, len(offsets) - 1, CHUNK):
        off = offsets[c : c + CHUNK + 1]
        a, b = int(off[0]), int(off[-1])
        yield numbers[a:b], positions[a:b], off - a


def lmlp_rates(sf, numbers, positions, offsets, dtype) -> tuple[float, float]:
    pos = positions.to(dtype)
    n = len(offsets) - 1
    t_g = timed(lambda: [sf(z, p, o) for z, p, o in chunks(numbers, pos, offsets)])
    t_d = timed(lambda: [sf.with_derivatives(z, p, o) for z, p, o in chunks(numbers, pos, offsets)])
    return n / t_g, n / t_d


def dscribe_rate(images, species, n_functions_target: int) -> tuple[float, int] | None:
    try:
        from dscribe.descriptors import ACSF
    except ImportError:
        return None
    n_el = len(species)
    n_pairs = n_el * (n_el + 1) // 2
    n_radial = max(1, round((n_functions_target * 0.4) / n_el) - 1)
    n_angular = max(1, round((n_functions_target * 0.6) / n_pairs))
    g2 = [[4.0, rs] for rs in np.linspace(0.8, 5.7, n_radial)]
    g4 = [[eta, zeta, lam] for eta in (0.0, 0.0625, 0.25) for zeta in (1.0, 4.0) for lam in (-1.0, 1.0)]
    acsf = ACSF(species=species, r_cut=6.0, g2_params=g2, g4_params=g4[:n_angular])
    elapsed = timed(lambda: acsf.create(images, n_jobs=torch.get_num_threads()), repeat=1)
    return len(images) / elapsed, acsf.get_number_of_features()


def random_cluster(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SN2-like elements at liquid-like density (≈ 0.1 atoms/Å³), at least 1 Å apart."""
    rng = np.random.default_rng(seed)
    side = (n / 0.1) ** (1 / 3)
    pos = rng.uniform(0, side, (4 * n, 3))
    keep = [0]
    for k in range(1, len(pos)):
        if len(keep) == n:
            break
        if np.min(np.linalg.norm(pos[keep] - pos[k], axis=1)) > 1.0:
            keep.append(k)
    return torch.tensor(rng.choice([1, 6, 9, 17, 35, 53], len(keep))), torch.tensor(pos[keep])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/sn2_gfn2xtb.h5")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s, _ = read_structures(args.data)
    sf = SymmetryFunctions.from_config(DescriptorConfig())
    numbers, positions, offsets = (torch.from_numpy(s.numbers), torch.from_numpy(s.positions),
                                   torch.from_numpy(s.offsets))
    print(f"{len(s)} structures from {args.data}, {sf.n_functions} eeACSFs, {args.threads} threads")
    rates = {}
    for dtype in (torch.float32, torch.float64):
        g, gd = lmlp_rates(sf, numbers, positions, offsets, dtype)
        rates[dtype] = (g, gd)
        print(f"  lmlp {str(dtype)[6:]:8s} G: {g:9.0f} structures/s   G + dG/dR: {gd:9.0f} structures/s "
              f"(whole set {len(s) / gd:.1f} s)")
    images = [Atoms(numbers=s.numbers[a:b], positions=s.positions[a:b]) for a, b in zip(s.offsets[:-1], s.offsets[1:])]
    species = sorted(set(s.numbers.tolist()))
    ref = dscribe_rate(images, species, sf.n_functions)
    if ref is None:
        print("  dscribe not installed: no comparison")
    else:
        rate, n_feat = ref
        print(f"  dscribe ACSF ({n_feat} functions) G: {rate:9.0f} structures/s")
        for dtype, (g, gd) in rates.items():
            print(f"  ratio lmlp/dscribe {str(dtype)[6:]}: G {g / rate:.2f}x, G + dG/dR {gd / rate:.2f}x")
    print("scaling with molecule size (float64, G + dG/dR, one molecule):")
    for n in (6, 30, 100, 300):
        z, pos = random_cluster(n, n)
        off = torch.tensor([0, len(z)])
        t = timed(lambda: sf.with_derivatives(z, pos, off))
        pairs = find_neighbors(pos, off, sf.cutoff).pairs
        items, item = (pairs.shape[1], "pair") if sf.moments else (find_triples(pairs, len(z)).shape[1], "triple")
        print(f"  {len(z):4d} atoms: {t * 1e3:8.2f} ms  ({t / len(z) * 1e6:7.1f} µs/atom, "
              f"{pairs.shape[1] / len(z):5.1f} neighbours/atom, {t / items * 1e6:5.2f} µs/{item})")


if __name__ == "__main__":
    main()
