"""Accuracy experiments on the SN2 data: one config change at a time against the full protocol.

Each experiment is ``benchmarks/accuracy_base.yaml`` (the full protocol as it was before these
experiments, ``configs/sn2.yaml`` of then, with the independent set under ``data.extra_test``)
with a few keys overridden (dotted paths). It trains in
``runs/accuracy/<name>``, then appends one JSON line to
``examples/results/accuracy/experiments.jsonl``: the overrides, the resolved config, the wall time, and the ensemble
RMSEs on the validation split (which chose the epochs), the test split and the independent set
(``data.extra_test``), with the uncertainty calibration on the latter and its errors per part of
the independent protocol (relaxed scan, displaced copies, MD per temperature). ``docs/accuracy.md``
discusses them.

Run: ``.venv/bin/python benchmarks/accuracy.py NAME [NAME ...]`` (``--list`` shows the names,
``--table`` prints the recorded experiments as the Markdown table of ``docs/accuracy.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmlp.config import config_from_dict, dump_config, with_overrides
from lmlp.data import read_structures
from lmlp.fileio import atomic_write_text
from lmlp.metrics import model_batch
from lmlp.modelfile import load_model
from lmlp.reference.sn2 import INDEPENDENT_PARTS
from lmlp.train import format_table, train
from lmlp.uncertainty import structure_errors

BASE = Path("benchmarks/accuracy_base.yaml")
RESULTS = Path("examples/results/accuracy/experiments.jsonl")

COARSE_RS = [0.8, 1.5, 2.2, 2.9, 3.6, 4.3, 5.0, 5.7, 6.5, 7.5, 8.5, 9.5, 10.5, 11.5]
"""The radial centres of the base config (η = 4 to 5.7 Å, then 1 Å⁻²)."""
FINE = {"descriptor.radial_eta": [16.0] * 4 + [4.0] * 8 + [1.0] * 6,
        "descriptor.radial_rs": [0.9, 1.1, 1.3, 1.5] + COARSE_RS}
"""Four narrow shells (η = 16 Å⁻², 0.18 Å wide) at C–H and short C–X distances added."""
FINER = {"descriptor.radial_eta": [16.0] * 10 + [4.0] * 8 + [1.0] * 6,
         "descriptor.radial_rs": [0.9, 1.1, 1.3, 1.5, 1.7, 1.9, 2.1, 2.3, 2.5, 2.7] + COARSE_RS}
"""Ten narrow shells from 0.9 to 2.7 Å: C–H, C–X bonds and the transition-state C–X range."""

PROTOCOL = {**FINER, "training.steps_per_epoch": 2, "training.validation_every": 5}
"""The full protocol since these experiments (``configs/sn2.yaml``)."""

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "steps2": {"training.steps_per_epoch": 2},
    "wide40": {"model.hidden": [40, 40]},
    "radial_fine": FINE,
    "steps2_validate5": {"training.steps_per_epoch": 2, "training.validation_every": 5},
    "fine_steps2_validate5": {**FINE, "training.steps_per_epoch": 2, "training.validation_every": 5},
    "finer_steps2_validate5": PROTOCOL,
    "angular6": {**PROTOCOL, "descriptor.angular_cutoff": 6.0},
    "angular6_zeta16": {**PROTOCOL, "descriptor.angular_cutoff": 6.0, "descriptor.angular_zeta": [1.0, 4.0, 16.0]},
    "angular6_forces2": {**PROTOCOL, "descriptor.angular_cutoff": 6.0, "training.force_weight": 2.0},
    "angular6_displaced1500": {**PROTOCOL, "descriptor.angular_cutoff": 6.0, "data.path": "data/sn2_gfn2xtb_augmented.h5",
                               "selection.fit_fraction": 0.0828},
}
"""Experiment name: overrides of ``BASE`` (dotted key: value)."""


def run(name: str) -> dict[str, Any]:
    """Train experiment ``name`` and return its record."""
    overrides = EXPERIMENTS[name]
    cfg = config_from_dict(with_overrides(yaml.safe_load(BASE.read_text()), overrides), f"{BASE} + {name}")
    cfg = dataclasses.replace(cfg, name=name, output=dataclasses.replace(
        cfg.output, run_dir=f"runs/accuracy/{name}", progress=False))
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    print(format_table(result), flush=True)
    record = {
        "name": name, "overrides": overrides, "config": yaml.safe_load(dump_config(cfg)), "wall_s": round(wall, 1),
        "best_epochs": result.best_epoch.tolist(),
        **{split: {k: round(v, 3) for k, v in getattr(result, split).ensemble.items()}
           for split in ("validation", "test")},
        "independent": {path: {k: round(v, 3) for k, v in m.ensemble.items()} for path, m in result.extra_test.items()},
        "uncertainty": {path: r.as_dict() for path, r in result.extra_test_uncertainty.items()},
        "independent_parts": {path: by_part(result.run_dir / "model.pt", path) for path in cfg.data.extra_test},
    }
    return record


def by_part(model_path: Path, data_path: str) -> dict[str, dict[str, float]]:
    """Ensemble RMSE of E (meV/atom) and F (meV/Å) per part of an independent SN2 set."""
    model, _ = load_model(model_path)
    s, _ = read_structures(data_path)
    errors = structure_errors(model, model_batch(model, s))
    part = s.trajectory % 10
    return {name: {"n": int((part == k).sum()),
                   "rmse_e": round(float(np.sqrt(np.mean(errors["energy_error"][part == k] ** 2))), 3),
                   "rmse_f": round(float(np.sqrt(np.mean(errors["force_error"][part == k] ** 2 * s.n_atoms[part == k])
                                                 / np.mean(s.n_atoms[part == k]))), 2)}
            for k, name in INDEPENDENT_PARTS.items() if (part == k).any()}


def describe(overrides: dict[str, Any]) -> str:
    """The overrides in a table cell; the radial shell sets by name."""
    shells = {"FINE": (FINE, "4 narrow radial shells (η 16 Å⁻², 0.9–1.5 Å) added"),
              "FINER": (FINER, "10 narrow radial shells (η 16 Å⁻², 0.9–2.7 Å) added")}
    parts, rest = [], dict(overrides)
    for shell, text in shells.values():
        if all(rest.get(k) == v for k, v in shell.items()):
            parts.append(text)
            rest = {k: v for k, v in rest.items() if k not in shell}
    return ", ".join(parts + [f"`{k}: {v}`" for k, v in rest.items()]) or "—"


def table(records: list[dict[str, Any]]) -> str:
    """The recorded experiments as a Markdown table: ensemble RMSEs E (meV/atom) / F (meV/Å)."""
    lines = ["| experiment | change | wall | validation | test | independent | displaced copies | Spearman E / F |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        (path, ind), = r["independent"].items()
        part = r["independent_parts"][path]["displaced copies"]
        rho = r["uncertainty"][path]
        change = describe(r["overrides"])
        cells = [f"{r[s]['rmse_e']:.2f} / {r[s]['rmse_f']:.1f}" for s in ("validation", "test")]
        lines.append(f"| {r['name']} | {change} | {r['wall_s'] / 60:.1f} min | {cells[0]} | {cells[1]} "
                     f"| {ind['rmse_e']:.2f} / {ind['rmse_f']:.1f} | {part['rmse_e']:.2f} / {part['rmse_f']:.1f} "
                     f"| {rho['energy']['spearman']:.2f} / {rho['forces']['spearman']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="experiments to run")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--table", action="store_true", help="print the recorded experiments as a table and exit")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(line) for line in RESULTS.read_text().splitlines()]))
        return
    if args.list or not args.names:
        for name, overrides in EXPERIMENTS.items():
            print(f"{name:12s} {overrides}")
        return
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"unknown experiments {unknown}; --list shows them")
    for name in args.names:
        record = run(name)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        earlier = RESULTS.read_text() if RESULTS.is_file() else ""
        atomic_write_text(RESULTS, earlier + json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
