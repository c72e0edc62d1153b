"""Data larger than memory: peak memory of ``lmlp train`` with the descriptor cache on disk.

Run: ``.venv/bin/python benchmarks/large_data.py [--structures 200000] [--epochs 3] [--modes disk,memory]``.

A synthetic set of ``--structures`` 6-atom structures is made by repeating the shipped SN2 data
with every atom displaced by N(0, 0.02 Å) per copy (labels copied: fine for timing and memory,
meaningless for accuracy), keeping each copy's train/test split. Each mode trains the default
architecture (10 members, 25-25, 102 eeACSFs, float32) for ``--epochs`` epochs with a 10 % fit
fraction and per-epoch training metrics on a 1000-structure sample, in its own process; the
table gives wall time, peak resident memory (``ru_maxrss`` of the child) and the size of the
descriptor cache files. In memory, the descriptors and their derivatives of every structure are
held at once (about 44 kB per 6-atom structure in float32); on disk, one block of 500 structures
at a time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from lmlp.data import concatenate, read_structures, write_structures


def synthetic(source: Path, n: int, out: Path) -> None:
    """``n`` structures: displaced copies of ``source`` (module docstring)."""
    s, _ = read_structures(source)
    rng = np.random.default_rng(0)
    copies = [replace(s, positions=s.positions + rng.normal(0.0, 0.02, s.positions.shape))
              for _ in range(-(-n // len(s)))]
    big = concatenate(copies, keep_splits=True)
    kept = big.subset(np.arange(n))
    write_structures(out, replace(kept, split={k: v[v < n] for k, v in big.split.items()}))


def run(mode: str, data: Path, work: Path, epochs: int) -> tuple[float, float, float]:
    """Wall time (s), peak RSS (GB) and cache size (GB) of one ``lmlp train``."""
    run_dir = work / f"run-{mode}"
    config = {
        "name": f"large-{mode}", "data": {"path": str(data)},
        "selection": {"fit_fraction": 0.1},
        "training": {"epochs": epochs, "descriptor_cache": mode, "train_metrics_sample": 1000,
                     "checkpoint_every": epochs},
        "output": {"run_dir": str(run_dir), "progress": False, "plots": False},
    }
    path = work / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "lmlp", "train", str(path)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"lmlp train ({mode}) failed with status {status}")
    cache = sum(p.stat().st_size for p in run_dir.glob("descriptors_*.h5"))
    return wall, usage.ru_maxrss / 1024**2, cache / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--modes", default="disk,memory")
    parser.add_argument("--data", type=Path, default=Path("data/sn2_gfn2xtb.h5"))
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        data = work / "synthetic.h5"
        start = time.perf_counter()
        synthetic(args.data, args.structures, data)
        print(f"synthetic set: {args.structures:,} structures, {data.stat().st_size / 1e6:.0f} MB "
              f"({time.perf_counter() - start:.0f} s); {args.epochs} epochs, fit fraction 0.1")
        print(f"{'cache':8s} {'wall / s':>9s} {'peak RSS / GB':>14s} {'cache files / GB':>17s}")
        for mode in args.modes.split(","):
            wall, rss, cache = run(mode, data, work, args.epochs)
            print(f"{mode:8s} {wall:9.0f} {rss:14.2f} {cache:17.2f}", flush=True)


if __name__ == "__main__":
    main()
