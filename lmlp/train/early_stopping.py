"""Early stopping per member: each member keeps the weights of its epoch with the lowest
validation loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmlp.model import HDNNPEnsemble


@dataclass
class EarlyStopping:
    """Each member's best validation loss so far, its epoch and weights.

    Attributes:
        enabled: False: every validated epoch counts as the best (the last one is kept).
        loss: (M,) best validation loss of every member of the ensemble (eV²/atom², eV²/Å² terms).
        epoch: (M,) the epoch of it (0: none yet).
        state: state dict of this process's members holding each one's best weights.
    """

    enabled: bool
    loss: np.ndarray
    epoch: np.ndarray
    state: dict[str, torch.Tensor]

    @classmethod
    def start(cls, model: HDNNPEnsemble, members: int, enabled: bool) -> EarlyStopping:
        """No epoch yet; ``model``'s current weights as the placeholder best state."""
        return cls(enabled, np.full(members, np.inf), np.zeros(members, dtype=int),
                   {k: v.detach().clone() for k, v in model.state_dict().items()})

    def update(self, epoch: int, loss: np.ndarray, model: HDNNPEnsemble, local: slice) -> None:
        """Take the validation ``loss`` (M,) of ``epoch``; ``model`` holds the members ``local``."""
        improved = loss < self.loss if self.enabled else np.ones_like(self.loss, bool)
        self.loss = np.where(improved, loss, self.loss)
        self.epoch = np.where(improved, epoch, self.epoch)
        members = torch.from_numpy(improved[local])
        for name, param in model.named_parameters():
            keep = members.to(param.device)
            self.state[name][keep] = param.detach()[keep]
