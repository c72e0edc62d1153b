"""End-to-end runs of ``lmlp.train.train``: errors fall, the run directory is complete, the test
split chooses nothing."""

import csv
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from factories import TINY, assert_same_weights, tiny_config

from lmlp.batch import chunks, compute_batch
from lmlp.data import read_structures, write_structures
from lmlp.errors import DataError
from lmlp.metrics import evaluate
from lmlp.modelfile import load_model
from lmlp.train import closest_pair_distance, format_table, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return tiny_config(run_dir), train(tiny_config(run_dir))


def curve(run_dir):
    with open(run_dir / "learning_curve.csv") as fh:
        return list(csv.DictReader(line for line in fh if not line.startswith("#")))


def test_short_run_lowers_both_errors_clearly(run):
    _, result = run
    rows = curve(result.run_dir)
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


def test_best_checkpoint_is_a_model_file_with_the_best_epochs(run):
    _, result = run
    _, metadata = load_model(result.run_dir / "checkpoint_best.pt")
    assert metadata["best_epoch"] == result.best_epoch.tolist()
    assert_same_weights(result.run_dir / "checkpoint_best.pt", result.run_dir / "model.pt")
    log = (result.run_dir / "train.log").read_text()
    assert "epoch    30/30" in log and "test ensemble" in log


def test_cli_train_prints_the_table(tmp_path):
    (tmp_path / "c.yaml").write_text(
        f"data: {{path: {TINY}}}\nensemble: {{members: 2}}\nmodel: {{hidden: [8]}}\n"
        f"training: {{epochs: 3}}\noutput: {{run_dir: {tmp_path / 'run'}, progress: false}}\n")
    result = subprocess.run([sys.executable, "-m", "lmlp", "train", str(tmp_path / "c.yaml")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "test ensemble" in result.stdout and "validation ensemble" in result.stdout
    assert "RMSE F / meV/Å" in result.stdout


def test_the_earlier_module_path_still_serves_the_python_api():
    import lmlp.train
    import lmlp.training

    for name in lmlp.training.__all__:
        assert getattr(lmlp.training, name) is getattr(lmlp.train, name)


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
    assert_same_weights(result.run_dir / "model.pt", corrupted.run_dir / "model.pt")
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


def test_per_epoch_training_metrics_on_a_fixed_sample(tmp_path):
    result = train(tiny_config(tmp_path / "sample", epochs=4, train_metrics_sample=20))
    text = (result.run_dir / "learning_curve.csv").read_text()
    assert "a fixed random sample of 20 of" in text.splitlines()[0]
    rows, full = curve(result.run_dir), train(tiny_config(tmp_path / "full", epochs=4))
    full_rows = curve(full.run_dir)
    assert rows[-1]["validation_rmse_e_ensemble"] == full_rows[-1]["validation_rmse_e_ensemble"]
    assert rows[-1]["train_rmse_e_ensemble"] != full_rows[-1]["train_rmse_e_ensemble"]
    assert result.train.ensemble == full.train.ensemble


def test_model_file_records_the_closest_training_pair(run):
    from lmlp.descriptors.neighbors import find_neighbors

    _, result = run
    _, metadata = load_model(result.run_dir / "model.pt")
    s, _ = read_structures(TINY)
    train_set = s.split_subset("train")
    positions = torch.from_numpy(train_set.positions)
    pairs = find_neighbors(positions, torch.from_numpy(train_set.offsets), 100.0).pairs
    expected = float((positions[pairs[1]] - positions[pairs[0]]).norm(dim=1).min())
    assert metadata["min_pair_distance"] == pytest.approx(expected, rel=1e-12)
    assert closest_pair_distance(train_set, 0.1) == 0.1


def test_validating_every_few_epochs_changes_only_which_epochs_are_candidates(tmp_path):
    every = train(tiny_config(tmp_path / "every", epochs=10, early_stopping=False))
    sparse = train(tiny_config(tmp_path / "sparse", epochs=10, early_stopping=False, validation_every=3))
    assert_same_weights(every.run_dir / "model.pt", sparse.run_dir / "model.pt")
    assert [int(r["epoch"]) for r in curve(sparse.run_dir)] == [1, 3, 6, 9, 10]
    stopped = train(tiny_config(tmp_path / "stopped", epochs=10, validation_every=3))
    assert set(stopped.best_epoch.tolist()) <= {1, 3, 6, 9, 10}


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
