"""lmlp.optim.CoRe reproduces core_optimizer.CoRe 1.1.0 and freezes per ensemble member."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
from torch.testing import assert_close

from lmlp.optim import CoRe

reference = pytest.importorskip("core_optimizer")

STEPS = 520
TOLERANCE = {"rtol": 1e-12, "atol": 1e-14}
TOLERANCE_32 = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp(dtype: torch.dtype = torch.float64) -> torch.nn.Sequential:
    """3 → 8 → 1 tanh network, 41 weights of ``dtype``, fixed initialisation."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)


def _data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic regression data: x (64, 3), y = Σ sin x (64, 1)."""
    x = torch.linspace(-2.0, 2.0, 192, dtype=dtype).reshape(64, 3).roll(7)
    return x, torch.sin(3.0 * x).sum(dim=1, keepdim=True)


def _fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> torch.Tensor:
    """(steps, n) flattened parameters after every step of a mean-squared-error fit of ``_data``."""
    x, y = _data(next(model.parameters()).dtype)
    out = []
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return torch.stack(out)


def _trajectory(
    optimizer_cls: type[torch.optim.Optimizer],
    groups: Callable[[torch.nn.Module], list],
    steps: int = STEPS,
    drop_grad: Callable[[int, list[torch.Tensor]], None] | None = None,
    dtype: torch.dtype = torch.float64,
    **kwargs,
) -> tuple[torch.Tensor, list[dict]]:
    """(steps, 41) flattened parameters after every step of a mean-squared-error fit, and the
    final optimizer state of each parameter."""
    model, (x, y) = _mlp(dtype), _data(dtype)
    optimizer = optimizer_cls(groups(model), **kwargs)
    params = list(model.parameters())
    out = []
    for t in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if drop_grad is not None:
            drop_grad(t, params)
        optimizer.step()
        out.append(torch.cat([p.detach().flatten() for p in params]))
    return torch.stack(out), [optimizer.state[p] for p in params]


def _one_group(model: torch.nn.Module) -> list:
    return list(model.parameters())


def _two_groups(model: torch.nn.Module) -> list:
    first, second = model[0], model[2]
    return [
        {"params": [first.weight, first.bias], "weight_decay": [0.2, 0.0], "frozen": [0.25], "score_history": 40},
        {
            "params": [second.weight, second.bias],
            "step_sizes": (1e-5, 3e-3),
            "etas": (0.5, 1.3),
            "betas": (0.8, 0.9, 100.0, 0.999),
            "eps": 1e-7,
            "lr": 2e-3,
        },
    ]


def _assert_same(groups: Callable[[torch.nn.Module], list], tolerance: dict = TOLERANCE, **kwargs) -> torch.Tensor:
    ours, our_state = _trajectory(CoRe, groups, **kwargs)
    theirs, their_state = _trajectory(reference.CoRe, groups, **kwargs)
    assert_close(ours, theirs, **tolerance)
    assert_close(our_state, their_state, **tolerance)
    return ours


def test_matches_reference_without_freezing() -> None:
    _assert_same(_one_group)


def test_matches_reference_with_active_freezing() -> None:
    t_hist = 50
    trajectory = _assert_same(_one_group, score_history=t_hist, frozen=0.1)
    unchanged = trajectory[1:] == trajectory[:-1]
    assert not unchanged[: t_hist - 1].any()
    frozen_per_step = unchanged[t_hist:].sum(dim=1)
    # int(0.1 × numel) per tensor: 2 of 24 + 0 of 8 + 0 of 8 + 0 of 1 weights, at least
    assert (frozen_per_step >= 2).all()


def test_matches_reference_in_float32_with_active_freezing() -> None:
    trajectory = _assert_same(_one_group, TOLERANCE_32, dtype=torch.float32, score_history=50, frozen=0.1)
    assert trajectory.dtype == torch.float32 and (trajectory[51:] == trajectory[50:-1]).any()


def _threshold_between_roundings() -> tuple[float, float]:
    """A float32 score K whose freezing threshold 0.999999 K, rounded to float32, differs when
    the product is taken in float64 (as the reference does) and in float32; K and the lower of
    the two thresholds."""
    k = torch.linspace(0.01, 0.02, 100_001, dtype=torch.float32)
    in_float64 = (k.double() * 0.999999).float()
    in_float32 = k * torch.tensor(0.999999, dtype=torch.float32)
    first = int(torch.nonzero(in_float64 != in_float32)[0])
    return float(k[first]), float(torch.minimum(in_float64, in_float32)[first])


def test_float32_freezing_threshold_is_taken_in_float64_as_the_reference_does() -> None:
    """A score between the float32 and float64 roundings of 0.999999 × the n_frozen-th largest
    score is frozen exactly when the reference freezes it; then 520 float32 steps agree."""
    t_hist, frozen = 5, 0.125  # n_frozen = 3 of the 24 first-layer weights
    models = [_mlp(torch.float32), _mlp(torch.float32)]
    first = reference.CoRe(models[0].parameters(), score_history=t_hist, frozen=frozen)
    _fit(models[0], first, 1)
    k, between = _threshold_between_roundings()
    generator = torch.Generator().manual_seed(0)
    for p in models[0].parameters():
        state = first.state[p]
        state["step"] = t_hist
        state["score"] = torch.rand(p.shape, generator=generator).mul_(0.5 * k)
    first.state[models[0][0].weight]["score"].view(-1)[:5] = torch.tensor([4 * k, 2 * k, k, between, 0.9 * k])
    models[1].load_state_dict(models[0].state_dict())
    ours = CoRe(models[1].parameters(), score_history=t_hist, frozen=frozen)
    ours.load_state_dict(copy.deepcopy(first.state_dict()))
    theirs, mine = _fit(models[0], first, STEPS), _fit(models[1], ours, STEPS)
    assert_close(mine, theirs, **TOLERANCE_32)


def test_matches_reference_with_two_groups() -> None:
    trajectory = _assert_same(_two_groups, weight_decay=0.05)
    assert (trajectory[41:, :32] == trajectory[40:-1, :32]).any(), "group 1 freezes after its t_hist"


def test_matches_reference_with_weight_decay_list() -> None:
    _assert_same(_one_group, weight_decay=[0.3, 0.0, 0.1], frozen=[0.2, 0.5], score_history=30)


def test_matches_reference_maximizing() -> None:
    _assert_same(_one_group, maximize=True, step_sizes=(1e-6, 1e-3), score_history=30, frozen=0.2)


def test_matches_reference_with_sign_updates() -> None:
    _assert_same(_one_group, betas=(0.7, 0.8, 100.0, -1.0), weight_decay=0.0)


def test_matches_reference_when_gradients_are_missing() -> None:
    def drop(t: int, params: list[torch.Tensor]) -> None:
        if t % 3 == 0:
            params[3].grad = None
        if t % 7 == 0:
            params[0].grad = None

    _assert_same(_one_group, drop_grad=drop, steps=200, score_history=20, frozen=0.2, weight_decay=[0.1, 0.2])


def test_state_dict_round_trip_continues_identically() -> None:
    model, (x, y) = _mlp(), _data()
    optimizer = CoRe(model.parameters(), score_history=20, frozen=0.2)

    def run(m: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    run(model, optimizer, 30)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    run(model, optimizer, 30)

    buffer.seek(0)
    saved = torch.load(buffer)
    restored_model = _mlp()
    restored_model.load_state_dict(saved["model"])
    restored = CoRe(restored_model.parameters(), score_history=20, frozen=0.2)
    restored.load_state_dict(saved["optimizer"])
    run(restored_model, restored, 30)

    for p, q in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), restored_model.parameters()):
        for key in ("step", "prev_1", "prev_2", "step_size", "score", "frozen"):
            assert_close(optimizer.state[p][key], restored.state[q][key], rtol=0, atol=0)


def test_reference_state_dict_loads_and_continues_identically() -> None:
    """Drop-in: state saved by core_optimizer.CoRe continues identically in lmlp's CoRe."""
    (x, y), kwargs = _data(), {"score_history": 10, "frozen": 0.2}
    models = [_mlp(), _mlp()]
    first = reference.CoRe(models[0].parameters(), **kwargs)
    for _ in range(20):
        first.zero_grad()
        torch.nn.functional.mse_loss(models[0](x), y).backward()
        first.step()
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [first, CoRe(models[1].parameters(), **kwargs)]
    optimizers[1].load_state_dict(copy.deepcopy(first.state_dict()))  # as if read from a file
    for _ in range(20):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for p, q in zip(*(m.parameters() for m in models)):
        assert_close(p, q, **TOLERANCE)


