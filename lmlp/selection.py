"""Lifelong adaptive data selection (lADS, docs/method.md: lifelong adaptive data selection).

Every training structure s carries a selection weight p_s in [p_min, p_max]. Each epoch a fit
fraction f of the structures is drawn without replacement with probability ∝ p_s ("adaptive") or
uniformly ("random", the baseline). After the fit, a fitted structure's weight is multiplied by
``raise_factor`` where its loss exceeds ``error_threshold`` × the reference loss level (the
mean loss of the epoch's fitted structures), else by ``lower_factor``, and clipped to [p_min, p_max]. Weights
never reach 0, so old structures keep being rehearsed; structures added later enter with p_new.

A structure whose loss exceeds ``outlier_factor`` × the reference level in ``outlier_epochs``
consecutive fits without falling over them (its loss in the last of these fits is at least its
loss in the first) is reported (likely bad reference data), never dropped. A structure that is
still being learnt, such as a new one entering with p_new that the model has not seen, has an
extreme but falling loss: its count starts again from the fit that showed the fall.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmlp.config import SelectionConfig


class DataSelection:
    """Selection weights and the random stream that draws from them.

    Args:
        cfg: the ``selection:`` config section.
        n_structures: number of training structures at the start (weights p_init).
        seed: seed of the drawing stream.
    """

    def __init__(self, cfg: SelectionConfig, n_structures: int, seed: int) -> None:
        self.cfg = cfg
        self.weights = torch.full((n_structures,), cfg.p_init, dtype=torch.float64)
        self.extreme = torch.zeros(n_structures, dtype=torch.int64)
        self.streak_start = torch.zeros(n_structures, dtype=torch.float64)
        """Loss of every structure in the first fit of its current run of extreme losses."""
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def n_fit(self) -> int:
        """Structures fitted per epoch: ceil(f · n), at least 1."""
        return max(1, math.ceil(self.cfg.fit_fraction * len(self)))

    def select(self) -> torch.Tensor:
        """(n_fit,) distinct structure indices for this epoch, sorted."""
        if self.cfg.mode == "random":
            chosen = torch.randperm(len(self), generator=self.generator)[: self.n_fit]
        else:
            chosen = torch.multinomial(self.weights, self.n_fit, replacement=False, generator=self.generator)
        return torch.sort(chosen).values

    def update(self, indices: torch.Tensor, losses: torch.Tensor, reference: float) -> torch.Tensor:
        """Adapt the weights of the fitted ``indices`` from their ``losses``; return new outliers.

        ``reference`` is the current training loss level (same units as ``losses``). Returns the
        indices that have just reached ``outlier_epochs`` consecutive extreme losses that did not
        fall (module docstring). In "random" mode the weights are still tracked, so switching
        modes keeps the history.
        """
        cfg = self.cfg
        losses = losses.to(torch.float64)
        high = losses > cfg.error_threshold * reference
        factor = torch.where(high, cfg.raise_factor, cfg.lower_factor).to(torch.float64)
        self.weights[indices] = (self.weights[indices] * factor).clamp(cfg.p_min, cfg.p_max)
        return self._count_extreme(indices, losses > cfg.outlier_factor * reference, losses)

    def _count_extreme(self, indices: torch.Tensor, extreme: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Count the ``extreme`` fits in a row of ``indices``; the ones whose count has just
        reached ``outlier_epochs`` with a loss that did not fall since the first of them."""
        count = torch.where(extreme, self.extreme[indices] + 1, 0)
        start = torch.where(extreme & (count == 1), losses, self.streak_start[indices])
        reached = count == self.cfg.outlier_epochs
        fell = reached & (losses < start)
        self.extreme[indices] = torch.where(fell, 1, count)
        self.streak_start[indices] = torch.where(fell, losses, start)
        return indices[reached & ~fell]

    def add(self, n_new: int) -> None:
        """Append ``n_new`` structures (lifelong learning) with weight p_new."""
        self.weights = torch.cat([self.weights, torch.full((n_new,), self.cfg.p_new, dtype=torch.float64)])
        self.extreme = torch.cat([self.extreme, torch.zeros(n_new, dtype=torch.int64)])
        self.streak_start = torch.cat([self.streak_start, torch.zeros(n_new, dtype=torch.float64)])

    def carry_over(self, state: dict[str, Any], match: torch.Tensor) -> None:
        """Continual learning: take weights, outlier counters and the random stream from an earlier
        selection ``state``; ``match`` (n,) gives each structure's index there, −1 for new ones
        (which get p_new)."""
        known, earlier = match >= 0, match.clamp(min=0)
        self.weights = torch.where(known, state["weights"][earlier], self.cfg.p_new)
        self.extreme = torch.where(known, state["extreme"][earlier], 0)
        self.streak_start = torch.where(known, _streak_start(state)[earlier], 0.0)
        self.generator.set_state(state["generator"])

    def state_dict(self) -> dict[str, Any]:
        """Weights, outlier counters (with the loss at the start of each run of extreme losses)
        and the random stream, for checkpoints."""
        return {"weights": self.weights.clone(), "extreme": self.extreme.clone(),
                "streak_start": self.streak_start.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"].clone()
        self.extreme = state["extreme"].clone()
        self.streak_start = _streak_start(state).clone()
        self.generator.set_state(state["generator"])


def _streak_start(state: dict[str, Any]) -> torch.Tensor:
    """The streak-start losses of a selection ``state``; zeros for states of lmlp before they were
    kept (a running count then ends in a report, as it did then)."""
    return state.get("streak_start", torch.zeros(len(state["weights"]), dtype=torch.float64))
