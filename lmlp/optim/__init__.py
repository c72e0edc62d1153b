"""Optimizers: the CoRe optimizer and a registry of the ten optimizers of the CoRe benchmark."""

from lmlp.optim.core import CoRe
from lmlp.optim.registry import OPTIMIZERS, build_optimizer
from lmlp.optim.scaling import scale_step_sizes

__all__ = ["OPTIMIZERS", "CoRe", "build_optimizer", "scale_step_sizes"]
