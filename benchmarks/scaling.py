"""Scale-out over processes (torchrun, gloo): epoch time of ``lmlp train`` and throughput of ``lmlp compare``.

Run: ``.venv/bin/python benchmarks/scaling.py [--processes 2] [--epochs 40]``.

Training: the full SN2 protocol's model (10 members, 25-25, 102 eeACSFs, float32, CoRe, forces in
the loss, 10 % fit fraction, metrics on the test set and a 1000-structure training sample) in
one process with 1 and with all threads, and in N processes with 1 thread each (members spread
over the processes). The time per epoch is the difference of two runs of different length
divided by the difference of their epochs, so start-up and the descriptor cache do not count.

Comparison: 4 optimizer variants × 2 seeds × ``--compare-epochs`` epochs, in one process (all
threads) and in N processes (1 thread each; whole runs spread over the processes); the figure is
runs per minute of wall time, start-up included.

On this repository's 2-core test machine the two "cores" may be hyper-threads of one physical
core; the speed-up printed is what this machine gives, not a property of lmlp.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TRAIN = {
    "name": "scaling", "data": {"path": "data/sn2_gfn2xtb.h5"},
    "training": {"train_metrics_sample": 1000, "checkpoint_every": 1000},
    "output": {"progress": False, "plots": False},
}
VARIANTS = [{"name": "CoRe", "optimizer": "core", "lr": 0.1}, {"name": "RPROP", "optimizer": "rprop", "lr": 0.01},
            {"name": "Adam", "optimizer": "adam", "lr": 0.001}, {"name": "SGD", "optimizer": "sgd", "lr": 0.001}]


def lmlp(args: list[str], processes: int, threads: int) -> float:
    """Wall time (s) of one lmlp command with ``processes`` processes of ``threads`` threads."""
    launcher = [sys.executable, "-m", "lmlp"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "lmlp"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([*launcher, *args], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def epoch_time(work: Path, processes: int, threads: int, epochs: int) -> float:
    """Seconds per training epoch (difference of an ``epochs`` and an ``epochs // 5`` run)."""
    walls = []
    for n in (epochs // 5, epochs):
        run_dir = work / f"train-{processes}x{threads}-{n}"
        cfg = {**TRAIN, "training": {**TRAIN["training"], "epochs": n, "threads": threads},
               "output": {**TRAIN["output"], "run_dir": str(run_dir)}}
        path = work / f"{run_dir.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        walls.append(lmlp(["train", str(path)], processes, threads))
    return (walls[1] - walls[0]) / (epochs - epochs // 5)


def compare_rate(work: Path, processes: int, threads: int, epochs: int) -> float:
    """Comparison runs per minute."""
    out = work / f"compare-{processes}x{threads}"
    cfg = {**TRAIN, "training": {**TRAIN["training"], "epochs": epochs, "threads": threads},
           "compare": {"variants": VARIANTS, "seeds": 2, "out": str(out)}}
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return len(VARIANTS) / lmlp(["compare", str(path)], processes, threads) * 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--compare-epochs", type=int, default=40)
    args = parser.parse_args()
    n = args.processes
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"lmlp train, full SN2 model, s/epoch ({args.epochs} vs {args.epochs // 5} epochs):")
        one = epoch_time(work, 1, 1, args.epochs)
        threaded = epoch_time(work, 1, n, args.epochs)
        spread = epoch_time(work, n, 1, args.epochs)
        print(f"  1 process  × 1 thread : {one:6.3f}")
        print(f"  1 process  × {n} threads: {threaded:6.3f}   ({one / threaded:.2f}x)")
        print(f"  {n} processes × 1 thread: {spread:6.3f}   ({one / spread:.2f}x; {threaded / spread:.2f}x "
              f"against {n} threads)")
        print(f"lmlp compare, {len(VARIANTS)} variants × 2 seeds × {args.compare_epochs} epochs, runs per minute:")
        threaded_rate = compare_rate(work, 1, n, args.compare_epochs)
        spread_rate = compare_rate(work, n, 1, args.compare_epochs)
        print(f"  1 process  × {n} threads: {threaded_rate:6.2f}")
        print(f"  {n} processes × 1 thread: {spread_rate:6.2f}   ({spread_rate / threaded_rate:.2f}x)")


if __name__ == "__main__":
    main()
