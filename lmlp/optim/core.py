"""The Continual Resilient (CoRe) optimizer on flat per-group state.

A drop-in replacement for ``core_optimizer.CoRe`` 1.1.0 (same constructor, param-group keys and
per-parameter state keys, same numbers to round-off) whose step runs a fixed number of
vectorised tensor operations per parameter group instead of a Python loop over tensors, and
which can treat the leading dimension of a stacked ensemble tensor as independent members
(``member_dim``) for the stability-plasticity freezing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor

STATE_BUFFERS = ("prev_1", "prev_2", "step_size", "score")
"""Per-element state tensors (shape of the parameter), stored as views of flat buffers."""

WORK_BUFFERS = ("g", "u", "tmp", "up", "down", "w", "plasticity")
"""Flat scratch tensors of a layout (masks are 0/1 floats: float selects are exact and fast)."""

FREEZE_TOLERANCE = 0.999999
"""Scores ≥ this × the n_frozen-th largest score of their group are frozen (reference rule)."""


class CoRe(torch.optim.Optimizer):
    r"""Continual Resilient (CoRe) optimizer (CoRe paper Eqs. 1–8; ``core_optimizer.CoRe`` 1.1.0).

    Update of weight w in step t, with τ = t the weight's own update counter (Python int) and
    G = ∂L/∂w (negated if ``maximize``)::

        β1(τ) = β1b + (β1a − β1b) exp(−((τ − 1)/β1c)²)
        g ← β1(τ) g + (1 − β1(τ)) G              h ← β2 h + (1 − β2) G²
        P = 0 if τ > t_hist > 0 and S ≥ 0.999999 × (n_frozen-th largest S of its group), else 1
        s ← min(η+ s, s_max) if g_old g P > 0;  max(η− s, s_min) if g_old g P < 0;  s otherwise
        u = [g / (1 − β1(τ)^τ)] / [(h / (1 − β2^τ))^½ + ε]      (u = sgn g if β2 < 0)
        S ← (1 − 1/t_hist)^[τ > t_hist, n_frozen > 0] S + g u P s / t_hist   (if t_hist > 0)
        w ← w − d |u P s| w − u P s

    A freezing group is one parameter tensor, or with ``member_dim`` one slice of it along that
    dimension (one member of a stacked ensemble); n_frozen = ⌊frozen × group size⌋ is fixed
    when the state is created.

    Args:
        params: tensors or param-group dicts; groups may override every keyword below.
        lr: initial step size s₀, in weight units (recommended 1e-3).
        step_sizes: (s_min, s_max), step-size bounds in weight units. s_max is the main
            hyperparameter: 1e-3 for mini-batch, 1e-2 for intermediate (e.g. a 10 % fit
            fraction per step), 1 for full-batch learning; s_min 1e-6.
        etas: (η−, η+), dimensionless step-size decrease and increase factors, 0 < η− ≤ 1 ≤ η+.
        betas: (β1a, β1b, β1c, β2): initial and final gradient decay (dimensionless, in [0, 1)),
            width of the Gaussian switching between them in optimizer steps, and the decay of the
            squared-gradient average (β2 < 0 switches to the sign update u = sgn g).
        eps: added to the root-mean-square gradient, in gradient units (loss / weight unit).
        weight_decay: d, in inverse weight units (weights stay within ±1/d); a float, or a list
            whose i-th entry (cyclically) applies to the i-th tensor of a group that has a gradient.
        score_history: t_hist, optimizer steps of importance-score history before freezing
            starts (0 disables scores and freezing; recommended 250).
        frozen: p_frozen, fraction of each freezing group frozen after t_hist steps (0 … ~0.1);
            a float or a list indexed (cyclically) by a tensor's position in its group.
        maximize: ascend instead of descend.
        foreach: accepted for compatibility; the step is always vectorised.
        member_dim: None (plain CoRe), or the dimension of each tensor that indexes independent
            ensemble members; freezing groups are then the slices along it.

    Recommended (CoRe paper §4.1): betas (0.7375, 0.8125, 250, 0.99), eps 1e-8, etas
    (0.7375, 1.2), step_sizes (1e-6, s_max), lr 1e-3, weight_decay 0.1, score_history 250.

    State per parameter (as the reference): ``step`` (int), ``prev_1`` g, ``prev_2`` h,
    ``step_size`` s, ``score`` S (tensors of the parameter's shape) and ``frozen`` (int, n_frozen
    per freezing group). The tensors are views of one flat buffer per parameter set sharing
    group, dtype, device and step count, rebuilt after ``load_state_dict``. Complex and sparse
    parameters are not supported.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        step_sizes: tuple[float, float] = (1e-6, 1e-2),
        etas: tuple[float, float] = (0.7375, 1.2),
        betas: tuple[float, float, float, float] = (0.7375, 0.8125, 250.0, 0.99),
        eps: float = 1e-8,
        weight_decay: float | list[float] = 0.1,
        score_history: int = 0,
        frozen: float | list[float] = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        member_dim: int | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "step_sizes": step_sizes,
            "etas": etas,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "score_history": score_history,
            "frozen": frozen,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": False,
            "member_dim": member_dim,
        }
        _check_group(defaults)
        self._layouts: dict[tuple, _Layout] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; float ``weight_decay`` / ``frozen`` become one-element lists."""
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also used by ``load_state_dict``: the flat buffers are rebuilt from the new state."""
        super().__setstate__(state)
        self._layouts = {}
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("member_dim", self.defaults.get("member_dim"))
            _check_group(group)

    def refresh_frozen_counts(self) -> None:
        """Set every parameter's n_frozen from its group's current ``frozen`` fraction (the state
        keeps the count it started with): for groups whose settings changed after a state was loaded,
        e.g. a continued run with another p_frozen."""
        for group in self.param_groups:
            fractions = group["frozen"]
            for index, p in enumerate(group["params"]):
                if "frozen" in self.state.get(p, {}):
                    _, group_size = _member_shape(p, group["member_dim"])
                    self.state[p]["frozen"] = int(fractions[index % len(fractions)] * group_size)
        self._layouts = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for layout, step, weight_decays in self._partition(group):
                _core_update(layout, group, step, weight_decays)
                for p in layout.params:
                    self.state[p]["step"] += 1
        return loss

    def _partition(self, group: dict[str, Any]) -> list[tuple[_Layout, int, tuple[float, ...]]]:
        """Layouts of the group's parameters with gradients, split by (step, dtype, device).

        The reference indexes ``weight_decay`` by position among the tensors with gradients and
        ``frozen`` by position in the group; both are reproduced here.
        """
        decays = group["weight_decay"]
        with_grad = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
        parts: dict[tuple, list[tuple[int, Tensor, float]]] = defaultdict(list)
        for j, (i, p) in enumerate(with_grad):
            if p.grad.is_sparse or p.is_complex():
                raise TypeError("CoRe supports only dense real parameters and gradients")
            step = self.state[p].get("step", 0)
            parts[(step, p.dtype, p.device)].append((i, p, float(decays[j % len(decays)])))
        partition = []
        for (step, _, _), members in parts.items():
            layout = self._layout(group, [i for i, _, _ in members], [p for _, p, _ in members])
            partition.append((layout, step, tuple(d for _, _, d in members)))
        return partition

    def _layout(self, group: dict[str, Any], indices: list[int], params: list[Tensor]) -> _Layout:
        """Cached flat layout of ``params`` (at ``indices`` of the group); a new one takes over
        their state (created here if missing) and replaces layouts sharing any of them."""
        key = (group["member_dim"], tuple(id(p) for p in params))
        if key not in self._layouts:
            for old in [k for k in self._layouts if set(key[1]).intersection(k[1])]:
                del self._layouts[old]
            for i, p in zip(indices, params):
                if not self.state[p]:
                    self.state[p].update(_initial_state(p, group, i))
            states = [self.state[p] for p in params]
            self._layouts[key] = _Layout.build(params, states, group["member_dim"])
        return self._layouts[key]


