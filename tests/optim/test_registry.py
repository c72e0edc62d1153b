"""build_optimizer: the ten benchmark optimizers by name, with the paper's settings."""

from __future__ import annotations

import pytest
import torch

from lmlp.errors import ConfigError
from lmlp.optim import OPTIMIZERS, CoRe, build_optimizer


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


def test_registry_holds_the_ten_optimizers_of_the_paper() -> None:
    assert OPTIMIZERS == ("core", "adam", "adamax", "rmsprop", "adagrad", "adadelta", "nag", "momentum", "sgd", "rprop")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_takes_a_step_that_changes_the_parameters(name: str) -> None:
    params = _params()
    before = [p.detach().clone() for p in params]
    optimizer = build_optimizer(name, params, lr=1e-2)
    sum((p**2).sum() for p in params).backward()
    optimizer.step()
    for p, p0 in zip(params, before):
        assert not torch.equal(p, p0)


@pytest.mark.parametrize(
    ("name", "cls", "settings"),
    [
        ("core", CoRe, {"lr": 1e-3, "step_sizes": (1e-6, 0.05), "score_history": 250, "frozen": [0.0]}),
        ("adam", torch.optim.Adam, {"lr": 0.05, "betas": (0.9, 0.999), "weight_decay": 0}),
        ("adamax", torch.optim.Adamax, {"lr": 0.05, "betas": (0.9, 0.999)}),
        ("rmsprop", torch.optim.RMSprop, {"lr": 0.05, "alpha": 0.99, "momentum": 0}),
        ("adagrad", torch.optim.Adagrad, {"lr": 0.05, "lr_decay": 0}),
        ("adadelta", torch.optim.Adadelta, {"lr": 0.05, "rho": 0.9}),
        ("nag", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
        ("momentum", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": False}),
        ("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0, "nesterov": False}),
        ("rprop", torch.optim.Rprop, {"lr": 1e-3, "step_sizes": (1e-6, 0.05), "etas": (0.5, 1.2)}),
    ],
)
def test_class_and_settings(name: str, cls: type, settings: dict) -> None:
    optimizer = build_optimizer(name, _params(), lr=0.05)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    for key, value in settings.items():
        assert group[key] == value, key


def test_name_is_case_insensitive() -> None:
    assert isinstance(build_optimizer("CoRe", _params(), lr=1e-2), CoRe)


def test_core_hyperparameters_pass_through() -> None:
    optimizer = build_optimizer("core", _params(), lr=1e-2, p_frozen=0.1, t_hist=100, weight_decay=0.0, member_dim=0)
    group = optimizer.param_groups[0]
    assert (group["frozen"], group["score_history"], group["weight_decay"], group["member_dim"]) == ([0.1], 100, [0.0], 0)


def test_step_size_options_of_core_and_rprop() -> None:
    for name in ("core", "rprop"):
        group = build_optimizer(name, _params(), lr=0.5, s0=1e-2, s_min=1e-5).param_groups[0]
        assert (group["lr"], group["step_sizes"]) == (1e-2, (1e-5, 0.5))


def test_unknown_name_lists_the_allowed_names() -> None:
    with pytest.raises(ConfigError, match="unknown optimizer 'lbfgs'; allowed: core, adam, .*, rprop$"):
        build_optimizer("lbfgs", _params(), lr=1e-2)


def test_unknown_hyperparameter_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as error:
        build_optimizer("adam", _params(), lr=1e-2, momentum=0.9)
    message = str(error.value)
    assert "\n" not in message
    assert "momentum" in message and "allowed: amsgrad, betas" in message


def test_fixed_settings_are_not_hyperparameters() -> None:
    with pytest.raises(ConfigError, match="nesterov"):
        build_optimizer("nag", _params(), lr=1e-2, nesterov=False)
    with pytest.raises(ConfigError, match="step_sizes"):
        build_optimizer("core", _params(), lr=1e-2, step_sizes=(1e-6, 1.0))


def test_alias_and_name_together_are_rejected() -> None:
    with pytest.raises(ConfigError, match="p_frozen/frozen"):
        build_optimizer("core", _params(), lr=1e-2, p_frozen=0.1, frozen=0.1)


def test_invalid_values_become_config_errors() -> None:
    with pytest.raises(ConfigError, match="optimizer 'core'"):
        build_optimizer("core", _params(), lr=1e-2, p_frozen=2.0)
    with pytest.raises(ConfigError, match="optimizer 'adam'"):
        build_optimizer("adam", _params(), lr=-1.0)
