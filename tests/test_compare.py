import json

import numpy as np
import pytest
import torch
from factories import TINY, crash_at, kill_at_random_moments

from lmlp.compare import accuracy_scores, compare
from lmlp.config import config_from_dict
from lmlp.integrity import load_checked


def test_accuracy_scores_follow_equations_19_to_22():
    errors = np.array([[2.0, 50.0], [4.0, 40.0], [8.0, 100.0]])
    sigma = np.array([[0.2, 5.0], [0.4, 2.0], [1.0, 10.0]])
    a_i, da_i, a, da = accuracy_scores(errors, sigma)
    np.testing.assert_allclose(a_i, [[1.0, 0.8], [0.5, 1.0], [0.25, 0.4]])
    np.testing.assert_allclose(da_i, [[2 / 4 * 0.2, 40 / 2500 * 5.0], [2 / 16 * 0.4, 40 / 1600 * 2.0],
                                      [2 / 64 * 1.0, 40 / 10000 * 10.0]])
    np.testing.assert_allclose(a, [0.9, 0.75, 0.325])
    np.testing.assert_allclose(da, np.sqrt((da_i**2).sum(1)) / 2)
    assert da[0] == pytest.approx(np.hypot(0.1, 0.08) / 2)


def mini_config(out, seed_mode="shared"):
    """3 variants × 2 seeds × 6 epochs on the tiny set; shared seeds unless ``seed_mode`` says."""
    return config_from_dict({
        "name": "mini",
        "data": {"path": str(TINY)},
        "model": {"hidden": [8]},
        "selection": {"fit_fraction": 0.5},
        "training": {"epochs": 6, "checkpoint_every": 3},
        "output": {"progress": False},
        "compare": {"seeds": 2, "seed_mode": seed_mode, "out": str(out), "target_rmse_e": 60.0,
                    "target_rmse_f": 1500.0,
                    "variants": [{"name": "CoRe", "optimizer": "core", "lr": 1e-2},
                                 {"name": "CoRe p_frozen=0.1", "optimizer": "core", "lr": 1e-2,
                                  "params": {"p_frozen": 0.1}},
                                 {"name": "Adam", "optimizer": "adam", "lr": 1e-3}]},
    })


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return out, compare(mini_config(out))


def test_miniature_comparison_writes_every_output(mini):
    out, result = mini
    for name in ("comparison.md", "comparison.csv", "comparison.json", "accuracy_scores.png", "validation_rmse.png"):
        assert (out / name).is_file(), name
    table = json.loads((out / "comparison.json").read_text())
    assert [r["rank"] for r in table["runs"]] == [1, 2, 3]
    assert {r["variant"] for r in table["runs"]} == {"CoRe", "CoRe p_frozen=0.1", "Adam"}
    assert max(r["A"] for r in table["runs"]) <= 1.0 and table["runs"][0]["A"] == max(r["A"] for r in table["runs"])
    assert "| 1 |" in (out / "comparison.md").read_text()
    for run in result.runs:
        assert len(run.curve_e) == 6 and run.seconds_per_epoch > 0


def test_every_variant_starts_from_the_same_weights_per_seed(mini):
    _, result = mini
    assert len({run.initial_weights for run in result.runs}) == 1


def test_a_second_invocation_trains_nothing(mini, monkeypatch):
    out, result = mini
    import lmlp.train

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(lmlp.train, "train", no_training)
    again = compare(mini_config(out))
    assert [r.variant for r in again.runs] == [r.variant for r in result.runs]
    np.testing.assert_array_equal(again.a, result.a)


def test_interrupted_comparison_resumes_the_unfinished_run(tmp_path, monkeypatch):
    cfg = mini_config(tmp_path)
    undo = crash_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        compare(cfg, variants=["Adam"])
    undo()
    resumed = compare(cfg, variants=["Adam"])
    fresh = compare(mini_config(tmp_path / "fresh"), variants=["Adam"])
    assert resumed.runs[0].final_e == fresh.runs[0].final_e


def test_learning_rate_grid_keeps_the_best_value(tmp_path):
    result = compare(mini_config(tmp_path), variants=["Adam"], lr_grid=[1e-4, 1e-2], epochs=4)
    losses = {}
    for lr in (1e-4, 1e-2):
        members = json.loads((tmp_path / "runs" / "Adam" / f"lr{lr:g}" / "metrics.json").read_text())["validation"]["members"]
        e, f = np.array(members["rmse_e"]) / 1e3, np.array(members["rmse_f"]) / 1e3
        losses[lr] = np.mean(10.9**2 * e**2 + f**2)
    assert result.runs[0].lr == min(losses, key=losses.get)
    assert losses[1e-4] != losses[1e-2]
    assert "lowest validation loss" in (tmp_path / "comparison.md").read_text()


