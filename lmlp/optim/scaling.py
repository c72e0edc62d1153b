"""Step-size scaling of a live optimizer: the divergence guard's way to retry with smaller steps."""

from __future__ import annotations

import torch


def scale_step_sizes(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply every learning rate, step size and step-size bound of ``optimizer`` by ``factor``.

    Works on any torch optimizer: the learning rate ``lr`` of every param group (for CoRe and RPROP
    the initial step size s₀), the bounds ``step_sizes`` (s_min, s_max) of groups that have them,
    with s_min capped at the new s_max, and the per-weight step sizes ``step_size`` (weight units)
    of the state. The state tensors are scaled in place, so views of them (CoRe's flat buffers)
    stay valid.
    """
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "step_sizes" in group:
            low, high = group["step_sizes"]
            group["step_sizes"] = (min(low, high * factor), high * factor)
    for state in optimizer.state.values():
        if "step_size" in state:
            state["step_size"].mul_(factor)
