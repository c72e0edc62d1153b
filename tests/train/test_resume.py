"""Interrupted runs resume to bitwise the weights of uninterrupted ones."""

import csv
import json
import sys

import pytest
import torch
import yaml
from factories import assert_same_weights, crash_at, kill_at_random_moments, tiny_config

from lmlp.errors import LmlpError
from lmlp.integrity import load_checked
from lmlp.train import train


def whole_and_interrupted(tmp_path, monkeypatch):
    """A 12-epoch run, and the same run interrupted in epoch 10 (checkpoints at 4 and 8)."""
    whole = train(tiny_config(tmp_path / "whole", epochs=12, checkpoint_every=4))
    cfg = tiny_config(tmp_path / "cut", epochs=12, checkpoint_every=4)
    undo = crash_at(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    undo()
    return whole, cfg


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    whole, cfg = whole_and_interrupted(tmp_path, monkeypatch)
    assert load_checked(tmp_path / "cut" / "checkpoint_last.pt", "checkpoint")["epoch"] == 8
    resumed = train(cfg, resume=True)
    assert_same_weights(whole.run_dir / "model.pt", resumed.run_dir / "model.pt")
    assert (whole.run_dir / "learning_curve.csv").read_text() == (resumed.run_dir / "learning_curve.csv").read_text()


def test_resume_without_checkpoint_is_explained(tmp_path):
    with pytest.raises(LmlpError, match="no checkpoint to resume from"):
        train(tiny_config(tmp_path / "empty"), resume=True)


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    whole, cfg = whole_and_interrupted(tmp_path, monkeypatch)
    last = tmp_path / "cut" / "checkpoint_last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    resumed = train(cfg, resume=True)
    log = (tmp_path / "cut" / "train.log").read_text()
    assert "checksum mismatch" in log and "falling back to" in log and "resumed" in log and "after epoch 4" in log
    assert_same_weights(whole.run_dir / "model.pt", resumed.run_dir / "model.pt")


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
    whole = train(tiny_config(tmp_path / "whole", epochs=40, checkpoint_every=3, threads=1))
    cfg_path, killed = tmp_path / "c.yaml", tmp_path / "killed"
    cfg = yaml.safe_load((whole.run_dir / "config.yaml").read_text())
    cfg["output"]["run_dir"] = str(killed)
    cfg_path.write_text(yaml.safe_dump(cfg))

    def command():
        resumable = (killed / "checkpoint_last.pt").is_file()
        return [sys.executable, "-m", "lmlp", "train", *(["--resume", str(killed)] if resumable else [str(cfg_path)])]

    kill_at_random_moments(command, killed, seed=7, after_kill=lambda: run_directory_is_complete(killed))
    assert not list(killed.glob(".*.tmp"))
    assert_same_weights(whole.run_dir / "model.pt", killed / "model.pt")
    assert (whole.run_dir / "learning_curve.csv").read_text() == (killed / "learning_curve.csv").read_text()