def test_invalid_variant_is_reported_before_any_training(tmp_path):
    from lmlp.errors import LmlpError

    cfg = config_from_dict({"data": {"path": str(TINY)}, "compare": {
        "out": str(tmp_path), "variants": [{"name": "bad", "optimizer": "adam", "params": {"p_frozen": 0.1}}]}})
    with pytest.raises(LmlpError, match="compare variant 'bad'.*p_frozen"):
        compare(cfg)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(LmlpError, match="not variants of the config"):
        compare(cfg, variants=["nope"])


def test_compare_command_runs_and_rejects_bad_options(mini, tmp_path):
    import subprocess
    import sys

    import yaml

    out, _ = mini
    config = tmp_path / "c.yaml"
    cfg = {"name": "mini", "data": {"path": str(TINY)}, "model": {"hidden": [8]},
           "selection": {"fit_fraction": 0.5}, "training": {"epochs": 6, "checkpoint_every": 3},
           "output": {"progress": False},
           "compare": {"seeds": 2, "seed_mode": "shared", "out": str(out), "target_rmse_e": 60.0,
                       "target_rmse_f": 1500.0,
                       "variants": [{"name": "CoRe", "optimizer": "core", "lr": 1e-2},
                                    {"name": "Adam", "optimizer": "adam", "lr": 1e-3}]}}
    config.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "lmlp", "compare", str(config), "--optimizers", "CoRe,Adam"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| 1 |" in done.stdout and "training" not in done.stdout
    bad = subprocess.run([sys.executable, "-m", "lmlp", "compare", str(config), "--lr-grid", "1e-3,x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "--lr-grid" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_output_directory_of_another_setup_is_refused(mini):
    from lmlp.errors import LmlpError

    out, _ = mini
    with pytest.raises(LmlpError, match="holds a run of a different setup"):
        compare(mini_config(out), variants=["Adam"], epochs=5)


def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_comparison(tmp_path):
    import sys

    import yaml

    from lmlp.config import dump_config

    out = tmp_path / "killed"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(yaml.safe_load(dump_config(mini_config(out)))))
    compare(mini_config(tmp_path / "whole"))
    kill_at_random_moments(lambda: [sys.executable, "-m", "lmlp", "compare", str(config)], out, seed=3)
    strip = [[{k: v for k, v in run.items() if k != "seconds_per_epoch"} for run in json.loads(p.read_text())["runs"]]
             for p in (tmp_path / "whole" / "comparison.json", out / "comparison.json")]
    assert strip[0] == strip[1]


def test_seeds_are_independent_runs_by_default():
    from lmlp.config import CompareConfig

    assert CompareConfig().seed_mode == "independent"


def test_independent_seed_s_starts_where_shared_member_s_does():
    from lmlp.descriptors import Standardizer, SymmetryFunctions
    from lmlp.model import HDNNPEnsemble

    descriptor = SymmetryFunctions(4.0, [1.0], [1.0], [], [], [])

    def ensemble(members, seed):
        return HDNNPEnsemble(descriptor, Standardizer(torch.zeros(3), torch.ones(3)), [1, 6], torch.zeros(2),
                             [4], members=members, seed=seed)

    shared = ensemble(3, 0)
    for s in range(3):
        for x, y in zip(ensemble(1, s).parameters(), shared.parameters()):
            assert torch.equal(x[0], y[s])


@pytest.fixture(scope="module")
def independent(tmp_path_factory):
    out = tmp_path_factory.mktemp("independent")
    return out, compare(mini_config(out, "independent"), variants=["CoRe", "Adam"], epochs=4)


def test_independent_seeds_each_train_their_own_run(independent):
    """Every seed is a run of one member with its own data order and adaptive selection; the
    comparison's seeds are those runs."""
    out, result = independent
    runs = [out / "runs" / "CoRe" / f"lr0.01-seed{s}" for s in range(2)]
    infos = [json.loads((run / "run.json").read_text()) for run in runs]
    assert [info["seeds"] for info in infos] == [{"ensemble": 0, "training": 0}, {"ensemble": 1, "training": 1}]
    selections = [load_checked(run / "checkpoint_last.pt", "checkpoint")["selection"] for run in runs]
    assert not torch.equal(selections[0]["weights"], selections[1]["weights"])
    test = [json.loads((run / "metrics.json").read_text())["test"]["members"]["rmse_e"] for run in runs]
    assert [len(t) for t in test] == [1, 1]
    core = next(r for r in result.runs if r.variant == "CoRe")
    assert core.final_e == pytest.approx((np.mean(test), np.std(np.ravel(test), ddof=1)))
    assert len({r.initial_weights for r in result.runs}) == 1
    assert not (out / "runs" / "CoRe" / "lr0.01").exists()
