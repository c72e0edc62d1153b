"""Optimizer step time on an lMLP-ensemble-like parameter set, as ratios to Adam.

Run: ``.venv/bin/python benchmarks/optimizers.py [--steps 300] [--threads 2] [--dtype float32]``.

Parameters: 10 members × 4 element networks 100 → 25 → 25 → 1, stacked per element and layer
as (10, n_in, n_out) weights and (10, n_out) biases (24 tensors, 128 040 weights), with fixed
random gradients. Timed: ``torch.optim.Adam(foreach=True)``; lmlp CoRe with p_frozen 0 and 0.1
(freezing active, one freezing group per member and tensor via ``member_dim=0``); and the
reference ``core_optimizer.CoRe`` with the same two settings on the same stacked tensors (its
freezing groups are then whole stacked tensors, which only makes its selection cheaper).
Every optimizer first runs past t_hist; then the optimizers take turns step by step so that
load from other processes hits them alike, and the median step time of each is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lmlp.optim import CoRe

MEMBERS = 10
ELEMENTS = 4
LAYERS = (100, 25, 25, 1)
T_HIST = 50


def ensemble_parameters(dtype: torch.dtype) -> list[torch.Tensor]:
    """Stacked weights (M, n_in, n_out) and biases (M, n_out) with fixed random gradients."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for _ in range(ELEMENTS):
        for n_in, n_out in zip(LAYERS[:-1], LAYERS[1:]):
            for shape in ((MEMBERS, n_in, n_out), (MEMBERS, n_out)):
                p = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()
                p.grad = torch.randn(shape, generator=generator, dtype=dtype)
                params.append(p)
    return params


def optimizers(dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """Name → step function of each benchmarked optimizer, on its own parameter copy."""
    frozen = {"score_history": T_HIST, "frozen": 0.1}
    steps = {
        "Adam(foreach=True)": torch.optim.Adam(ensemble_parameters(dtype), foreach=True).step,
        "lmlp CoRe": CoRe(ensemble_parameters(dtype)).step,
        "lmlp CoRe p_frozen=0.1": CoRe(ensemble_parameters(dtype), **frozen, member_dim=0).step,
    }
    try:
        import core_optimizer
    except ImportError:
        print("core_optimizer not installed: reference rows skipped")
        return steps
    steps["core_optimizer.CoRe"] = core_optimizer.CoRe(ensemble_parameters(dtype)).step
    steps["core_optimizer.CoRe p_frozen=0.1"] = core_optimizer.CoRe(ensemble_parameters(dtype), **frozen).step
    return steps


def median_step_times(steps: dict[str, Callable[[], None]], n_steps: int) -> dict[str, float]:
    """Median wall time per step, s, after 2 t_hist warm-up steps, optimizers interleaved."""
    for step in steps.values():
        for _ in range(2 * T_HIST):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n_steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per optimizer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    medians = median_step_times(optimizers(dtype), args.steps)
    adam = medians["Adam(foreach=True)"]
    print(f"{args.threads} threads, {args.dtype}, median of {args.steps} steps")
    print(f"{'optimizer':34s} {'step / µs':>10s} {'/ Adam':>8s}")
    for name, seconds in medians.items():
        print(f"{name:34s} {seconds * 1e6:10.0f} {seconds / adam:8.2f}")


if __name__ == "__main__":
    main()
