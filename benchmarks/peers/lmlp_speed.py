"""lmlp's energy + force call rate on the systems ``mace_sn2.py evaluate`` times MACE on.

The same structures (the first test structure, 6 atoms; 16 test complexes on a 4 × 4 grid 8 Å
apart, 96 atoms), the same calls (a fresh 0.001 Å displacement before each), one thread. Run with
lmlp's own venv, from the repository root:

    .venv/bin/python benchmarks/peers/lmlp_speed.py runs/sn2/model.pt

Writes ``examples/results/peers/lmlp_speed.json`` (calls per second, float32 and float64).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mace_sn2 import DATA, RESULTS, calls_per_second, grid_of_complexes  # noqa: E402

from lmlp.calculator import LMLPCalculator  # noqa: E402
from lmlp.data import read_structures  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an lmlp model file")
    parser.add_argument("--calls-small", type=int, default=2000)
    parser.add_argument("--calls-large", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    test = read_structures(DATA)[0].split_subset("test")
    small = test.atoms(0)
    small.calc = None
    large = grid_of_complexes(test)
    result = {"model": str(args.model), "threads": 1, "units": "energy+force calls per second"}
    for dtype in (torch.float32, torch.float64):
        calc = LMLPCalculator(args.model, dtype=dtype)
        result[str(dtype).removeprefix("torch.")] = {
            f"{len(small)} atoms": calls_per_second(calc, small, args.calls_small),
            f"{len(large)} atoms": calls_per_second(calc, large, args.calls_large),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lmlp_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
