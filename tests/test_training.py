import csv
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from factories import TINY, kill_at_random_moments

from lmlp.config import config_from_dict
from lmlp.data import read_structures, write_structures
from lmlp.errors import DataError
from lmlp.integrity import load_checked
from lmlp.modelfile import load_model
from lmlp.batch import chunks, compute_batch
from lmlp.metrics import evaluate
from lmlp.training import format_table, train


def tiny_config(run_dir, reactions=None, **training):
    return config_from_dict({
        "name": "tiny",
        "data": {"path": str(TINY), "reactions": reactions},
        "ensemble": {"members": 3},
        "model": {"hidden": [16, 16]},
        "selection": {"fit_fraction": 0.5},
        "training": {"epochs": 30, "checkpoint_every": 10, **training},
        "optimizer": {"name": "core", "lr": 0.01, "params": {"p_frozen": 0.1}},
        "output": {"run_dir": str(run_dir), "progress": False},
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return tiny_config(run_dir), train(tiny_config(run_dir))


def test_short_run_lowers_both_errors_clearly(run):
    _, result = run
    with open(result.run_dir / "learning_curve.csv") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    first, best = rows[0], result.validation.ensemble
    assert best["rmse_e"] < 0.3 * float(first["validation_rmse_e_ensemble"])
    assert best["rmse_f"] < 0.6 * float(first["validation_rmse_f_ensemble"])
    assert result.test.ensemble["rmse_e"] < 0.5 * float(first["validation_rmse_e_ensemble"])
    assert len(rows) == 30


def test_run_directory_holds_every_output(run):
    _, result = run
    names = {p.name for p in result.run_dir.iterdir()}
    assert {"config.yaml", "run.json", "train.log", "learning_curve.csv", "checkpoint_last.pt",
            "checkpoint_best.pt", "model.pt", "metrics.json", "learning_curves.png", "parity_test.png"} <= names
    for png in ("learning_curves.png", "parity_test.png"):
        assert (result.run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["data"]["sha256"] and info["torch"] == torch.__version__
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["units"] == {"energy": "meV/atom", "forces": "meV/Angstrom"}
    assert len(metrics["test"]["members"]["rmse_e"]) == 3
    assert metrics["validation_split"] == "validation" and len(metrics["validation"]["members"]["rmse_f"]) == 3


def test_model_file_keeps_the_best_epoch_per_member(run):
    cfg, result = run
    model, metadata = load_model(result.run_dir / "model.pt")
    s, _ = read_structures(TINY)
    batch = compute_batch(s.split_subset("test"), model.descriptor, torch.float32)
    m = evaluate(model, chunks(batch), cfg.training.energy_weight, cfg.training.force_weight)
    assert m.rmse_e.tolist() == pytest.approx(metadata["test_rmse_e"], rel=1e-5)
    batch = compute_batch(s.split_subset("validation"), model.descriptor, torch.float32)
    m = evaluate(model, chunks(batch), cfg.training.energy_weight, cfg.training.force_weight)
    assert m.rmse_f.tolist() == pytest.approx(metadata["validation_rmse_f"], rel=1e-5)
    assert metadata["best_epoch"] == result.best_epoch.tolist()


def test_cli_train_prints_the_table(tmp_path):
    (tmp_path / "c.yaml").write_text(
        f"data: {{path: {TINY}}}\nensemble: {{members: 2}}\nmodel: {{hidden: [8]}}\n"
        f"training: {{epochs: 3}}\noutput: {{run_dir: {tmp_path / 'run'}, progress: false}}\n")
    result = subprocess.run([sys.executable, "-m", "lmlp", "train", str(tmp_path / "c.yaml")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "test ensemble" in result.stdout and "validation ensemble" in result.stdout
    assert "RMSE F / meV/Å" in result.stdout


def weights(run_dir):
    return load_model(run_dir / "model.pt")[0].state_dict()


def test_training_never_reads_the_test_labels(run, tmp_path):
    """Corrupted test labels give bitwise the same weights and validation errors: the test split
    chooses nothing (neither epochs nor anything else)."""
    _, result = run
    s, _ = read_structures(TINY)
    test_atoms = np.isin(s.structure_index, s.split["test"])
    s.energy[s.split["test"]] += 5.0
    s.forces[test_atoms] *= -3.0
    write_structures(tmp_path / "corrupted.h5", s)
    cfg = tiny_config(tmp_path / "run")
    corrupted = train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(tmp_path / "corrupted.h5"))))
    for (name, x), y in zip(weights(result.run_dir).items(), weights(corrupted.run_dir).values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(corrupted.best_epoch, result.best_epoch)
    np.testing.assert_array_equal(corrupted.validation.rmse_e, result.validation.rmse_e)
    assert corrupted.test.ensemble["rmse_e"] > 10 * result.test.ensemble["rmse_e"]


def test_two_way_split_still_trains_with_a_warning(tmp_path):
    s, _ = read_structures(TINY)
    s.split = {"train": np.union1d(s.split["train"], s.split["validation"]), "test": s.split["test"]}
    write_structures(tmp_path / "old.h5", s)
    cfg = tiny_config(tmp_path / "run", epochs=3)
    result = train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(tmp_path / "old.h5"))))
    assert "no validation split, so early stopping uses the test split" in (result.run_dir / "train.log").read_text()
    assert result.validation_split == "test"
    np.testing.assert_array_equal(result.validation.rmse_e, result.test.rmse_e)
    header = (result.run_dir / "learning_curve.csv").read_text().splitlines()[1]
    assert "validation_rmse_e_ensemble" in header


