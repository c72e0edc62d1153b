"""A fresh ensemble and the configured optimizer over its element networks."""

from __future__ import annotations

from typing import Any

import torch

from lmlp.config import Config
from lmlp.data import StructureSet
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.model import HDNNPEnsemble, fit_reference_energies
from lmlp.optim import build_optimizer


def build_model(cfg: Config, train: StructureSet, standardizer: Standardizer,
                descriptor: SymmetryFunctions) -> HDNNPEnsemble:
    """A new ensemble with reference energies (eV) fitted on the training set and its descriptor
    ``standardizer``."""
    elements = sorted(set(train.numbers.tolist()))
    e_ref = torch.from_numpy(fit_reference_energies(train.numbers, train.offsets, train.energy, elements))
    return HDNNPEnsemble(descriptor, standardizer, elements, e_ref,
                         hidden=cfg.model.hidden, activation=cfg.model.activation,
                         members=cfg.ensemble.members, seed=cfg.ensemble.seed)


def training_optimizer(cfg: Config, networks: torch.nn.ModuleList) -> torch.optim.Optimizer:
    """The configured optimizer over the element ``networks``."""
    return build_optimizer(cfg.optimizer.name, optimizer_groups(cfg, networks), cfg.optimizer.lr,
                           **cfg.optimizer.params)


def optimizer_groups(cfg: Config, networks: torch.nn.ModuleList) -> list[dict[str, Any]]:
    """One parameter group per element network (new elements of a continued run become new
    groups); CoRe freezes per member (member_dim 0 of the stacked tensors)."""
    extra = {"member_dim": 0} if cfg.optimizer.name == "core" else {}
    return [{"params": list(network.parameters()), **extra} for network in networks]