def _check_group(group: dict[str, Any]) -> None:
    """Validate hyperparameters like the reference; floats for list options become lists."""
    s_min, s_max = group["step_sizes"]
    eta_minus, eta_plus = group["etas"]
    b1a, b1b, b1c, b2 = group["betas"]
    for key in ("weight_decay", "frozen"):
        if isinstance(group[key], (int, float)):
            group[key] = [float(group[key])]
        elif not isinstance(group[key], (list, tuple)) or not group[key]:
            raise ValueError(f"Invalid {key.replace('_', ' ')}: {group[key]}")
    checks = [
        (group["lr"] > 0.0, f"Invalid learning rate: {group['lr']}"),
        (0.0 < s_min <= s_max, f"Invalid min and max step sizes: {s_min}, {s_max}"),
        (0.0 < eta_minus <= 1.0 <= eta_plus, f"Invalid eta values: {eta_minus}, {eta_plus}"),
        (
            0.0 <= b1a < 1.0 and 0.0 <= b1b < 1.0 and b1c > 0.0 and b2 < 1.0,
            f"Invalid beta values: {b1a}, {b1b}, {b1c}, {b2}",
        ),
        (group["eps"] >= 0.0, f"Invalid epsilon value: {group['eps']}"),
        (all(d >= 0.0 for d in group["weight_decay"]), f"Invalid weight decay: {group['weight_decay']}"),
        (group["score_history"] >= 0, f"Invalid score history: {group['score_history']}"),
        (all(0.0 <= f <= 1.0 for f in group["frozen"]), f"Invalid frozen: {group['frozen']}"),
        (
            group["member_dim"] is None or isinstance(group["member_dim"], int),
            f"Invalid member_dim: {group['member_dim']}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _initial_state(p: Tensor, group: dict[str, Any], index: int) -> dict[str, Any]:
    """Fresh state of parameter ``p`` at position ``index`` of its group."""
    fractions = group["frozen"]
    _, group_size = _member_shape(p, group["member_dim"])
    return {
        "step": 0,
        "prev_1": torch.zeros_like(p),
        "prev_2": torch.zeros_like(p),
        "step_size": torch.full_like(p, group["lr"]),
        "score": torch.zeros_like(p),
        "frozen": int(fractions[index % len(fractions)] * group_size),
    }


def _member_shape(p: Tensor, member_dim: int | None) -> tuple[int, int]:
    """(number of freezing groups, elements per group) of parameter ``p``."""
    if member_dim is None:
        return 1, p.numel()
    if p.dim() == 0:
        raise ValueError("member_dim needs parameters with at least one dimension")
    n_members = p.shape[member_dim]
    return n_members, p.numel() // n_members if n_members else 0


def _lead(t: Tensor, member_dim: int | None) -> Tensor:
    """``t`` with the member dimension moved to the front (a view)."""
    return t if not member_dim else t.movedim(member_dim, 0)


def _unflatten(flat: Tensor, p: Tensor, member_dim: int | None) -> Tensor:
    """View of the 1-D ``flat`` (member-leading order) with the shape of ``p``."""
    lead_shape = _lead(p, member_dim).shape
    return flat.view(lead_shape) if not member_dim else flat.view(lead_shape).movedim(0, member_dim)


@dataclass
class _Bucket:
    """Freezing groups of equal size and n_frozen: rows of ``flat[start:stop].view(-1, size)``."""

    start: int
    stop: int
    size: int
    n_frozen: int

    @staticmethod
    def merge(buckets: Iterable[_Bucket]) -> list[_Bucket]:
        """Join adjacent buckets of equal (size, n_frozen)."""
        merged: list[_Bucket] = []
        for b in buckets:
            last = merged[-1] if merged else None
            if last and last.stop == b.start and (last.size, last.n_frozen) == (b.size, b.n_frozen):
                last.stop = b.stop
            else:
                merged.append(b)
        return merged


@dataclass
class _Layout:
    """Flat state and work buffers, shape (n,), of parameters sharing dtype, device and step.

    Tensors are ordered by (n_frozen == 0, group size, n_frozen), so every bucket of equal-sized
    freezing groups is contiguous and the groups with n_frozen > 0 fill ``[0, n_active)``.
    """

    params: list[Tensor]
    order: list[int]
    member_dims: list[int | None]
    state: dict[str, Tensor]
    buckets: list[_Bucket]
    n_active: int
    param_views: list[Tensor]
    work: dict[str, Tensor]
    decay_cache: tuple[tuple[float, ...], float | Tensor | None] | None = None

    @classmethod
    def build(cls, params: list[Tensor], states: list[dict[str, Any]], member_dim: int | None) -> _Layout:
        """Copy the parameters' state into flat buffers and point their state at views of them."""
        dims = [None if member_dim is None else member_dim % max(p.dim(), 1) for p in params]
        shapes = [_member_shape(p, d) for p, d in zip(params, dims)]
        order = sorted(
            range(len(params)), key=lambda i: (states[i]["frozen"] == 0, shapes[i][1], states[i]["frozen"])
        )
        params = [params[i] for i in order]
        dims = [dims[i] for i in order]
        states = [states[i] for i in order]
        shapes = [shapes[i] for i in order]
        sizes = [p.numel() for p in params]
        offsets = [0, *accumulate(sizes)]
        ref = params[0]
        flat = {
            key: torch.cat([_lead(s[key], d).reshape(-1) for s, d in zip(states, dims)]) for key in STATE_BUFFERS
        }
        for k, (p, d, s) in enumerate(zip(params, dims, states)):
            for key in STATE_BUFFERS:
                s[key] = _unflatten(flat[key][offsets[k] : offsets[k + 1]], p, d)
        buckets = _Bucket.merge(
            _Bucket(offsets[k], offsets[k + 1], size, s["frozen"])
            for k, (s, (_, size)) in enumerate(zip(states, shapes))
            if s["frozen"] > 0
        )
        n = offsets[-1]
        work = {key: torch.empty(n, dtype=ref.dtype, device=ref.device) for key in WORK_BUFFERS}
        param_views = [
            _unflatten(work["w"][offsets[k] : offsets[k + 1]], p, d) for k, (p, d) in enumerate(zip(params, dims))
        ]
        n_active = buckets[-1].stop if buckets else 0
        return cls(params, order, dims, flat, buckets, n_active, param_views, work)

    def gather(self, tensors: Sequence[Tensor], out: Tensor) -> Tensor:
        """Concatenate tensors shaped like the parameters into ``out`` (n,)."""
        return torch.cat([_lead(t, d).reshape(-1) for t, d in zip(tensors, self.member_dims)], out=out)

    def negative_decay(self, weight_decays: tuple[float, ...]) -> float | Tensor | None:
        """−d per element ((n,) tensor, or a float if uniform); None if d = 0 everywhere.

        ``weight_decays`` holds one d per parameter in the order given to ``build``.
        """
        if self.decay_cache is None or self.decay_cache[0] != weight_decays:
            if not any(weight_decays):
                value = None
            elif len(set(weight_decays)) == 1:
                value = -weight_decays[0]
            else:
                ref = self.work["g"]
                sizes = torch.tensor([p.numel() for p in self.params], device=ref.device)
                per_tensor = [-weight_decays[i] for i in self.order]
                value = torch.tensor(per_tensor, dtype=ref.dtype, device=ref.device).repeat_interleave(sizes)
            self.decay_cache = (weight_decays, value)
        return self.decay_cache[1]

    def plasticity(self) -> Tensor:
        """(n_active,) plasticity factors P: 0 where a score is ≥ 0.999999 × the n_frozen-th
        largest score of its freezing group, else 1 (in the parameters' dtype).

        As in the reference, the threshold is computed in float64 and then rounded to the scores'
        dtype (in float32 the product taken in float32 can round to the neighbouring value).
        """
        score, plasticity = self.state["score"], self.work["plasticity"]
        for b in self.buckets:
            rows = score[b.start : b.stop].view(-1, b.size)
            kth = torch.topk(rows, b.n_frozen, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
            threshold = (kth.to(torch.float64) * FREEZE_TOLERANCE).to(rows.dtype)
            torch.lt(rows, threshold, out=plasticity[b.start : b.stop].view(-1, b.size))
        return plasticity[: self.n_active]


def _core_update(layout: _Layout, group: dict[str, Any], step: int, weight_decays: tuple[float, ...]) -> None:
    """One CoRe step of all parameters in ``layout``; ``step`` = τ − 1 updates done before."""
    s_min, s_max = group["step_sizes"]
    eta_minus, eta_plus = group["etas"]
    b1a, b1b, b1c, beta_2 = group["betas"]
    t_hist = group["score_history"]
    state, work, n_active = layout.state, layout.work, layout.n_active
    prev_1, step_size, score = state["prev_1"], state["step_size"], state["score"]
    g, u, tmp, up, down = work["g"], work["u"], work["tmp"], work["up"], work["down"]

    layout.gather([p.grad for p in layout.params], out=g)  # Eqs. 1-3: moving averages
    if group["maximize"]:
        g.neg_()
    if beta_2 >= 0:
        state["prev_2"].mul_(beta_2).addcmul_(g, g, value=1.0 - beta_2)
    beta_1 = b1b + (b1a - b1b) * math.exp(-((step / b1c) ** 2))
    g.lerp_(prev_1, beta_1)

    active = t_hist > 0 and step >= t_hist and n_active > 0
    plasticity = layout.plasticity() if active else None  # Eq. 5, from the scores S^(τ-1)
    if plasticity is not None:  # Eq. 8 decay, only where n_frozen > 0 (as the reference)
        score[:n_active].mul_(1.0 - 1.0 / t_hist)

    torch.mul(g, prev_1, out=tmp)  # Eq. 6: RPROP-like step sizes
    if plasticity is not None:
        tmp[:n_active].mul_(plasticity)
    torch.gt(tmp, 0.0, out=up)
    torch.lt(tmp, 0.0, out=down)
    keep = torch.eq(tmp, 0.0, out=tmp)
    factor = up.mul_(eta_plus).add_(down, alpha=eta_minus).add_(keep)
    step_size.mul_(factor).clamp_(s_min, s_max)

    if beta_2 >= 0:  # Eq. 4: Adam-like update direction
        torch.div(g, 1.0 - beta_1 ** (step + 1), out=u)
        torch.div(state["prev_2"], 1.0 - beta_2 ** (step + 1), out=tmp).sqrt_().add_(group["eps"])
        u.div_(tmp)
    else:
        torch.sign(g, out=u)
    u.mul_(step_size)
    if plasticity is not None:
        u[:n_active].mul_(plasticity)
    if t_hist > 0:  # Eq. 8
        score.addcmul_(g, u, value=1.0 / t_hist)

    w = layout.gather(layout.params, out=work["w"])  # Eq. 7: decay, then the update
    negative_decay = layout.negative_decay(weight_decays)
    if negative_decay is not None:
        w.add_(torch.abs(u, out=tmp).mul_(negative_decay).mul_(w))
    w.add_(u, alpha=-1.0)
    torch._foreach_copy_(layout.params, layout.param_views)
    prev_1.copy_(g)
