"""The optimizer comparison of the CoRe paper (§3) as a command: ``lmlp compare`` (docs/method.md: optimizer comparison).

Every variant (a named optimizer setting, ``compare.variants``) trains the same lMLP under
identical conditions: the same data split, selection mode, epoch budget and initial weights. Seed s
starts from the initial weights of ensemble member s, the same in every variant. With
``compare.seed_mode`` "independent" (the default) every seed is a training run of its own, with
its own data order and adaptive selection (``training.seed`` + s); with "shared" the seeds are the
members of one ensemble that trains them together in one batched run, sharing the data order and
the selection weights. Per variant (and learning rate of an optional grid, the best of which is
kept) the comparison reports:

- final test RMSE of E (meV/atom) and F (meV/Å), mean ± std over seeds, each seed at its own
  early-stopping epoch (chosen on the validation split; the test split is read once, at the end);
- the smoothness-aware errors of the paper's lMLP protocol on the validation split: the errors of
  all seeds at each seed's best epoch (seeds² values), mean ± std;
- accuracy scores from the smoothness-aware errors, per task i ∈ {E, F} and overall:

      A_i(k) = min_k' E_i,k' / E_i,k                         (Eq. 19)
      ΔA_i(k) = min_k' E_i,k' / E_i,k² · ΔE_i,k              (Eq. 20)
      A(k) = mean_i A_i(k)                                    (Eq. 21)
      ΔA(k) = (Σ_i ΔA_i(k)²)^½ / N_tasks                      (Eq. 22)

- wall time per epoch (of all seeds) and the epochs until the validation RMSE first reaches the configured
  targets (mean over the seeds that reach it).

The learning rate of a grid is chosen by the final validation loss, never by test errors.

Each run is an ordinary run directory under ``OUT/runs/<variant>``: ``lr<lr>-seed<s>`` per seed
(independent) or ``lr<lr>`` for all seeds (shared). A finished run is skipped and an interrupted
one resumed, so a killed comparison continues where it stopped.
Outputs in ``OUT``: comparison.md (ranked table), comparison.csv, comparison.json,
accuracy_scores.png and validation_rmse.png.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlp import distributed
from lmlp.config import CompareConfig, Config, OptimizerConfig, VariantConfig, load_config
from lmlp.errors import ConfigError, LmlpError
from lmlp.fileio import atomic_path, atomic_write_text
from lmlp.optim import build_optimizer
from lmlp.units import ENERGY_ERROR, FORCE_ERROR

TASKS = ("E", "F")
"""The comparison's tasks: energy (meV/atom) and force (meV/Å) test RMSE."""


