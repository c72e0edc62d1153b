"""What faster symmetry-function kernels could buy: 100-atom calls with the terms' cost removed.

Run (on an idle machine, about two minutes)::

    .venv/bin/python benchmarks/term_cost.py --out examples/results/md-scaling

The 100-atom systems of ``benchmarks/md.py`` (SN2 box and CH3Cl liquid) with the model file
``--model``, float32, single-threaded, energy + forces calls per second (``md.call_rate``: atoms moved
~0.001 Å between calls, best of 3 blocks), with every member's forces and with the ensemble-mean
forces only. Each is timed four ways:

- "as is": the calculator as shipped (eager blocked path);
- "compiled pair data + radial": ``terms.pair_data`` and ``terms.radial`` through
  ``torch.compile`` (one fused loop each instead of several passes over the pairs);
- "radial terms free": the radial terms and slopes computed once and then reused, so they cost
  nothing per call;
- "all terms free": the pair data, radial and angular terms and their slopes reused.

The last two are bounds: however fast the terms were made (hand-written fused kernels, say), a call
cannot be faster than with the terms free, because the rest (slot sums, networks, the contraction of
dE/dG with the slopes, force sums, neighbour-list checks) remains. Reused terms make the forces
wrong; only the time is measured.

Output: a table, and with ``--out DIR`` ``DIR/term_cost.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent))
import md  # noqa: E402  (benchmarks/md.py: the systems and the timing)

import lmlp.calculator as calculator  # noqa: E402
from lmlp.calculator import LMLPCalculator, TooCloseWarning  # noqa: E402
from lmlp.data.hdf5 import read_structures  # noqa: E402
from lmlp.descriptors import terms  # noqa: E402
from lmlp.descriptors.terms import TermParameters  # noqa: E402

MODES = ("as is", "compiled pair data + radial", "radial terms free", "all terms free")


def reused(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (of ``TermParameters`` or the calculator) computed once per argument shape and value
    and then returned again."""
    results: dict[tuple, Any] = {}

    def wrapper(self: Any, *args: Any) -> Any:
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in results:
            results[key] = method(self, *args)
        return results[key]

    return wrapper


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    """The term functions as ``name`` (one of ``MODES``) has them, restored afterwards. The blocked
    path evaluates the radial terms through ``LMLPCalculator._radial_block`` (the calculator's
    ``radial``), the rest through ``TermParameters``."""
    saved = {"pair_data": terms.pair_data, "radial": calculator.radial}
    methods = {key: getattr(TermParameters, key) for key in ("pair_data", "angular_items")}
    block = LMLPCalculator._radial_block
    try:
        if name == "compiled pair data + radial":
            terms.pair_data = torch.compile(saved["pair_data"], dynamic=True)
            calculator.radial = torch.compile(saved["radial"], dynamic=True)
        elif name in ("radial terms free", "all terms free"):
            LMLPCalculator._radial_block = reused(block)
        if name == "all terms free":
            for key, method in methods.items():
                setattr(TermParameters, key, reused(method))
        yield
    finally:
        terms.pair_data, calculator.radial = saved["pair_data"], saved["radial"]
        LMLPCalculator._radial_block = block
        for key, method in methods.items():
            setattr(TermParameters, key, method)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """System: mode: calls/s with member forces and with mean forces."""
    model = md.lmlp_settings(args.model, (6.0, 4.0))["model"][0]
    s, _ = read_structures(args.data)
    systems = md.build_systems([args.size], md.SN2_DENSITY, md.reactant_complex(s, md.BOX_REACTION), 0)
    results: dict[str, Any] = {}
    for system, by_size in systems.items():
        atoms = by_size[args.size]
        results[system] = {"atoms": len(atoms)}
        for name in MODES:
            with mode(name):
                rates = [md.call_rate(atoms, LMLPCalculator(model, dtype=torch.float32, backend="eager",
                                                            member_forces=members), args.budget).calls_per_s
                         for members in (True, False)]
            results[system][name] = {"member_forces": rates[0], "mean_forces": rates[1]}
            print(f"{system:13s} {len(atoms):4d} atoms  {name:28s} {rates[0]:6.1f} / {rates[1]:6.1f} calls/s",
                  flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/sn2/model.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/sn2_gfn2xtb.h5"))
    parser.add_argument("--size", type=int, default=100, help="atoms per system")
    parser.add_argument("--budget", type=float, default=6.0, help="timed seconds per point")
    parser.add_argument("--out", type=Path, help="directory for term_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", TooCloseWarning)
    print("energy + forces calls/s, float32, single-threaded: member forces / mean forces")
    with threadpool_limits(limits=1):
        results = measure(args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"machine": md.machine(), "model": str(args.model), "size": args.size, "results": results}
        (args.out / "term_cost.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out / 'term_cost.json'}")


if __name__ == "__main__":
    main()