def _member_losses(weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """Sum over members m of a loss that depends only on member m's (4, 5) weight and (5,) bias."""
    x = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64).reshape(6, 4)
    return sum(((torch.tanh(x @ w + b) - 0.3 * (m + 1)) ** 2).sum() for m, (w, b) in enumerate(zip(weights, biases)))


@pytest.mark.parametrize("member_dim", [0, 1, -1])
def test_stacked_members_match_separate_tensors(member_dim: int) -> None:
    n_members, steps = 3, 150
    hyper = {"score_history": 20, "frozen": 0.15, "weight_decay": 0.1, "step_sizes": (1e-6, 1e-2)}
    torch.manual_seed(3)
    w0, b0 = torch.randn(n_members, 4, 5, dtype=torch.float64), torch.randn(n_members, 5, dtype=torch.float64)

    def stack(t: torch.Tensor) -> torch.Tensor:
        """Member axis of ``t`` (M, ...) moved to ``member_dim``."""
        return t.movedim(0, member_dim).contiguous().requires_grad_()

    stacked = [stack(w0), stack(b0)]
    separate = [t.clone().requires_grad_() for t in (*w0, *b0)]
    opt_stacked = CoRe(stacked, member_dim=member_dim, **hyper)
    opt_separate = CoRe(separate, **hyper)
    unstack = lambda t: list(t.movedim(member_dim, 0))  # noqa: E731
    for _ in range(steps):
        for opt, (w, b) in ((opt_stacked, map(unstack, stacked)), (opt_separate, (separate[:3], separate[3:]))):
            opt.zero_grad()
            _member_losses(list(w), list(b)).backward()
            opt.step()
    assert_close(stacked[0].movedim(member_dim, 0), torch.stack(separate[:3]), rtol=0, atol=0)
    assert_close(stacked[1].movedim(member_dim, 0), torch.stack(separate[3:]), rtol=0, atol=0)
    assert opt_stacked.state[stacked[0]]["frozen"] == int(0.15 * 20)


