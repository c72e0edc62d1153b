"""Checksummed files (lmlp.integrity): corruption and truncation are named in one line; fallback."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from factories import TINY

from lmlp.config import DescriptorConfig
from lmlp.data import read_structures
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.errors import LmlpError
from lmlp.integrity import load_checked, load_with_fallback, previous_path, save_checked
from lmlp.model import HDNNPEnsemble, fit_reference_energies
from lmlp.modelfile import load_model, save_model


def content(seed: int = 0) -> dict:
    """A checkpoint-like dictionary: tensors of several dtypes, nested containers, scalars."""
    g = torch.Generator().manual_seed(seed)
    return {"epoch": seed, "model": {"w": torch.randn(40, generator=g, dtype=torch.float64),
                                     "b": torch.randn(3, 4, generator=g)},
            "steps": torch.arange(7), "mask": torch.tensor([True, False]), "rows": [{"loss": 0.5}],
            "name": "core", "best": [1.0, float("inf")], "none": None}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key])
        elif isinstance(a[key], dict):
            assert_same(a[key], b[key])
        else:
            assert a[key] == b[key]


def flipped(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0x10
    return bytes(damaged)


def one_line_error(path, what="checkpoint") -> str:
    """The LmlpError message of ``load_checked(path)``, checked to be one line naming ``path``."""
    with pytest.raises(LmlpError) as info:
        load_checked(path, what)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


def test_round_trip_and_on_disk_format(tmp_path):
    save_checked(content(), tmp_path / "a.pt")
    assert_same(load_checked(tmp_path / "a.pt", "checkpoint"), content())
    wrapper = torch.load(tmp_path / "a.pt", weights_only=True)
    assert wrapper.keys() == {"format", "version", "sha256", "payload"}
    assert wrapper["format"] == "lmlp.checked" and wrapper["version"] == 1
    assert wrapper["payload"].dtype == torch.uint8
    assert wrapper["sha256"] == hashlib.sha256(wrapper["payload"].numpy()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary or .prev file


def test_any_flipped_byte_in_the_payload_is_a_checksum_mismatch(tmp_path):
    save_checked(content(), tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    payload = torch.load(tmp_path / "a.pt", weights_only=True)["payload"].numpy().tobytes()
    start = data.find(payload)
    assert start > 0
    for offset in [*range(start, start + len(payload), 7), start + len(payload) - 1]:
        (tmp_path / "b.pt").write_bytes(flipped(data, offset))
        assert "checkpoint corrupted: checksum mismatch" in one_line_error(tmp_path / "b.pt"), offset


def test_a_flipped_byte_anywhere_is_reported_or_harmless(tmp_path):
    """Outside the payload a flip hits zip headers (ignored by torch) or the wrapper (detected)."""
    save_checked(content(), tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    for offset in range(0, len(data), 11):
        (tmp_path / "b.pt").write_bytes(flipped(data, offset))
        try:
            loaded = load_checked(tmp_path / "b.pt", "checkpoint")
        except LmlpError as exc:
            assert "\n" not in str(exc)
        else:
            assert_same(loaded, content())


def test_truncation_is_reported(tmp_path):
    save_checked(content(), tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    assert "is empty (truncated?)" in one_line_error_after_writing(tmp_path / "cut.pt", b"")
    for length in (2, 100, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
        message = one_line_error_after_writing(tmp_path / "cut.pt", data[:length])
        assert "truncated" in message or "not an lmlp" in message, (length, message)


def one_line_error_after_writing(path, data: bytes) -> str:
    path.write_bytes(data)
    return one_line_error(path)


def test_files_without_checksum_still_load_and_their_zip_crcs_are_checked(tmp_path):
    torch.save(content(), tmp_path / "old.pt")
    assert_same(load_checked(tmp_path / "old.pt", "checkpoint"), content())
    data = (tmp_path / "old.pt").read_bytes()
    weights = content()["model"]["w"].numpy().tobytes()
    (tmp_path / "bad.pt").write_bytes(flipped(data, data.find(weights) + 11))
    assert "checkpoint corrupted: checksum mismatch" in one_line_error(tmp_path / "bad.pt")


@pytest.mark.parametrize(("written", "problem"), [
    (None, "no such checkpoint"),
    (b"epochs: 3\n", "not an lmlp checkpoint"),
    ([1, 2, 3], "not an lmlp checkpoint"),
    ({"format": "lmlp.checked", "version": 7, "sha256": "0", "payload": torch.zeros(1, dtype=torch.uint8)},
     "written by a newer lmlp"),
    ({"format": "lmlp.checked", "version": 1, "sha256": "0", "payload": b"\x00"}, "damaged checksum header"),
])
def test_missing_foreign_and_unknown_files_are_named(tmp_path, written, problem):
    path = tmp_path / "a.pt"
    if isinstance(written, bytes):
        path.write_bytes(written)
    elif written is not None:
        torch.save(written, path)
    assert problem in one_line_error(path)


def test_keep_previous_rotates_only_intact_files(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    assert previous_path(path) == tmp_path / "checkpoint_last.prev.pt"
    save_checked(content(1), path, keep_previous=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt"]
    for seed in (2, 3):
        save_checked(content(seed), path, keep_previous=True)
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint_last.pt", "checkpoint_last.prev.pt"}
    assert load_checked(path, "checkpoint")["epoch"] == 3
    assert load_checked(previous_path(path), "checkpoint")["epoch"] == 2
    path.write_bytes(path.read_bytes()[:200])  # a damaged current file does not replace the good .prev
    save_checked(content(4), path, keep_previous=True)
    assert load_checked(path, "checkpoint")["epoch"] == 4
    assert load_checked(previous_path(path), "checkpoint")["epoch"] == 2
    save_checked(content(5), path)  # without keep_previous the .prev file is left alone
    assert load_checked(previous_path(path), "checkpoint")["epoch"] == 2


def test_fallback_to_the_previous_file_warns(tmp_path):
    path, warnings = tmp_path / "checkpoint_last.pt", []
    save_checked(content(1), path)
    save_checked(content(2), path, keep_previous=True)
    loaded, source = load_with_fallback(path, "checkpoint", warnings.append)
    assert loaded["epoch"] == 2 and source == path and warnings == []
    data = path.read_bytes()
    path.write_bytes(flipped(data, data.find(torch.load(path, weights_only=True)["payload"].numpy().tobytes()) + 40))
    loaded, source = load_with_fallback(path, "checkpoint", warnings.append)
    assert loaded["epoch"] == 1 and source == previous_path(path)
    assert warnings == [f"{path}: checkpoint corrupted: checksum mismatch (its content does not match the stored "
                        f"SHA-256); falling back to {previous_path(path)}"]
    path.unlink()
    assert load_with_fallback(path, "checkpoint", warnings.append)[0]["epoch"] == 1
    assert warnings[-1] == f"{path}: no such checkpoint; falling back to {previous_path(path)}"


def test_fallback_with_both_files_bad_names_both(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    save_checked(content(1), path)
    save_checked(content(2), path, keep_previous=True)
    path.write_bytes(path.read_bytes()[:100])
    previous_path(path).write_bytes(previous_path(path).read_bytes()[:-1])
    with pytest.raises(LmlpError) as info:
        load_with_fallback(path, "checkpoint", pytest.fail)
    message = str(info.value)
    assert "\n" not in message and message.count("truncated") == 2
    assert message.startswith(f"{path}: ") and f"; the previous version {previous_path(path)}: " in message
    previous_path(path).unlink()
    with pytest.raises(LmlpError, match=r"^[^\n]*checkpoint_last\.pt: not a readable checkpoint[^\n]*$"):
        load_with_fallback(path, "checkpoint", pytest.fail)


@pytest.fixture(scope="module")
def model() -> HDNNPEnsemble:
    s, _ = read_structures(TINY)
    s = s.subset(np.arange(6))
    sf = SymmetryFunctions.from_config(DescriptorConfig())
    G = sf(*map(torch.from_numpy, (s.numbers, s.positions, s.offsets)))
    elements = sorted(set(s.numbers.tolist()))
    e_ref = torch.from_numpy(fit_reference_energies(s.numbers, s.offsets, s.energy, elements))
    return HDNNPEnsemble(sf, Standardizer.fit(G), elements, e_ref, hidden=[8], members=2)


@pytest.fixture
def corrupted_model_file(model, tmp_path):
    save_model(tmp_path / "model.pt", model)
    data = (tmp_path / "model.pt").read_bytes()
    weights = model.networks[0].weights[0].detach().numpy().tobytes()
    (tmp_path / "model.pt").write_bytes(flipped(data, data.find(weights) + 9))
    return tmp_path / "model.pt"


def test_model_files_are_checksummed_and_version_1_files_still_load(model, tmp_path, corrupted_model_file):
    with pytest.raises(LmlpError, match=r"^[^\n]*model\.pt: model file corrupted: checksum mismatch[^\n]*$"):
        load_model(corrupted_model_file)
    save_model(tmp_path / "new.pt", model, {"note": 1})
    old = load_checked(tmp_path / "new.pt", "model file")
    assert old["format_version"] == 2
    torch.save({**old, "format_version": 1}, tmp_path / "old.pt")  # as lmlp wrote model files before
    loaded, metadata = load_model(tmp_path / "old.pt")
    assert metadata == {"note": 1}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_evaluate_command_on_a_corrupted_model_gives_one_line(corrupted_model_file):
    done = subprocess.run([sys.executable, "-m", "lmlp", "evaluate", str(corrupted_model_file), str(TINY)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "model.pt: model file corrupted: checksum mismatch" in done.stderr
