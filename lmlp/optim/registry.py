"""The ten optimizers of the CoRe benchmark (CoRe paper §3; docs/method.md: optimizer comparison), built by name.

Every optimizer keeps PyTorch's default hyperparameters except the learning rate (the paper's
protocol). ``lr`` is the learning rate γ of SGD-type and adaptive optimizers and the maximal
step size s_max of CoRe and RPROP, whose initial step size s₀ is 1e-3 and minimal step size
1e-6. Momentum and NAG are SGD with momentum 0.9 (NAG with Nesterov momentum). CoRe keeps its
recommended hyperparameters (the ``lmlp.optim.CoRe`` defaults) with t_hist = 250, so that
``p_frozen`` alone switches the stability-plasticity balance on.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from lmlp.errors import ConfigError
from lmlp.optim.core import CoRe


@dataclass(frozen=True)
class _Entry:
    """How one registry name maps onto a torch optimizer class.

    ``fixed``: keyword arguments set by the name and not overridable; ``defaults``: overridable
    keyword arguments that differ from the class defaults; ``aliases``: extra names → keyword.
    """

    cls: type[torch.optim.Optimizer]
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    max_step_size: bool = False

    def allowed(self) -> list[str]:
        """Hyperparameter names that ``build_optimizer`` accepts for this optimizer."""
        names = [n for n in inspect.signature(self.cls.__init__).parameters if n not in ("self", "params", "lr")]
        if self.max_step_size:
            names = [n for n in names if n != "step_sizes"] + ["s0", "s_min"]
        return sorted([n for n in names if n not in self.fixed] + list(self.aliases))


S0 = 1e-3
"""Initial step size of CoRe and RPROP in the benchmark protocol."""

S_MIN = 1e-6
"""Minimal step size of CoRe and RPROP (the defaults of both)."""

T_HIST = 250
"""Recommended CoRe score history, steps (docs/method.md: CoRe optimizer)."""

_REGISTRY: dict[str, _Entry] = {
    "core": _Entry(
        CoRe,
        defaults={"score_history": T_HIST},
        aliases={"p_frozen": "frozen", "t_hist": "score_history"},
        max_step_size=True,
    ),
    "adam": _Entry(torch.optim.Adam),
    "adamax": _Entry(torch.optim.Adamax),
    "rmsprop": _Entry(torch.optim.RMSprop),
    "adagrad": _Entry(torch.optim.Adagrad),
    "adadelta": _Entry(torch.optim.Adadelta),
    "nag": _Entry(torch.optim.SGD, fixed={"nesterov": True}, defaults={"momentum": 0.9}),
    "momentum": _Entry(torch.optim.SGD, fixed={"nesterov": False}, defaults={"momentum": 0.9}),
    "sgd": _Entry(torch.optim.SGD),
    "rprop": _Entry(torch.optim.Rprop, max_step_size=True),
}

OPTIMIZERS: tuple[str, ...] = tuple(_REGISTRY)
"""Registry names, in the paper's order."""


def build_optimizer(
    name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float, **hyperparameters: Any
) -> torch.optim.Optimizer:
    """Optimizer ``name`` (case-insensitive, one of ``OPTIMIZERS``) over ``params``.

    Args:
        name: registry name.
        params: tensors or param-group dicts, as for any torch optimizer.
        lr: learning rate γ; for ``core`` and ``rprop`` the maximal step size s_max (weight units).
        hyperparameters: keyword arguments of the optimizer class, e.g. ``betas`` for Adam or
            ``p_frozen`` / ``frozen``, ``t_hist`` / ``score_history``, ``weight_decay``,
            ``member_dim`` for CoRe; ``s0`` and ``s_min`` set the initial and minimal step size
            of CoRe and RPROP.

    Raises:
        ConfigError: unknown name, unknown or duplicated hyperparameter, or invalid value.
    """
    entry = _REGISTRY.get(name.lower())
    if entry is None:
        raise ConfigError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    kwargs = _keyword_arguments(name.lower(), entry, lr, hyperparameters)
    try:
        return entry.cls(params, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"optimizer {name!r}: {error}") from error


def _keyword_arguments(name: str, entry: _Entry, lr: float, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """Constructor keyword arguments of ``entry.cls`` for learning rate ``lr``."""
    allowed = entry.allowed()
    unknown = sorted(set(hyperparameters) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for optimizer {name!r}; allowed: {', '.join(allowed)}"
        )
    given = {entry.aliases.get(key, key): value for key, value in hyperparameters.items()}
    if len(given) < len(hyperparameters):
        pairs = [f"{alias}/{target}" for alias, target in entry.aliases.items()]
        raise ConfigError(f"optimizer {name!r}: give only one of {', '.join(pairs)}")
    kwargs = {**entry.defaults, **given, **entry.fixed}
    if entry.max_step_size:
        kwargs["step_sizes"] = (kwargs.pop("s_min", S_MIN), lr)
        kwargs["lr"] = kwargs.pop("s0", S0)
    else:
        kwargs["lr"] = lr
    return kwargs