def test_stacked_members_without_member_dim_freeze_across_members() -> None:
    """Control: without member_dim the freezing group is the whole stacked tensor."""
    hyper = {"score_history": 5, "frozen": 0.3}
    torch.manual_seed(3)
    w0 = torch.randn(3, 4, 5, dtype=torch.float64)
    b0 = torch.randn(3, 5, dtype=torch.float64)
    results = []
    for member_dim in (0, None):
        params = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
        optimizer = CoRe(params, member_dim=member_dim, **hyper)
        for _ in range(30):
            optimizer.zero_grad()
            _member_losses(list(params[0]), list(params[1])).backward()
            optimizer.step()
        results.append(params[0].detach())
    assert not torch.equal(*results)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"step_sizes": (1e-2, 1e-3)},
        {"etas": (1.1, 1.2)},
        {"betas": (0.7, 0.8, 0.0, 0.9)},
        {"eps": -1.0},
        {"weight_decay": -0.1},
        {"score_history": -1},
        {"frozen": 1.5},
    ],
)
def test_invalid_hyperparameters_raise_like_reference(kwargs: dict) -> None:
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError):
        reference.CoRe(params, **kwargs)
    with pytest.raises(ValueError):
        CoRe(params, **kwargs)


def test_constructor_signature_matches_reference() -> None:
    import inspect

    ours = list(inspect.signature(CoRe.__init__).parameters.values())
    theirs = list(inspect.signature(reference.CoRe.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]
    model = _mlp()
    assert set(reference.CoRe(model.parameters()).param_groups[0]) <= set(CoRe(model.parameters()).param_groups[0])
