"""The divergence guard (``training.on_divergence``): a non-finite loss, gradient or validation
error undoes the epoch (weights, optimizer and selection state of the previous epoch restored) and
retries it with every step size × ``divergence_factor``, or stops the run with an error."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from lmlp.config import TrainingConfig
from lmlp.errors import LmlpError
from lmlp.model import HDNNPEnsemble
from lmlp.optim import scale_step_sizes
from lmlp.selection import DataSelection
from lmlp.train.log import RunLog

Outcome = TypeVar("Outcome")


@dataclass
class _Snapshot:
    """Weights, optimizer state and selection state after the last good epoch."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    selection: dict[str, Any]

    @classmethod
    def take(cls, model: HDNNPEnsemble, optimizer: torch.optim.Optimizer, selection: DataSelection) -> _Snapshot:
        return cls({k: v.detach().clone() for k, v in model.state_dict().items()},
                   copy.deepcopy(optimizer.state_dict()), selection.state_dict())

    def restore(self, model: HDNNPEnsemble, optimizer: torch.optim.Optimizer, selection: DataSelection) -> None:
        model.load_state_dict(self.model)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        selection.load_state_dict(self.selection)


class DivergenceGuard:
    """Runs epochs of ``model``, ``optimizer`` and ``selection``, undoing and retrying diverged ones."""

    def __init__(self, cfg: TrainingConfig, model: HDNNPEnsemble, optimizer: torch.optim.Optimizer,
                 selection: DataSelection, log: RunLog) -> None:
        self.cfg = cfg
        self.model, self.optimizer, self.selection = model, optimizer, selection
        self.log = log
        self.good = _Snapshot.take(model, optimizer, selection)

    def run(self, epoch: int, attempt: Callable[[], tuple[np.ndarray, Outcome]]) -> Outcome:
        """The outcome of ``attempt()`` (which fits epoch ``epoch`` and returns (M,) whether each
        member stayed finite, and its outcome) once every member stayed finite. ``LmlpError`` when
        ``on_divergence`` is "stop" or ``divergence_retries`` retries diverged too."""
        for retry in itertools.count():
            finite, outcome = attempt()
            if finite.all():
                self.good = _Snapshot.take(self.model, self.optimizer, self.selection)
                return outcome
            self._diverged(epoch, retry, finite)
            self._undo()

    def _undo(self) -> None:
        """Back to the last good epoch with every step size × ``divergence_factor``; the snapshot
        takes the lowered step sizes, for further retries."""
        self.good.restore(self.model, self.optimizer, self.selection)
        scale_step_sizes(self.optimizer, self.cfg.divergence_factor)
        self.good.optimizer = copy.deepcopy(self.optimizer.state_dict())

    def _diverged(self, epoch: int, retry: int, finite: np.ndarray) -> None:
        """Report a diverged epoch; ``LmlpError`` when the config says stop or the retries are used up."""
        t = self.cfg
        what = (f"epoch {epoch}: non-finite loss, gradient or training/validation error in member(s) "
                f"{', '.join(map(str, np.flatnonzero(~finite)))}")
        if t.on_divergence == "stop" or retry == t.divergence_retries:
            tried = "" if t.on_divergence == "stop" else f" after {retry} step-size reductions"
            raise LmlpError(f"{what}{tried}: training diverged (the last checkpoint holds the state of an earlier "
                            f"epoch; lower optimizer.lr or change training.on_divergence)")
        self.log(f"{what}: epoch undone, retried with step sizes × {t.divergence_factor:g} "
                 f"(retry {retry + 1} of {t.divergence_retries})")