def test_extra_test_sets_are_reported(tmp_path):
    s, _ = read_structures(TINY)
    extra = s.subset(np.flatnonzero(s.label == "F+CH3Cl"))
    write_structures(tmp_path / "independent.h5", extra)
    cfg = tiny_config(tmp_path / "run", epochs=3)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, extra_test=[str(tmp_path / "independent.h5")]))
    result = train(cfg)
    m = result.extra_test[str(tmp_path / "independent.h5")]
    model, _ = load_model(result.run_dir / "model.pt")
    expected = evaluate(model, chunks(compute_batch(extra, model.descriptor, torch.float32)), 10.9, 1.0)
    assert m.ensemble["rmse_f"] == pytest.approx(expected.ensemble["rmse_f"], rel=1e-6)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["extra_test"][str(tmp_path / "independent.h5")]["ensemble"]["rmse_e"] == pytest.approx(m.ensemble["rmse_e"])
    assert "independent ensemble" in format_table(result)
    missing = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, extra_test=[str(tmp_path / "absent.h5")]))
    with pytest.raises(DataError, match="absent.h5: no such file"):
        train(missing)


def whole_and_interrupted(tmp_path, monkeypatch):
    """A 12-epoch run, and the same run interrupted in epoch 10 (checkpoints at 4 and 8)."""
    import lmlp.training as training

    whole = train(tiny_config(tmp_path / "whole", epochs=12, checkpoint_every=4))
    original = training._curve_row

    def crash_after_epoch_9(epoch, *args):
        if epoch == 10:
            raise KeyboardInterrupt
        return original(epoch, *args)

    cfg = tiny_config(tmp_path / "cut", epochs=12, checkpoint_every=4)
    monkeypatch.setattr(training, "_curve_row", crash_after_epoch_9)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(training, "_curve_row", original)
    return whole, cfg


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    whole, cfg = whole_and_interrupted(tmp_path, monkeypatch)
    assert load_checked(tmp_path / "cut" / "checkpoint_last.pt", "checkpoint")["epoch"] == 8
    resumed = train(cfg, resume=True)
    a, _ = load_model(whole.run_dir / "model.pt")
    b, _ = load_model(resumed.run_dir / "model.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert (whole.run_dir / "learning_curve.csv").read_text() == (resumed.run_dir / "learning_curve.csv").read_text()


def test_resume_without_checkpoint_is_explained(tmp_path):
    from lmlp.errors import LmlpError

    with pytest.raises(LmlpError, match="no checkpoint to resume from"):
        train(tiny_config(tmp_path / "empty"), resume=True)


def test_evaluate_command_reproduces_training_metrics_per_reaction(run, tmp_path):
    _, result = run
    out = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, "-m", "lmlp", "evaluate", str(result.run_dir / "model.pt"), str(TINY),
                           "--split", "test", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = json.loads(out.read_text())
    assert table["units"] == {"energy": "meV/atom", "forces": "meV/Angstrom"}
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert table["subsets"]["all"]["ensemble"]["rmse_e"] == pytest.approx(metrics["test"]["ensemble"]["rmse_e"], rel=1e-6)
    s, _ = read_structures(TINY)
    assert set(table["subsets"]) == {"all"} | set(s.split_subset("test").label.tolist())
    assert "F+CH3Cl" in done.stdout


def test_best_checkpoint_is_a_model_file_with_the_best_epochs(run):
    _, result = run
    best, metadata = load_model(result.run_dir / "checkpoint_best.pt")
    final, _ = load_model(result.run_dir / "model.pt")
    assert metadata["best_epoch"] == result.best_epoch.tolist()
    for (name, x), (_, y) in zip(best.state_dict().items(), final.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    log = (result.run_dir / "train.log").read_text()
    assert "epoch    30/30" in log and "test ensemble" in log


F_CL = ["F+CH3F", "F+CH3Cl", "Cl+CH3F", "Cl+CH3Cl"]


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    first = train(tiny_config(root / "fcl", reactions=F_CL, epochs=40))
    second = train(tiny_config(root / "all", epochs=40), continue_from=first.run_dir / "model.pt")
    return first, second


def test_continual_learning_adds_reactions_without_forgetting_the_old_ones(continued):
    first, second = continued
    report = second.continual
    test_set = read_structures(TINY)[0].split_subset("test")
    assert set(report) == set(test_set.label.tolist()) | {"known elements, all"}
    old = test_set.subset(np.flatnonzero(np.isin(test_set.label, F_CL)))
    before = evaluate_on(first.run_dir / "model.pt", old)
    after = evaluate_on(second.run_dir / "model.pt", old)
    for label, r in report.items():
        if label in F_CL:
            assert r["before"] == pytest.approx(before[label].ensemble, rel=1e-5)
            assert r["after"] == pytest.approx(after[label].ensemble, rel=1e-5)
        elif "Br" in label or "I" in label:
            assert r["before"] is None and r["after"]["rmse_f"] > 0
    assert report["known elements, all"] == {"before": pytest.approx(before["all"].ensemble, rel=1e-5),
                                             "after": pytest.approx(after["all"].ensemble, rel=1e-5)}
    assert after["all"].ensemble["rmse_f"] < 1.2 * before["all"].ensemble["rmse_f"]
    assert after["all"].ensemble["rmse_e"] < 2.0 * before["all"].ensemble["rmse_e"]
    model, _ = load_model(second.run_dir / "model.pt")
    assert model.elements.tolist() == [1, 6, 9, 17, 35, 53]
    assert "continual" in json.loads((second.run_dir / "metrics.json").read_text())
    log = (second.run_dir / "train.log").read_text()
    assert "known and" in log and "before → after" in log


def evaluate_on(model_path, structures):
    from lmlp.metrics import evaluate_model

    model, _ = load_model(model_path)
    return evaluate_model(model, structures)


def test_continued_run_resumes_exactly(continued, tmp_path):
    first, second = continued
    cfg = tiny_config(tmp_path / "again", epochs=40, checkpoint_every=10)
    import lmlp.training as training

    original = training._curve_row

    def crash(epoch, *args):
        if epoch == 25:
            raise KeyboardInterrupt
        return original(epoch, *args)

    training._curve_row = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, continue_from=first.run_dir / "model.pt")
    finally:
        training._curve_row = original
    resumed = train(cfg, resume=True)
    a, _ = load_model(second.run_dir / "model.pt")
    b, _ = load_model(resumed.run_dir / "model.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_continuing_with_another_architecture_is_refused(continued, tmp_path):
    from lmlp.errors import LmlpError

    first, _ = continued
    cfg = config_from_dict({"data": {"path": str(TINY)}, "ensemble": {"members": 3}, "model": {"hidden": [8]},
                            "output": {"run_dir": str(tmp_path / "x"), "progress": False}})
    with pytest.raises(LmlpError, match=r"hidden = \[16, 16\], the config asks for \[8\]"):
        train(cfg, continue_from=first.run_dir / "model.pt")


def test_per_epoch_training_metrics_on_a_fixed_sample(tmp_path):
    import csv as csv_module

    result = train(tiny_config(tmp_path / "sample", epochs=4, train_metrics_sample=20))
    text = (result.run_dir / "learning_curve.csv").read_text()
    assert "a fixed random sample of 20 of" in text.splitlines()[0]
    rows = list(csv_module.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    full = train(tiny_config(tmp_path / "full", epochs=4))
    full_rows = list(csv_module.DictReader(
        line for line in (full.run_dir / "learning_curve.csv").read_text().splitlines() if not line.startswith("#")))
    assert rows[-1]["validation_rmse_e_ensemble"] == full_rows[-1]["validation_rmse_e_ensemble"]
    assert rows[-1]["train_rmse_e_ensemble"] != full_rows[-1]["train_rmse_e_ensemble"]
    assert result.train.ensemble == full.train.ensemble


def test_model_file_records_the_closest_training_pair(run):
    from lmlp.descriptors.neighbors import find_neighbors
    from lmlp.training import closest_pair_distance

    _, result = run
    _, metadata = load_model(result.run_dir / "model.pt")
    s, _ = read_structures(TINY)
    train_set = s.split_subset("train")
    positions = torch.from_numpy(train_set.positions)
    pairs = find_neighbors(positions, torch.from_numpy(train_set.offsets), 100.0).pairs
    expected = float((positions[pairs[1]] - positions[pairs[0]]).norm(dim=1).min())
    assert metadata["min_pair_distance"] == pytest.approx(expected, rel=1e-12)
    assert closest_pair_distance(train_set, 0.1) == 0.1


def run_directory_is_complete(run_dir):
    """Every file of a run directory parses; only hidden temporary files may be partial."""
    for path in run_dir.rglob("*"):
        if path.is_dir() or (path.name.startswith(".") and path.name.endswith(".tmp")):
            continue
        if path.suffix == ".pt":
            load_checked(path, "file")
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            rows = list(csv.DictReader(line for line in path.read_text().splitlines() if not line.startswith("#")))
            assert all(None not in row.values() for row in rows), path
        elif path.suffix == ".png":
            assert path.read_bytes()[-8:] == b"IEND\xaeB`\x82", path  # the closing IEND chunk


@pytest.fixture
def one_thread():
    """Torch on one thread in this process (restored after), as in the subprocesses of a test that
    sets ``training.threads: 1``: the weights do not depend on the thread count, the metrics' last
    digits may."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path, one_thread):
    import yaml

    whole = train(tiny_config(tmp_path / "whole", epochs=40, checkpoint_every=3, threads=1))
    cfg_path, killed = tmp_path / "c.yaml", tmp_path / "killed"
    cfg = yaml.safe_load((whole.run_dir / "config.yaml").read_text())
    cfg["output"]["run_dir"] = str(killed)
    cfg_path.write_text(yaml.safe_dump(cfg))

    def command():
        resumable = (killed / "checkpoint_last.pt").is_file()
        return [sys.executable, "-m", "lmlp", "train", *(["--resume", str(killed)] if resumable else [str(cfg_path)])]

    kill_at_random_moments(command, killed, seed=7, after_kill=lambda: run_directory_is_complete(killed))
    assert not list((tmp_path / "killed").glob(".*.tmp"))
    a, _ = load_model(whole.run_dir / "model.pt")
    b, _ = load_model(tmp_path / "killed" / "model.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert (whole.run_dir / "learning_curve.csv").read_text() == (tmp_path / "killed" / "learning_curve.csv").read_text()


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    whole, cfg = whole_and_interrupted(tmp_path, monkeypatch)
    last = tmp_path / "cut" / "checkpoint_last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    resumed = train(cfg, resume=True)
    log = (tmp_path / "cut" / "train.log").read_text()
    assert "checksum mismatch" in log and "falling back to" in log and "resumed" in log and "after epoch 4" in log
    a, _ = load_model(whole.run_dir / "model.pt")
    b, _ = load_model(resumed.run_dir / "model.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def nan_once(monkeypatch, at_call):
    """Make ``member_losses`` return a NaN loss on its ``at_call``-th call (a transient fault)."""
    import lmlp.training as training

    original, calls = training.member_losses, [0]

    def flaky(*args):
        calls[0] += 1
        loss, per_structure = original(*args)
        return (loss * float("nan"), per_structure) if calls[0] == at_call else (loss, per_structure)

    monkeypatch.setattr(training, "member_losses", flaky)


def test_a_non_finite_loss_is_undone_and_retried_with_lower_step_sizes(tmp_path, monkeypatch):
    from lmlp.optim.registry import S0

    nan_once(monkeypatch, at_call=5)
    result = train(tiny_config(tmp_path / "run", epochs=10, checkpoint_every=10))
    log = (result.run_dir / "train.log").read_text()
    assert "epoch 5: non-finite loss, gradient or test error in member(s) 0, 1, 2: epoch undone, retried with " \
           "step sizes × 0.5 (retry 1 of 5)" in log
    saved = load_checked(result.run_dir / "checkpoint_last.pt", "checkpoint")
    groups = saved["optimizer"]["param_groups"]
    assert all(g["lr"] == pytest.approx(0.5 * S0) for g in groups)  # CoRe's initial step size
    assert all(g["step_sizes"][1] == pytest.approx(0.5 * 0.01) for g in groups)  # its maximum, the config's lr
    assert len(saved["rows"]) == 10 and result.test.ensemble["rmse_e"] < np.inf
    model, _ = load_model(result.run_dir / "model.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_divergence_stops_with_one_line_when_configured(tmp_path, monkeypatch):
    from lmlp.errors import LmlpError

    nan_once(monkeypatch, at_call=3)
    with pytest.raises(LmlpError, match=r"^epoch 3: non-finite [^\n]*training diverged[^\n]*$"):
        train(tiny_config(tmp_path / "run", epochs=10, on_divergence="stop"))
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_hopeless_divergence_ends_with_an_error_and_no_nan_files(tmp_path):
    from lmlp.errors import LmlpError

    cfg = tiny_config(tmp_path / "run", epochs=30, checkpoint_every=1)
    cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.params = "sgd", 100.0, {}
    with pytest.raises(LmlpError, match=r"after 5 step-size reductions: training diverged"):
        train(cfg)
    saved = load_checked(tmp_path / "run" / "checkpoint_last.pt", "checkpoint")
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_validating_every_few_epochs_changes_only_which_epochs_are_candidates(tmp_path):
    every = train(tiny_config(tmp_path / "every", epochs=10, early_stopping=False))
    sparse = train(tiny_config(tmp_path / "sparse", epochs=10, early_stopping=False, validation_every=3))
    for (name, x), y in zip(weights(every.run_dir).items(), weights(sparse.run_dir).values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    with open(sparse.run_dir / "learning_curve.csv") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    assert [int(r["epoch"]) for r in rows] == [1, 3, 6, 9, 10]
    stopped = train(tiny_config(tmp_path / "stopped", epochs=10, validation_every=3))
    assert set(stopped.best_epoch.tolist()) <= {1, 3, 6, 9, 10}


def test_evaluate_reports_the_uncertainty_calibration(run, tmp_path):
    _, result = run
    out = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, "-m", "lmlp", "evaluate", str(result.run_dir / "model.pt"), str(TINY),
                           "--uncertainty", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Spearman" in done.stdout
    calibration = json.loads(out.read_text())["uncertainty"]
    _, metadata = load_model(result.run_dir / "model.pt")
    assert calibration["forces"]["reference_rmse"] == pytest.approx(metadata["test_ensemble"]["rmse_f"])
    assert -1 <= calibration["energy"]["spearman"] <= 1 and calibration["n_structures"] == 200
