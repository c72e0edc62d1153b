"""checkpoint_last.pt: one versioned record, one writer, one reader."""

import dataclasses

import pytest
import torch

from lmlp.errors import LmlpError
from lmlp.integrity import load_checked, save_checked
from lmlp.train.checkpoint import FORMAT, FORMAT_VERSION, Checkpoint


def example() -> Checkpoint:
    return Checkpoint(epoch=7, model={"w": torch.arange(6.0).reshape(2, 3)}, optimizer={"state": {}, "param_groups": []},
                      optimizer_name="core", selection={"weights": torch.ones(4)},
                      fingerprints=torch.arange(4, dtype=torch.int64), best_state={"w": torch.zeros(2, 3)},
                      best_loss=[0.5, 0.25], best_epoch=[3, 7], rows=[{"epoch": 1.0}], continue_from=None)


def fields(checkpoint: Checkpoint) -> dict:
    return {f.name: getattr(checkpoint, f.name) for f in dataclasses.fields(checkpoint)}


def assert_equal(a: Checkpoint, b: Checkpoint) -> None:
    for (name, x), y in zip(fields(a).items(), fields(b).values()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
        elif isinstance(x, dict) and x and isinstance(next(iter(x.values())), torch.Tensor):
            assert all(torch.equal(x[k], y[k]) for k in x), name
        else:
            assert x == y, name


def test_round_trip_is_versioned_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    example().save(path)
    later = dataclasses.replace(example(), epoch=8)
    later.save(path)
    assert load_checked(path, "checkpoint")["format"] == FORMAT
    assert load_checked(path, "checkpoint")["format_version"] == FORMAT_VERSION
    assert_equal(Checkpoint.load(path, print), later)
    assert Checkpoint.load(tmp_path / "checkpoint_last.prev.pt", print).epoch == 7


def test_an_unversioned_checkpoint_of_earlier_lmlp_still_loads(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    save_checked(fields(example()), path)
    assert_equal(Checkpoint.load(path, print), example())


def test_a_newer_format_is_refused_in_one_line(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    save_checked({"format": FORMAT, "format_version": FORMAT_VERSION + 1, **fields(example())}, path)
    with pytest.raises(LmlpError, match=rf"^{path}: checkpoint format {FORMAT_VERSION + 1} is newer than this lmlp "
                                        rf"reads \({FORMAT_VERSION}\); upgrade lmlp$"):
        Checkpoint.load(path, print)


def test_another_file_is_not_taken_for_a_checkpoint(tmp_path):
    model_file = tmp_path / "model.pt"
    save_checked({"format": "lmlp.model", "format_version": 2}, model_file)
    with pytest.raises(LmlpError, match=rf"^{model_file}: not an lmlp checkpoint \(format 'lmlp.model'\)$"):
        Checkpoint.load(model_file, print)
    partial = tmp_path / "partial.pt"
    save_checked({"epoch": 3}, partial)
    with pytest.raises(LmlpError, match=rf"^{partial}: not an lmlp checkpoint \(no model, optimizer, "):
        Checkpoint.load(partial, print)