def accuracy_scores(
    errors: np.ndarray, uncertainties: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy scores of the CoRe paper, Eqs. 19–22.

    Args:
        errors: (K, T) final test error of optimizer k in task i.
        uncertainties: (K, T) their standard deviations.
    Returns:
        A_i (K, T), ΔA_i (K, T), A (K,), ΔA (K,).
    """
    best = errors.min(axis=0, keepdims=True)
    a_i = best / errors
    da_i = best / errors**2 * uncertainties
    n_tasks = errors.shape[1]
    return a_i, da_i, a_i.mean(axis=1), np.sqrt((da_i**2).sum(axis=1)) / n_tasks


@dataclass
class RunSummary:
    """What one (variant, learning rate) achieved over its seeds; errors in meV/atom and meV/Å.

    ``seconds_per_epoch``: the wall time of all seeds per epoch (their runs' times summed);
    ``initial_weights``: the SHA-256 of the initial weights (of one run per seed: of their SHA-256s).
    """

    variant: str
    optimizer: str
    lr: float
    params: dict[str, Any]
    final_e: tuple[float, float]
    final_f: tuple[float, float]
    smooth_e: tuple[float, float]
    smooth_f: tuple[float, float]
    validation_loss: float
    seconds_per_epoch: float
    epochs_to_target_e: float | None
    epochs_to_target_f: float | None
    initial_weights: str
    curve_epochs: list[int]
    curve_e: list[tuple[float, float]]
    curve_f: list[tuple[float, float]]


@dataclass
class Comparison:
    """The best learning rate of every variant with its scores, ranked by overall accuracy A."""

    runs: list[RunSummary]
    a_i: np.ndarray
    da_i: np.ndarray
    a: np.ndarray
    da: np.ndarray
    out: Path


def compare(
    cfg: Config,
    variants: list[str] | None = None,
    seeds: int | None = None,
    lr_grid: list[float] | None = None,
    epochs: int | None = None,
    out: str | Path | None = None,
) -> Comparison:
    """Run (or resume) the comparison ``cfg.compare`` describes and write its outputs.

    ``variants`` (names), ``seeds``, ``lr_grid``, ``epochs`` and ``out`` override the config.
    Under torchrun the runs are spread over the processes (round robin, each run in one process);
    process 0 writes the outputs once all runs are done (``lmlp.distributed``).
    """
    spec = cfg.compare
    chosen = _chosen_variants(spec.variants, variants)
    n_seeds = seeds or spec.seeds
    grid = lr_grid or spec.lr_grid
    n_epochs = epochs or cfg.training.epochs
    out_dir = Path(out or spec.out.replace("{name}", cfg.name))
    for variant in chosen:
        _check_variant(variant)
    groups = [(variant, lr, _run_configs(cfg, variant, lr, n_seeds, n_epochs, out_dir))
              for variant in chosen for lr in grid or [variant.lr]]
    runs = [(variant, lr, seed, run_cfg) for variant, lr, run_cfgs in groups for seed, run_cfg in enumerate(run_cfgs)]
    for *_, run_cfg in runs:
        _check_earlier(run_cfg)
    _train_runs(runs, n_seeds, n_epochs)
    summaries = []
    for variant in chosen:
        candidates = [summarize_runs(run_cfgs, v, lr) for v, lr, run_cfgs in groups if v is variant]
        summaries.append(min(candidates, key=lambda s: s.validation_loss))
    comparison = _score(summaries, out_dir)
    if distributed.current().main:
        write_outputs(comparison, cfg, grid is not None)
    return comparison


def _train_runs(runs: list[tuple[VariantConfig, float, int, Config]], n_seeds: int, n_epochs: int) -> None:
    """Train (or resume) the unfinished ``runs`` (variant, learning rate, index, config); under
    torchrun round robin over the processes, each waiting for all runs to finish."""
    from lmlp.train import train

    workers = distributed.current()
    for k, (variant, lr, index, run_cfg) in enumerate(runs):
        if k % workers.size == workers.rank and not (run_cfg.run_dir / "metrics.json").is_file():
            resume = (run_cfg.run_dir / "checkpoint_last.pt").is_file()
            seeds = f"{n_seeds} seeds" if run_cfg.ensemble.members > 1 else f"seed {index + 1} of {n_seeds}"
            print(f"{'resuming' if resume else 'training'} {variant.name}, lr {lr:g}, {seeds}, "
                  f"{n_epochs} epochs → {run_cfg.run_dir}"
                  + (f" (process {workers.rank})" if workers.size > 1 else ""), flush=True)
            train(run_cfg, resume=resume, workers=distributed.SINGLE)
    if workers.size > 1:  # runs take unequal times: wait on the files, not at a timed collective
        _wait_for([run_cfg.run_dir / "metrics.json" for *_, run_cfg in runs])
    workers.barrier()


def _chosen_variants(variants: list[VariantConfig], names: list[str] | None) -> list[VariantConfig]:
    """The variants named in ``names`` (all when None); unknown names are an error."""
    if names is None:
        return variants
    by_name = {v.name: v for v in variants}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise LmlpError(f"--optimizers: {unknown} are not variants of the config; known: {list(by_name)}")
    return [by_name[n] for n in names]


def _check_variant(variant: VariantConfig) -> None:
    """Fail before any training when a variant's hyperparameters are invalid."""
    try:
        build_optimizer(variant.optimizer, [torch.zeros(1, requires_grad=True)], variant.lr, **variant.params)
    except ConfigError as exc:
        raise LmlpError(f"compare variant {variant.name!r}: {exc}") from None


def _wait_for(paths: list[Path], poll_s: float = 2.0) -> None:
    """Return once every file of ``paths`` exists (the runs of the other processes are done)."""
    while not all(p.is_file() for p in paths):
        time.sleep(poll_s)


def _check_earlier(run_cfg: Config) -> None:
    """A run directory left by an earlier invocation must hold the same training setup."""
    stored = run_cfg.run_dir / "config.yaml"
    if not stored.is_file():
        return
    earlier = dataclasses.replace(load_config(stored), compare=CompareConfig())
    if earlier != dataclasses.replace(run_cfg, compare=CompareConfig()):
        raise LmlpError(f"{run_cfg.run_dir} holds a run of a different setup; choose another --out "
                        f"or remove it")


def _slug(name: str) -> str:
    """A directory name for a variant name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "variant"


def _run_configs(cfg: Config, variant: VariantConfig, lr: float, seeds: int, epochs: int, out: Path) -> list[Config]:
    """The training configs of one (variant, learning rate): one run per seed s (one member,
    ``ensemble.seed`` + s and ``training.seed`` + s; "independent") or one run whose members are
    the seeds ("shared")."""
    base = dataclasses.replace(
        cfg,
        name=_slug(variant.name),
        optimizer=OptimizerConfig(name=variant.optimizer, lr=lr, params=dict(variant.params)),
        training=dataclasses.replace(cfg.training, epochs=epochs, checkpoint_every=min(cfg.training.checkpoint_every, epochs)),
        output=dataclasses.replace(cfg.output, plots=False, progress=False),
    )
    runs = out / "runs" / _slug(variant.name)
    if cfg.compare.seed_mode == "shared":
        return [_seed_config(base, runs / f"lr{lr:g}", members=seeds, seed=0)]
    return [_seed_config(base, runs / f"lr{lr:g}-seed{s}", members=1, seed=s) for s in range(seeds)]


def _seed_config(base: Config, run_dir: Path, members: int, seed: int) -> Config:
    """``base`` training ``members`` members from seed ``seed`` on (initial weights and data order)
    into ``run_dir``. Member m of ensemble seed e starts from the weights of seed e + m, so member 0
    of seed s starts where member s of seed 0 does."""
    return dataclasses.replace(
        base,
        ensemble=dataclasses.replace(base.ensemble, members=members, seed=base.ensemble.seed + seed),
        training=dataclasses.replace(base.training, seed=base.training.seed + seed),
        output=dataclasses.replace(base.output, run_dir=str(run_dir)),
    )


def summarize_runs(run_cfgs: list[Config], variant: VariantConfig, lr: float) -> RunSummary:
    """Errors, smoothness-aware errors, timing and convergence of the finished run directories
    of one (variant, learning rate); their members, in order, are the seeds."""
    metrics = [json.loads((c.run_dir / "metrics.json").read_text()) for c in run_cfgs]
    curves = [read_curve(c.run_dir / "learning_curve.csv") for c in run_cfgs]
    epochs = np.array([r["epoch"] for r in curves[0]])
    for c, rows in zip(run_cfgs, curves):
        if [r["epoch"] for r in rows] != epochs.tolist():
            raise LmlpError(f"{c.run_dir}: validated other epochs than {run_cfgs[0].run_dir}")
    e = np.hstack([_member_columns(rows, "validation_rmse_e", m) for rows, m in zip(curves, metrics)])  # (epochs, seeds)
    f = np.hstack([_member_columns(rows, "validation_rmse_f", m) for rows, m in zip(curves, metrics)])
    best_epoch = np.concatenate([m["best_epoch"] for m in metrics])
    best = np.searchsorted(epochs, best_epoch)  # its row; 0 (never improved): the first
    val_e, val_f = _members(metrics, "validation", "rmse_e"), _members(metrics, "validation", "rmse_f")
    q, w_f = run_cfgs[0].training.energy_weight, run_cfgs[0].training.force_weight
    spec = run_cfgs[0].compare
    return RunSummary(
        variant=variant.name, optimizer=variant.optimizer, lr=lr, params=dict(variant.params),
        final_e=_mean_std(_members(metrics, "test", "rmse_e")), final_f=_mean_std(_members(metrics, "test", "rmse_f")),
        smooth_e=_mean_std(e[best].ravel()), smooth_f=_mean_std(f[best].ravel()),
        validation_loss=float(np.mean(q**2 * (val_e / 1e3) ** 2 + w_f * (val_f / 1e3) ** 2)),
        seconds_per_epoch=sum(m["wall_time_s"] for m in metrics) / epochs[-1],
        epochs_to_target_e=_epochs_to(e, spec.target_rmse_e, curves[0]),
        epochs_to_target_f=_epochs_to(f, spec.target_rmse_f, curves[0]),
        initial_weights=_initial_weights([c.run_dir for c in run_cfgs]),
        curve_epochs=epochs.astype(int).tolist(), curve_e=[_mean_std(x) for x in e], curve_f=[_mean_std(x) for x in f],
    )


def _members(metrics: list[dict[str, Any]], split: str, metric: str) -> np.ndarray:
    """The members' ``metric`` on ``split`` of several runs' metrics.json, concatenated."""
    return np.concatenate([m[split]["members"][metric] for m in metrics])


def _member_columns(rows: list[dict[str, float]], prefix: str, metrics: dict[str, Any]) -> np.ndarray:
    """(epochs, members) learning-curve columns ``<prefix>_m<k>`` of one run."""
    members = len(metrics["test"]["members"]["rmse_e"])
    return np.array([[r[f"{prefix}_m{k}"] for k in range(members)] for r in rows])


def _initial_weights(run_dirs: list[Path]) -> str:
    """The initial-weights SHA-256 of run.json of one run; of several, the SHA-256 of theirs joined."""
    digests = [json.loads((d / "run.json").read_text())["initial_weights_sha256"] for d in run_dirs]
    return digests[0] if len(digests) == 1 else hashlib.sha256(",".join(digests).encode()).hexdigest()


def read_curve(path: Path) -> list[dict[str, float]]:
    """The rows of a learning_curve.csv as numbers."""
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(l for l in fh if not l.startswith("#"))]


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (ddof 1; 0 for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _epochs_to(errors: np.ndarray, target: float, rows: list[dict[str, float]]) -> float | None:
    """Mean over the seeds that reach ``target`` of their first epoch at or below it; None if none."""
    reached = errors <= target
    first = [rows[int(np.argmax(col))]["epoch"] for col in reached.T if col.any()]
    return float(np.mean(first)) if first else None


def _score(summaries: list[RunSummary], out: Path) -> Comparison:
    """Accuracy scores of the smoothness-aware errors, runs ranked by overall A."""
    errors = np.array([[s.smooth_e[0], s.smooth_f[0]] for s in summaries])
    uncertainties = np.array([[s.smooth_e[1], s.smooth_f[1]] for s in summaries])
    a_i, da_i, a, da = accuracy_scores(errors, uncertainties)
    order = np.argsort(-a, kind="stable")
    return Comparison([summaries[k] for k in order], a_i[order], da_i[order], a[order], da[order], out)


def write_outputs(c: Comparison, cfg: Config, grid: bool) -> None:
    """comparison.md / .csv / .json and the two PNG plots in ``c.out``."""
    c.out.mkdir(parents=True, exist_ok=True)
    table = format_comparison(c, grid)
    atomic_write_text(c.out / "comparison.md", f"# Optimizer comparison: {cfg.name}\n\n{table}\n")
    atomic_write_text(c.out / "comparison.json", json.dumps(_as_json(c), indent=2))
    with atomic_path(c.out / "comparison.csv") as tmp, open(tmp, "w", newline="") as fh:
        rows = [_flat_row(s, c, k) for k, s in enumerate(c.runs)]
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if cfg.output.plots:
        from lmlp.plots import plot_accuracy_scores, plot_comparison_curves

        plot_accuracy_scores([s.variant for s in c.runs], c.a, c.da, c.out / "accuracy_scores.png")
        plot_comparison_curves({s.variant: (s.curve_epochs, s.curve_e, s.curve_f) for s in c.runs[:4]}, c.out / "validation_rmse.png")
    print(table, flush=True)


def _flat_row(s: RunSummary, c: Comparison, k: int) -> dict[str, Any]:
    return {"rank": k + 1, "variant": s.variant, "optimizer": s.optimizer, "lr": s.lr,
            "params": json.dumps(s.params), "A": c.a[k], "dA": c.da[k],
            "A_E": c.a_i[k, 0], "dA_E": c.da_i[k, 0], "A_F": c.a_i[k, 1], "dA_F": c.da_i[k, 1],
            "final_rmse_e": s.final_e[0], "final_rmse_e_std": s.final_e[1],
            "final_rmse_f": s.final_f[0], "final_rmse_f_std": s.final_f[1],
            "smooth_rmse_e": s.smooth_e[0], "smooth_rmse_e_std": s.smooth_e[1],
            "smooth_rmse_f": s.smooth_f[0], "smooth_rmse_f_std": s.smooth_f[1],
            "seconds_per_epoch": s.seconds_per_epoch,
            "epochs_to_target_e": s.epochs_to_target_e, "epochs_to_target_f": s.epochs_to_target_f}


def _as_json(c: Comparison) -> dict[str, Any]:
    return {"units": {"rmse_e": ENERGY_ERROR, "rmse_f": FORCE_ERROR, "time": "s/epoch"},
            "scores_from": "smoothness-aware errors (all seeds at every seed's best epoch)",
            "runs": [{**_flat_row(s, c, k), "params": s.params, "initial_weights_sha256": s.initial_weights}
                     for k, s in enumerate(c.runs)]}


def format_comparison(c: Comparison, grid: bool = False) -> str:
    """The ranked Markdown table of a comparison."""
    head = ("| rank | variant | lr | A | A_E | A_F | RMSE E final | RMSE F final | RMSE E smooth | "
            "RMSE F smooth | s/epoch | epochs to E / F target |")
    lines = [head, "|" + "---|" * 12]
    for k, s in enumerate(c.runs):
        reach = " / ".join("—" if x is None else f"{x:.0f}" for x in (s.epochs_to_target_e, s.epochs_to_target_f))
        lines.append(
            f"| {k + 1} | {s.variant} | {s.lr:g} | {c.a[k]:.3f} ± {c.da[k]:.3f} | {c.a_i[k, 0]:.3f} ± {c.da_i[k, 0]:.3f} "
            f"| {c.a_i[k, 1]:.3f} ± {c.da_i[k, 1]:.3f} | {s.final_e[0]:.2f} ± {s.final_e[1]:.2f} "
            f"| {s.final_f[0]:.1f} ± {s.final_f[1]:.1f} | {s.smooth_e[0]:.2f} ± {s.smooth_e[1]:.2f} "
            f"| {s.smooth_f[0]:.1f} ± {s.smooth_f[1]:.1f} | {s.seconds_per_epoch:.3f} | {reach} |")
    lines += ["", "RMSE E in meV/atom, F in meV/Å. final: test split, each seed at its early-stopping epoch "
              "(chosen on the validation split); smooth: validation split, all seeds at every seed's best epoch. "
              "Accuracy scores (CoRe paper Eqs. 19–22) from the smooth errors; epochs to target on the validation "
              "split." + (" lr: the value of the grid with the lowest validation loss." if grid else "")]
    return "\n".join(lines)
