"""An SN2 reaction X⁻ + CH3Y → XCH3 + Y⁻ in NVT MD at 300 K with a trained lMLP.

Run: ``.venv/bin/python examples/md_sn2.py [MODEL] [--reaction Cl+CH3Br] [--start ts|complex]
[--steps 4000] [--out md_sn2.png]``, MODEL defaulting to runs/sn2/model.pt (``lmlp train
configs/sn2.yaml``; runs/sn2-quick/model.pt works too).

The start is the approximate transition state X···CH3···Y (planar CH3, both C–halogen bonds
stretched) or the reactant complex X⁻···CH3Y, built by ``lmlp.reference.sn2.build_geometry``.
Langevin MD at 300 K with 0.5 fs steps; the PNG shows the C–X and C–Y distances (Å) and the
ensemble energy uncertainty (standard deviation over members, meV/atom) with its active-learning
threshold over time (fs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402

from lmlp.md import run_md  # noqa: E402
from lmlp.reference.sn2 import BOND, COMPLEX, TS_STRETCH, build_geometry, parse_reaction  # noqa: E402

TIMESTEP_FS = 0.5
RECORD_EVERY = 5
"""Steps between recorded points."""


def start_structure(reaction: str, start: str) -> Atoms:
    """The transition-state ("ts") or reactant-complex ("complex") geometry of ``reaction``."""
    x, y = parse_reaction(reaction)
    if start == "ts":
        return build_geometry(x, y, BOND[x] + TS_STRETCH, BOND[y] + TS_STRETCH, progress=0.5)
    return build_geometry(x, y, COMPLEX[x], BOND[y], progress=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=Path("runs/sn2/model.pt"))
    parser.add_argument("--reaction", default="Cl+CH3Br")
    parser.add_argument("--start", choices=["ts", "complex"], default="ts")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("md_sn2.png"))
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model}: no such model file; train one with `lmlp train configs/sn2.yaml` "
                 f"(or pass runs/sn2-quick/model.pt)")

    record: dict[str, list[float]] = {"time": [], "cx": [], "cy": [], "uncertainty": []}

    def observe(atoms: Atoms) -> None:
        record["time"].append(len(record["time"]) * RECORD_EVERY * TIMESTEP_FS)
        record["cx"].append(atoms.get_distance(0, 4))
        record["cy"].append(atoms.get_distance(0, 5))
        record["uncertainty"].append(atoms.calc.results["energy_uncertainty"] / len(atoms) * 1000)

    summary = run_md(args.model, start_structure(args.reaction, args.start), ensemble="nvt", temperature_K=300,
                     timestep_fs=TIMESTEP_FS, steps=args.steps, seed=args.seed,
                     observers=[(observe, RECORD_EVERY)], progress=True)
    print(summary.format())
    plot(record, args.reaction, summary.thresholds, args.out)
    print(f"wrote {args.out}")


def plot(record: dict[str, list[float]], reaction: str, thresholds, out: Path) -> None:
    """C–X, C–Y distances and the energy uncertainty against time, as a PNG."""
    x, y = parse_reaction(reaction)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6), constrained_layout=True)
    top.plot(record["time"], record["cx"], label=f"C–{x} (attacking)")
    top.plot(record["time"], record["cy"], label=f"C–{y} (leaving)")
    top.set_ylabel("distance / Å")
    top.set_title(f"{x}⁻ + CH3{y} → {x}CH3 + {y}⁻, NVT 300 K (lMLP)")
    top.legend()
    bottom.plot(record["time"], record["uncertainty"], color="tab:red")
    if thresholds is not None:
        bottom.axhline(thresholds.energy_per_atom * 1000, color="grey", linestyle="--", label="threshold")
        bottom.legend()
    bottom.set_ylabel("energy std / meV/atom")
    bottom.set_xlabel("time / fs")
    bottom.set_ylim(bottom=0, top=max(np.max(record["uncertainty"]) * 1.1, 1e-3))
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
