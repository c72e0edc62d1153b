"""scale_step_sizes: the optimizer-level step-size reduction of the divergence guard."""

import pytest
import torch

from lmlp.optim import build_optimizer, scale_step_sizes


def stepped(name: str, lr: float) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    """Optimizer ``name`` over one 2 × 3 weight after three steps on a quadratic loss."""
    weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3))
    optimizer = build_optimizer(name, [weight], lr)
    for _ in range(3):
        optimizer.zero_grad()
        (weight**2).sum().backward()
        optimizer.step()
    return optimizer, weight


@pytest.mark.parametrize("name", ["core", "rprop"])
def test_step_sizes_and_their_bounds_are_scaled_in_place(name):
    optimizer, weight = stepped(name, 0.01)
    group, state = optimizer.param_groups[0], optimizer.state[weight]
    lr, (low, high), step_size = group["lr"], group["step_sizes"], state["step_size"].clone()
    view = state["step_size"]
    scale_step_sizes(optimizer, 0.5)
    assert group["lr"] == 0.5 * lr and group["step_sizes"] == (low, 0.5 * high)
    assert torch.equal(state["step_size"], 0.5 * step_size) and state["step_size"] is view


def test_the_lower_bound_never_exceeds_the_upper():
    optimizer, _ = stepped("core", 1e-6)
    scale_step_sizes(optimizer, 0.5)
    assert optimizer.param_groups[0]["step_sizes"] == (0.5e-6, 0.5e-6)


def test_the_scaled_core_state_is_what_the_next_step_uses():
    optimizer, weight = stepped("core", 0.01)
    reference, reference_weight = stepped("core", 0.01)
    scale_step_sizes(optimizer, 0.5)
    state = reference.state_dict()
    state["param_groups"][0]["lr"] *= 0.5
    state["param_groups"][0]["step_sizes"] = (1e-6, 0.005)
    state["state"][0]["step_size"] = state["state"][0]["step_size"] * 0.5
    reference.load_state_dict(state)
    for opt, w in ((optimizer, weight), (reference, reference_weight)):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert torch.equal(weight, reference_weight)


def test_learning_rate_optimizers_get_a_lower_learning_rate():
    optimizer, _ = stepped("adam", 1e-3)
    scale_step_sizes(optimizer, 0.25)
    assert optimizer.param_groups[0]["lr"] == 0.25e-3
