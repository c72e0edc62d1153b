"""DFT quality through lifelong learning: the GFN2-xTB model continued on a few B3LYP labels.

Needs ``runs/sn2/model.pt`` (``lmlp train configs/sn2.yaml``) and the B3LYP files of docs/data.md,
merged into ``data/sn2_b3lyp.h5``::

    lmlp data merge data/sn2_b3lyp.h5 data/sn2_b3lyp_train.h5 data/sn2_b3lyp_validation.h5 data/sn2_b3lyp_test.h5
    .venv/bin/python examples/dft_transfer.py --sizes 100 300 1000 0 --out examples/results/dft-transfer

For each number of DFT training structures (``--sizes``; 0: all of the file; the first n of the
file are an even sample) ``configs/sn2-dft.yaml`` trains three ways:

- **continued, p_frozen 0.1**: from ``runs/sn2/model.pt`` with its CoRe state and selection
  weights, reference energies refitted, 10 % of the weights frozen (stability–plasticity balance);
- **continued, p_frozen 0**: the same with nothing frozen (plasticity only);
- **scratch**: new networks on the DFT labels alone.

Reported, per run (ensemble RMSE, E meV/atom, F meV/Å): the DFT validation, test and independent
sets; the stability side, the forces against GFN2-xTB on the xTB test split and the xTB test energies
after refitting E_ref to them (only per-element constants differ between the methods' totals); and
for the largest size, the barrier along the relaxed GFN2-xTB scan of each reaction (highest minus
lowest scan point of the independent set; model against DFT). The DFT labelling time saved is the
number of DFT structures the scratch model needs for the continued model's test error (interpolated on
its learning curve, log-log) minus those used, times the measured seconds per structure. The target
(``TARGET``): each continued run of at most ``TARGET_SIZE`` structures against scratch on the most
structures, as error ratios on the test and independent sets.

Runs go to ``runs/dft-transfer/<variant>-<n>``; a run whose ``metrics.json`` exists is not repeated
(its model is evaluated on the independent set if the run was not).
Writes ``results.json``, ``transfer.png`` and ``results.md`` (tables) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from ase.units import kcal, mol

from lmlp.batch import chunks, predict_all
from lmlp.config import load_config, parse_overrides
from lmlp.data import StructureSet, read_structures
from lmlp.metrics import evaluate_model, model_batch
from lmlp.model import HDNNPEnsemble
from lmlp.modelfile import load_model
from lmlp.reference.sn2 import INDEPENDENT_PARTS
from lmlp.train import train
from lmlp.train.continual import refit_reference_energies

CONFIG = Path("configs/sn2-dft.yaml")
XTB_MODEL = Path("runs/sn2/model.pt")
XTB_DATA = Path("data/sn2_gfn2xtb.h5")
TRAIN_LABELS = Path("data/sn2_b3lyp_train.h5")
"""The DFT training labels as labelled (their attributes hold the labelling time)."""
RUNS = Path("runs/dft-transfer")
TARGET, TARGET_SIZE = 1.2, 1000
"""Target: with at most 1,000 DFT structures, the continued ensemble within 1.2× the errors of scratch
on all DFT labels (in ``target_ratios``: scratch on the most structures run, all of them with size 0)."""
VARIANTS = {
    "continued-p0.1": ("continued, p_frozen 0.1", True, 0.1),
    "continued-p0": ("continued, p_frozen 0", True, 0.0),
    "scratch": ("scratch (DFT only)", False, 0.1),
}
"""Run name: (description, continued from the xTB model, CoRe p_frozen)."""
SCAN = [k for k, name in INDEPENDENT_PARTS.items() if name == "relaxed scan"][0]
KCAL_MOL = kcal / mol
"""1 kcal/mol in eV."""


def run(variant: str, n: int, independent: Path, runs: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Train (or read) one variant with the first ``n`` DFT training structures (0: all) in ``runs``,
    with the config overrides ``extra``."""
    _, continued, p_frozen = VARIANTS[variant]
    run_dir = runs / f"{variant}-{n or 'all'}"
    overrides = {"name": run_dir.name, "output.run_dir": str(run_dir), "output.progress": False,
                 "optimizer.params.p_frozen": p_frozen, "data.max_train": n or None,
                 "data.extra_test": [str(independent)], **extra}
    if not (run_dir / "metrics.json").is_file():
        cfg = load_config(CONFIG, overrides)
        train(cfg, continue_from=XTB_MODEL if continued else None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model, _ = load_model(run_dir / "model.pt")
    cfg = load_config(CONFIG, overrides)
    n_train = len(read_structures(cfg.data.path)[0].split["train"]) if not n else n
    evaluated = metrics.get("extra_test", {})
    record = {"variant": variant, "n": n_train, "run_dir": str(run_dir), "wall_s": round(metrics["wall_time_s"], 1),
              "validation": metrics["validation"]["ensemble"], "test": metrics["test"]["ensemble"],
              "independent": (evaluated[str(independent)]["ensemble"] if str(independent) in evaluated
                              else evaluate_model(model, read_structures(independent)[0])["all"].ensemble),
              "xtb_test": xtb_ability(model)}
    print(f"{variant:15s} n={n_train:5d}  test {record['test']['rmse_e']:.2f} / {record['test']['rmse_f']:.1f}  "
          f"independent {record['independent']['rmse_e']:.2f} / {record['independent']['rmse_f']:.1f}  "
          f"xTB forces {record['xtb_test']['rmse_f']:.1f}", flush=True)
    return record


def xtb_ability(model: HDNNPEnsemble) -> dict[str, float]:
    """Ensemble RMSE against GFN2-xTB on its test split: forces as they are, energies after E_ref is
    refitted to the xTB energies (meV/atom, meV/Å)."""
    s = read_structures(XTB_DATA)[0].split_subset("test")
    refitted = copy.deepcopy(model)
    refit_reference_energies(refitted, s)
    metrics = evaluate_model(refitted, s)["all"].ensemble
    return {"rmse_e": metrics["rmse_e"], "rmse_f": metrics["rmse_f"]}


def structure_energies(model: HDNNPEnsemble, s: StructureSet) -> np.ndarray:
    """Ensemble-mean energies (S,) eV."""
    return predict_all(model, chunks(model_batch(model, s)))[0].mean(0).numpy()


def barriers(model_path: Path, independent: Path) -> dict[str, dict[str, float]]:
    """Per reaction: highest minus lowest energy (kcal/mol) of the relaxed-scan points, DFT and model."""
    s = read_structures(independent)[0]
    model, _ = load_model(model_path)
    predicted = structure_energies(model, s)
    out = {}
    for reaction in sorted(set(s.label.tolist())):
        scan = np.flatnonzero((s.label == reaction) & (s.trajectory % 10 == SCAN))
        if len(scan) < 3:
            continue
        dft, lmlp = s.energy[scan], predicted[scan]
        out[reaction] = {"points": len(scan), "dft": float(np.ptp(dft) / KCAL_MOL), "lmlp": float(np.ptp(lmlp) / KCAL_MOL)}
    return out


def barrier_report(runs: Path, n: int, independent: Path) -> dict[str, Any]:
    """``barriers`` of each variant's model with ``n`` DFT structures (0: all), with their mean and
    largest absolute error (kcal/mol)."""
    report = {"independent": str(independent)}
    for variant in VARIANTS:
        model = runs / f"{variant}-{n or 'all'}" / "model.pt"
        if model.is_file():
            b = barriers(model, independent)
            errors = np.abs([v["lmlp"] - v["dft"] for v in b.values()])
            report[variant] = {"model": str(model), "reactions": len(b), "mae": float(errors.mean()),
                               "max_abs": float(errors.max()), "barriers": b}
    return report


def labelling_saved(records: list[dict[str, Any]], seconds_per_structure: float) -> dict[str, Any]:
    """DFT structures (and hours) the scratch model would need for the continued (p_frozen 0.1)
    model's test force error at each size, minus those used: log-log interpolation of the scratch
    learning curve (None beyond its largest size)."""
    scratch = sorted((r["n"], r["test"]["rmse_f"]) for r in records if r["variant"] == "scratch")
    out = {}
    for r in sorted((r for r in records if r["variant"] == "continued-p0.1"), key=lambda r: r["n"]):
        target = r["test"]["rmse_f"]
        needed = None
        for (n0, e0), (n1, e1) in zip(scratch, scratch[1:]):
            if e0 >= target >= e1 and e0 != e1:
                t = np.log(e0 / target) / np.log(e0 / e1)
                needed = float(np.exp(np.log(n0) + t * np.log(n1 / n0)))
        if scratch and target >= scratch[0][1]:
            needed = float(scratch[0][0])
        out[str(r["n"])] = {"scratch_needs": needed, "saved_structures": None if needed is None else needed - r["n"],
                            "saved_hours": None if needed is None else (needed - r["n"]) * seconds_per_structure / 3600}
    return out


def in_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run records by number of structures, then in the order of ``VARIANTS``."""
    return sorted(records, key=lambda r: (r["n"], list(VARIANTS).index(r["variant"])))


def target_ratios(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The errors of each continued run of at most ``TARGET_SIZE`` structures over those of scratch on
    the most structures (test and independent set, E and F), and whether all four are ≤ ``TARGET``."""
    scratch = [r for r in records if r["variant"] == "scratch"]
    if not scratch:
        return {}
    reference = max(scratch, key=lambda r: r["n"])
    out: dict[str, Any] = {"scratch_n": reference["n"], "runs": []}
    for r in in_order(records):
        if r["variant"] != "scratch" and r["n"] <= TARGET_SIZE:
            ratios = {f"{split}_{key}": r[split][key] / reference[split][key]
                      for split in ("test", "independent") for key in ("rmse_e", "rmse_f")}
            out["runs"].append({"variant": r["variant"], "n": r["n"], **ratios,
                                "met": all(v <= TARGET for v in ratios.values())})
    return out


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Test and independent-set RMSE (E, F) against the number of DFT training structures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, unit in ((axes[0], "rmse_e", "meV/atom"), (axes[1], "rmse_f", "meV/Å")):
        for variant, (label, _, _) in VARIANTS.items():
            rows = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["n"])
            if rows:
                n = [r["n"] for r in rows]
                line, = ax.plot(n, [r["test"][key] for r in rows], "o-", label=f"{label}, test")
                ax.plot(n, [r["independent"][key] for r in rows], "s--", color=line.get_color(), alpha=0.6,
                        label=f"{label}, independent")
        ax.set_xscale("log")
        ax.set_yscale("log")
        sizes = sorted({r["n"] for r in records})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("DFT training structures")
        ax.set_ylabel(f"RMSE {'E' if key == 'rmse_e' else 'F'} / {unit}")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("B3LYP/def2-SVPD/RI: continued from the GFN2-xTB lMLP vs from scratch")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def tables(results: dict[str, Any]) -> str:
    """Markdown tables of the runs and the barriers."""
    lines = ["| variant | DFT structures | validation E / F | test E / F | independent E / F | xTB test E / F | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in in_order(results["runs"]):
        cells = [f"{r[k]['rmse_e']:.2f} / {r[k]['rmse_f']:.1f}" for k in ("validation", "test", "independent", "xtb_test")]
        lines.append(f"| {VARIANTS[r['variant']][0]} | {r['n']} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
    target = results.get("target") or {}
    if target.get("runs"):
        lines += ["", f"Target: errors over those of scratch on {target['scratch_n']} structures (≤ {TARGET}×):", "",
                  "| variant | DFT structures | test E | test F | independent E | independent F | met |",
                  "|---|---|---|---|---|---|---|"]
        for t in target["runs"]:
            cells = " | ".join(f"{t[k]:.2f}×" for k in ("test_rmse_e", "test_rmse_f", "independent_rmse_e",
                                                          "independent_rmse_f"))
            lines.append(f"| {VARIANTS[t['variant']][0]} | {t['n']} | {cells} | {'yes' if t['met'] else 'no'} |")
    lines += ["", f"Barriers along the GFN2-xTB relaxed scan (kcal/mol), {results['barrier_model']}:", "",
              "| reaction | scan points | B3LYP | lMLP | error |", "|---|---|---|---|---|"]
    for reaction, b in results["barriers"].items():
        lines.append(f"| {reaction} | {b['points']} | {b['dft']:.2f} | {b['lmlp']:.2f} | {b['lmlp'] - b['dft']:+.2f} |")
    errors = [b["lmlp"] - b["dft"] for b in results["barriers"].values()]
    if errors:
        lines.append(f"| MAE | | | | {np.mean(np.abs(errors)):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("examples/results/dft-transfer"))
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the runs go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (as lmlp train --set), e.g. training.epochs=20")
    parser.add_argument("--independent", type=Path, help="independent DFT file (default: the config's; e.g. a "
                        "copy of a partly labelled one, so that every run sees the same structures)")
    parser.add_argument("--barriers-only", action="store_true",
                        help="only the barriers of the existing runs with the largest size, on --independent, to "
                             "OUT/barriers.json (e.g. once more scans are labelled than the runs were evaluated on)")
    args = parser.parse_args()
    if args.barriers_only:
        report = barrier_report(args.runs, max(args.sizes, key=lambda n: n or 10**9), args.independent)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "barriers.json").write_text(json.dumps(report, indent=2))
        for variant, r in report.items():
            if variant != "independent":
                print(f"{variant:15s} {r['reactions']} reactions: MAE {r['mae']:.2f}, max {r['max_abs']:.2f} kcal/mol")
        return
    extra = parse_overrides(args.set)
    cfg = load_config(CONFIG, extra)
    independent = args.independent or Path(cfg.data.extra_test[0])
    available = len(read_structures(cfg.data.path)[0].split["train"])
    labels = read_structures(TRAIN_LABELS)[0]
    seconds = float(labels.attrs["labelling_seconds"]) / (len(labels) + int(labels.attrs["n_failed_labels"]))
    sizes = [n for n in args.sizes if n <= available]
    if len(sizes) < len(args.sizes):
        print(f"{cfg.data.path} has {available} DFT training structures: sizes above it skipped", file=sys.stderr)
    records = [run(variant, n, independent, args.runs, extra) for n in sizes for variant in args.variants]
    largest = args.runs / f"continued-p0.1-{max(sizes, key=lambda n: n or available) or 'all'}" / "model.pt"
    results = {"method": labels.attrs["method"], "seconds_per_structure": seconds, "runs": records,
               "independent": {"path": str(independent), "structures": len(read_structures(independent)[0])},
               "barrier_model": str(largest), "barriers": barriers(largest, independent) if largest.is_file() else {},
               "labelling_saved": labelling_saved(records, seconds), "target": target_ratios(records)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(tables(results))
    plot(records, args.out / "transfer.png")
    print(tables(results))


if __name__ == "__main__":
    main()
