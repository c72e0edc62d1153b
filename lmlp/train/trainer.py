"""The epoch loop: fit, validate, early stopping, divergence guard, learning curve, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmlp.config import Config
from lmlp.distributed import Workers
from lmlp.metrics import Metrics, evaluate
from lmlp.model import HDNNPEnsemble
from lmlp.selection import DataSelection
from lmlp.train import rundir
from lmlp.train.caches import Cache, monitored_text
from lmlp.train.checkpoint import LAST, Checkpoint
from lmlp.train.early_stopping import EarlyStopping
from lmlp.train.epoch import fit_epoch
from lmlp.train.guard import DivergenceGuard
from lmlp.train.log import RunLog


@dataclass
class Trainer:
    """Trains ``model`` (this process's members of ``ensemble``) epoch by epoch.

    Attributes:
        cfg: the run's configuration.
        ensemble: the whole ensemble (the template of the best-weights model file).
        model: the members this process trains (``ensemble`` itself in a single process).
        optimizer, selection: the optimizer over ``model`` and the data selection.
        train, validation, monitor: descriptor caches of the training split, of the split that
            chooses the epochs (named ``validation_split``), and of the training structures of the
            per-epoch metrics.
        workers: the processes sharing the members.
        log: the run's log.
        stopping: early stopping state.
        rows: learning-curve rows so far.
        fingerprints: (S,) content hash of every training structure (for continued runs).
        train_index: (S,) index in the data file of every training structure (outlier messages).
        continue_from: the model file a continual-learning run started from, or None.
    """

    cfg: Config
    ensemble: HDNNPEnsemble
    model: HDNNPEnsemble
    optimizer: torch.optim.Optimizer
    selection: DataSelection
    train: Cache
    validation: Cache
    validation_split: str
    monitor: Cache
    workers: Workers
    log: RunLog
    stopping: EarlyStopping
    rows: list[dict[str, float]]
    fingerprints: torch.Tensor
    train_index: np.ndarray
    continue_from: Path | None

    @property
    def members(self) -> int:
        return self.cfg.ensemble.members

    def run(self, first_epoch: int) -> None:
        """Epochs ``first_epoch`` … ``training.epochs``."""
        guard = DivergenceGuard(self.cfg.training, self.model, self.optimizer, self.selection, self.log)
        for epoch in range(first_epoch, self.cfg.training.epochs + 1):
            validated = guard.run(epoch, partial(self._attempt, epoch))
            self.log.epoch(None if validated is None else validated[1])
            if validated is not None:
                self._record(epoch, *validated)
            if epoch % self.cfg.training.checkpoint_every == 0 or epoch == self.cfg.training.epochs:
                self._checkpoint(epoch)

    def _attempt(self, epoch: int) -> tuple[np.ndarray, tuple[Metrics, Metrics] | None]:
        """Fit epoch ``epoch`` and, if it is validated, evaluate; (M,) whether each member stayed
        finite, and the training and validation metrics (None when not validated)."""
        t = self.cfg.training
        gather = partial(self.workers.gather_members, total=self.members)
        finite, outliers = fit_epoch(t, self.model, self.optimizer, self.selection, self.train, gather)
        for i in outliers.tolist():
            self.log(f"epoch {epoch}: structure {int(self.train_index[i])} of {self.cfg.data.path} had an extreme "
                     f"error that did not fall in {self.cfg.selection.outlier_epochs} fits in a row (its reference "
                     f"data may be wrong)")
        if not (epoch % t.validation_every == 0 or epoch in (1, t.epochs)):
            return finite, None
        train_m = evaluate(self.model, self.monitor, t.energy_weight, t.force_weight, gather)
        val_m = evaluate(self.model, self.validation, t.energy_weight, t.force_weight, gather)
        return finite & np.isfinite(train_m.loss) & np.isfinite(val_m.loss), (train_m, val_m)

    def _record(self, epoch: int, train_m: Metrics, val_m: Metrics) -> None:
        """Early stopping, the learning-curve row and, every 5 % of the epochs, a log line."""
        t = self.cfg.training
        self.stopping.update(epoch, val_m.loss, self.model, self.workers.share(self.members))
        self.rows.append(rundir.curve_row(epoch, train_m, val_m))
        step = max(1, t.epochs // 20)  # a line for the first validated epoch of every 5 %
        if epoch == 1 or epoch // step != (epoch - t.validation_every) // step:
            self.log(f"epoch {epoch:5d}/{t.epochs}  ensemble {self.validation_split} RMSE "
                     f"E {val_m.ensemble['rmse_e']:.2f} meV/atom, F {val_m.ensemble['rmse_f']:.1f} meV/Å",
                     echo=self.cfg.output.progress)

    def _checkpoint(self, epoch: int) -> None:
        """learning_curve.csv, checkpoint_best.pt and checkpoint_last.pt (written by process 0)."""
        keys = {name for name, _ in self.ensemble.named_parameters()}
        gather_state = partial(self.workers.gather_state, member_keys=keys, total=self.members)
        best = _on_cpu(gather_state(self.stopping.state))
        model = _on_cpu(gather_state(self.model.state_dict()))
        optimizer = _on_cpu(self.workers.gather_optimizer_state(self.optimizer, self.members))
        if not self.workers.main:
            return
        run_dir = self.cfg.run_dir
        rundir.write_curve(run_dir / rundir.CURVE, self.rows, monitored_text(self.monitor, self.train))
        rundir.save_best(self.ensemble, best, run_dir / rundir.BEST, self.stopping.epoch, self.stopping.loss)
        Checkpoint(epoch=epoch, model=model, optimizer=optimizer, optimizer_name=self.cfg.optimizer.name,
                   selection=self.selection.state_dict(), fingerprints=self.fingerprints, best_state=best,
                   best_loss=self.stopping.loss.tolist(), best_epoch=self.stopping.epoch.tolist(), rows=self.rows,
                   continue_from=None if self.continue_from is None else str(self.continue_from),
                   ).save(run_dir / LAST)


def _on_cpu(tree: Any) -> Any:
    """A state (nested dicts, lists and tensors) with every tensor on the CPU, for files."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_cpu(v) for v in tree)
    return tree
