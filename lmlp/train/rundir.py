"""The files of a run directory: provenance (config.yaml, run.json), learning_curve.csv,
checkpoint_best.pt, model.pt, metrics.json and the PNG plots. Every file is written atomically."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lmlp
from lmlp.batch import Batch, predict_all
from lmlp.config import Config, dump_config
from lmlp.distributed import Workers
from lmlp.fileio import atomic_path, atomic_write_text
from lmlp.metrics import Metrics, metrics_dict
from lmlp.model import HDNNPEnsemble
from lmlp.modelfile import save_model
from lmlp.train.result import TrainingResult
from lmlp.units import ENERGY_ERROR, FORCE_ERROR, METRIC_UNITS

CURVE = "learning_curve.csv"
BEST = "checkpoint_best.pt"
MODEL = "model.pt"


def prepare(run_dir: Path) -> None:
    """Create ``run_dir`` and remove the temporary files a killed run's interrupted atomic write left."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".*.tmp"):
        stale.unlink()


def write_provenance(cfg: Config, run_dir: Path, continue_from: Path | None, model: HDNNPEnsemble,
                     workers: Workers) -> None:
    """config.yaml (resolved) and run.json: seeds, versions, the data file's hash, the initial
    weights' hash, the model continued from and the number of processes."""
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    digest = hashlib.sha256(Path(cfg.data.path).read_bytes()).hexdigest()
    info = {"lmlp": lmlp.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "command": sys.argv,
            "seeds": {"ensemble": cfg.ensemble.seed, "training": cfg.training.seed},
            "data": {"path": cfg.data.path, "sha256": digest},
            "continued_from": None if continue_from is None else str(continue_from),
            "initial_weights_sha256": weights_digest(model), "processes": workers.size}
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))


def weights_digest(model: HDNNPEnsemble) -> str:
    """SHA-256 of the network weights (float64 bytes, in parameter order)."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().to(torch.float64).cpu().numpy().tobytes())
    return digest.hexdigest()


def curve_row(epoch: int, train_m: Metrics, val_m: Metrics) -> dict[str, float]:
    """One learning-curve row: RMSE and MAE of E (meV/atom) and F (meV/Å), ensemble and per member."""
    row: dict[str, float] = {"epoch": epoch}
    for split, m in (("train", train_m), ("validation", val_m)):
        for key in ("rmse_e", "mae_e", "rmse_f", "mae_f"):
            row[f"{split}_{key}_ensemble"] = m.ensemble[key]
            for k, value in enumerate(getattr(m, key)):
                row[f"{split}_{key}_m{k}"] = float(value)
    return row


def write_curve(path: Path, rows: list[dict[str, float]], monitored: str) -> None:
    """learning_curve.csv with a comment line on units and on what the train columns cover."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        fh.write(f"# energies {ENERGY_ERROR}, forces {FORCE_ERROR}; m<k> = ensemble member k; train columns over "
                 f"{monitored}\n")
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_best(model: HDNNPEnsemble, best_state: dict[str, torch.Tensor], path: Path, best_epoch: np.ndarray,
              best_loss: np.ndarray) -> None:
    """A model file with each member's best weights so far (``model`` is only the template)."""
    best = copy.deepcopy(model)
    best.load_state_dict(best_state)
    save_model(path, best, {"best_epoch": best_epoch.tolist(), "best_validation_loss": best_loss.tolist()})


def write_results(cfg: Config, result: TrainingResult, model: HDNNPEnsemble, rows: list[dict[str, float]],
                  test_pieces: list[Batch], min_pair_distance: float) -> None:
    """model.pt (final weights with their metrics), metrics.json and, if configured, the plots."""
    run_dir = result.run_dir
    save_model(run_dir / MODEL, model, {
        "validation_rmse_e": result.validation.rmse_e.tolist(), "validation_rmse_f": result.validation.rmse_f.tolist(),
        "validation_split": result.validation_split,
        "test_rmse_e": result.test.rmse_e.tolist(), "test_rmse_f": result.test.rmse_f.tolist(),
        "test_ensemble": result.test.ensemble, "best_epoch": result.best_epoch.tolist(), "config": dump_config(cfg),
        "min_pair_distance": min_pair_distance})
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics_json(result), indent=2))
    if cfg.output.plots:
        write_plots(model, rows, test_pieces, run_dir)


def metrics_json(result: TrainingResult) -> dict[str, Any]:
    """The content of metrics.json."""
    return {"units": METRIC_UNITS, "train": metrics_dict(result.train), "validation": metrics_dict(result.validation),
            "validation_split": result.validation_split, "test": metrics_dict(result.test),
            "extra_test": {path: metrics_dict(m) for path, m in result.extra_test.items()},
            "extra_test_uncertainty": {path: r.as_dict() for path, r in result.extra_test_uncertainty.items()},
            "best_epoch": result.best_epoch.tolist(), "wall_time_s": result.wall_time,
            **({"continual": result.continual} if result.continual else {})}


def write_plots(model: HDNNPEnsemble, rows: list[dict[str, float]], test_pieces: list[Batch], run_dir: Path) -> None:
    """learning_curves.png and parity_test.png (ensemble mean of the final model on the test set)."""
    from lmlp.plots import plot_learning_curves, plot_parity

    plot_learning_curves(rows, run_dir / "learning_curves.png")
    test_pieces = [p.to(torch.device("cpu")) for p in test_pieces]
    energies, forces = (t.cpu() for t in predict_all(model.cpu(), test_pieces))
    baseline = torch.cat([model.reference_baseline(p.numbers, p.offsets) for p in test_pieces])
    plot_parity(energies.mean(0).numpy(), torch.cat([p.energy for p in test_pieces]).numpy(), baseline.numpy(),
                torch.cat([p.n_atoms for p in test_pieces]).numpy(), forces.mean(0).numpy(),
                torch.cat([p.forces for p in test_pieces]).double().numpy(), run_dir / "parity_test.png")
