"""One epoch of fitting: selection → optimizer step(s) → selection update."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lmlp.batch import predict
from lmlp.cache import MemoryCache
from lmlp.config import TrainingConfig
from lmlp.metrics import member_losses
from lmlp.model import HDNNPEnsemble
from lmlp.selection import DataSelection
from lmlp.train.caches import Cache


def fit_epoch(cfg: TrainingConfig, model: HDNNPEnsemble, optimizer: torch.optim.Optimizer,
              selection: DataSelection, cache: Cache,
              gather: Callable[[torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
    """Fit the structures the selection draws with ``cfg.steps_per_epoch`` optimizer steps, then
    update the selection from their losses (``gather`` completes the members' losses from this
    process's share of them).

    Returns (M,) whether each member's losses and gradients stayed finite, and the training
    structures that have just become outliers (``DataSelection.update``). A step with a
    non-finite loss or gradient is not taken, and the selection is then not updated.
    """
    fitted = selection.select()
    in_memory = isinstance(cache, MemoryCache)
    kept = list(cache.select(fitted)) if in_memory else None
    totals = None if in_memory else (len(fitted), int((cache.offsets[fitted + 1] - cache.offsets[fitted]).sum()))
    for _ in range(cfg.steps_per_epoch):
        optimizer.zero_grad(set_to_none=True)
        loss, parts = 0.0, []
        for batch in kept or cache.select(fitted):  # pieces of the disk cache: gradients accumulate
            energies, forces = predict(model, batch)
            piece_loss, per_structure = member_losses(energies, forces, batch, cfg.energy_weight,
                                                      cfg.force_weight, totals)
            piece_loss.sum().backward()
            loss = loss + piece_loss.detach()
            parts.append(per_structure.detach())
        finite = gather(finite_members(loss, model)).cpu().numpy()
        if not finite.all():
            return finite, fitted[:0]
        optimizer.step()
    per_structure = gather(torch.cat(parts, 1)).mean(0).cpu()
    return finite, selection.update(fitted, per_structure, float(per_structure.mean()))


def finite_members(loss: torch.Tensor, model: HDNNPEnsemble) -> torch.Tensor:
    """(m,) whether each member's loss (m,) and every gradient entry are finite."""
    finite = torch.isfinite(loss.detach())
    for param in model.parameters():
        if param.grad is not None:
            finite &= torch.isfinite(param.grad).flatten(1).all(1)
    return finite
