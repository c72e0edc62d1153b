"""The divergence guard: a non-finite epoch is undone and retried with smaller steps, or stops."""

import numpy as np
import pytest
import torch
from factories import tiny_config

import lmlp.train.epoch
from lmlp.errors import LmlpError
from lmlp.integrity import load_checked
from lmlp.modelfile import load_model
from lmlp.optim.registry import S0
from lmlp.train import train


def nan_once(monkeypatch, at_call):
    """Make ``member_losses`` return a NaN loss on its ``at_call``-th call (a transient fault)."""
    original, calls = lmlp.train.epoch.member_losses, [0]

    def flaky(*args):
        calls[0] += 1
        loss, per_structure = original(*args)
        return (loss * float("nan"), per_structure) if calls[0] == at_call else (loss, per_structure)

    monkeypatch.setattr(lmlp.train.epoch, "member_losses", flaky)


def test_a_non_finite_loss_is_undone_and_retried_with_lower_step_sizes(tmp_path, monkeypatch):
    nan_once(monkeypatch, at_call=5)
    result = train(tiny_config(tmp_path / "run", epochs=10, checkpoint_every=10))
    log = (result.run_dir / "train.log").read_text()
    assert "epoch 5: non-finite loss, gradient or training/validation error in member(s) 0, 1, 2: epoch undone, retried with " \
           "step sizes × 0.5 (retry 1 of 5)" in log
    saved = load_checked(result.run_dir / "checkpoint_last.pt", "checkpoint")
    groups = saved["optimizer"]["param_groups"]
    assert all(g["lr"] == pytest.approx(0.5 * S0) for g in groups)  # CoRe's initial step size
    assert all(g["step_sizes"][1] == pytest.approx(0.5 * 0.01) for g in groups)  # its maximum, the config's lr
    assert len(saved["rows"]) == 10 and result.test.ensemble["rmse_e"] < np.inf
    model, _ = load_model(result.run_dir / "model.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_divergence_stops_with_one_line_when_configured(tmp_path, monkeypatch):
    nan_once(monkeypatch, at_call=3)
    with pytest.raises(LmlpError, match=r"^epoch 3: non-finite [^\n]*training diverged[^\n]*$"):
        train(tiny_config(tmp_path / "run", epochs=10, on_divergence="stop"))
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_hopeless_divergence_ends_with_an_error_and_no_nan_files(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=30, checkpoint_every=1)
    cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.params = "sgd", 100.0, {}
    with pytest.raises(LmlpError, match=r"after 5 step-size reductions: training diverged"):
        train(cfg)
    saved = load_checked(tmp_path / "run" / "checkpoint_last.pt", "checkpoint")
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
