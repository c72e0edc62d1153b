"""Damaged input files: every reader gives a one-line LmlpError naming the file, or right data.

Malformed extxyz goes through the reader of ``lmlp data convert``; damaged lmlp HDF5 files (bytes
changed, truncated, or edited with h5py, with or without a recomputed content hash) through the
reader of training and ``lmlp data info``. Never another exception, never a hang, never wrong
numbers read silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from factories import assert_sets_equal, random_molecules
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlp.data import (
    StructureSet,
    Summary,
    load,
    read_structures,
    summarize,
    write_extxyz,
    write_structures,
)
from lmlp.data.hdf5 import _content_hash
from lmlp.data.validate import check_arrays, find_problems
from lmlp.errors import LmlpError

SECONDS_PER_EXAMPLE = 10
"""A reader that takes longer on these few-kB files is taken to hang."""

pytestmark = pytest.mark.filterwarnings(  # values such as 1e308 Å overflow in numpy and ASE arithmetic
    "ignore:.* encountered in:RuntimeWarning"
)


def small_set(periodic: bool) -> StructureSet:
    """Three molecules of 2 and 3 atoms, or the same in a periodic cell."""
    s = random_molecules(3, seed=1, sizes=(2, 3))
    if periodic:
        s.cell = np.tile(np.diag([12.0, 13.0, 14.5]), (len(s), 1, 1))
        s.pbc = np.tile([True, True, False], (len(s), 1))
    return s


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@functools.cache
def original(kind: str) -> tuple[StructureSet, bytes, bytes, Summary]:
    """The set of ``kind`` ("molecules" or "periodic"), its extxyz and HDF5 bytes and its summary."""
    s = small_set(kind == "periodic")
    with tempfile.TemporaryDirectory() as tmp:
        extxyz, h5 = Path(tmp) / "valid.extxyz", Path(tmp) / "valid.h5"
        write_extxyz(extxyz, s)
        write_structures(h5, s)
        return s, extxyz.read_bytes(), h5.read_bytes(), summarize(h5)


@contextlib.contextmanager
def bounded(seconds: int = SECONDS_PER_EXAMPLE) -> Iterator[None]:
    """Raise ``TimeoutError`` in the block after ``seconds``: a reader stuck in a loop fails."""
    def expire(signum, frame):
        raise TimeoutError(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line(exc: LmlpError, path: Path) -> None:
    message = str(exc)
    assert message.startswith(f"{path}: ") and "\n" not in message and "\r" not in message, message


def assert_valid(s: StructureSet) -> None:
    check_arrays(s, "read")
    assert find_problems(s) == []


def numbers_of(summary: Summary) -> dict:
    """The summary without its path and provenance attributes."""
    return {k: v for k, v in dataclasses.asdict(summary).items() if k not in ("path", "attrs")}


# --- extxyz ------------------------------------------------------------------------------------

_INDEX = st.integers(0, 2**16)
_NUMBER = st.sampled_from([
    b"", b"nan", b"inf", b"-inf", b"1e999", b"1e308", b"-1e308", b"1e-320", b"9" * 400, b"-1", b"0",
    b"0.5", b"T", b"x", b"1_0", b"0x10", b'"', b"=", b"[1,2]", b'"1 2 3"', b"_JSON [1]", b"\xff\xfe",
    b"\x00", b"\xe2\x80\xa8", b"\x0c", b"\r",
]) | st.floats().map(lambda x: repr(x).encode()) | st.text(st.characters(codec="utf-8"), max_size=5).map(
    str.encode
)
_COUNT = st.sampled_from([
    b"-1", b"0", b"1", b"4", b"10", b"100000000000000000000", b"1e3", b"x", b"", b"VEC1",
])
_KEY = st.sampled_from(["energy", "charge", "label", "split", "Properties", "Lattice", "pbc", "stress"])
_VALUE = _NUMBER | st.sampled_from([
    b"energy", b'"F F F"', b'"T T T"', b'"T"', b"species:S:1:pos:R:3",
    b"species:S:1:pos:R:3:forces:S:3", b"species:S:1:pos:R:3:forces:R:2",
    b"species:S:1:pos:R:3:forces:L:3", b"pos:R:3:forces:R:3",
    b"species:S:1:pos:R:3:energy:R:1:forces:R:3", b"species:S:1:pos:R:3:forces:R:3:charge:I:1",
    b'"0 0 0 0 0 0 0 0 0"', b'"inf 0 0 0 1 0 0 0 1"', b'"' + b" ".join([b"1e308"] * 9) + b'"',
    b'"1e-300 0 0 0 1 0 0 0 1"', b'"1 0 0 2 0 0 0 0 1"', b'"12 0 0 0 13 0 0 0 0"',
    b'"0.2 0 0 0 13 0 0 0 14"', b"a/b", b".", b"1", b"train test", b"100000", b"-100000", b"1.5",
    b'"1 2"',
])
_TEXT_MUTATION = st.one_of(
    st.tuples(st.just("truncate"), _INDEX),
    st.tuples(st.just("delete line"), _INDEX),
    st.tuples(st.just("duplicate line"), _INDEX),
    st.tuples(st.just("swap lines"), _INDEX, _INDEX),
    st.tuples(st.just("insert bytes"), _INDEX, st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("atom count"), _INDEX, _COUNT),
    st.tuples(st.just("info value"), _INDEX, _KEY, _VALUE),
    st.tuples(st.just("token"), _INDEX, _INDEX, _NUMBER),
)


def mutate_text(data: bytes, mutation: tuple) -> bytes:
    """``data`` with one mutation applied; indices wrap around the bytes, lines or tokens.

    "atom count" replaces a line that holds only a number, "info value" sets a key on a line
    with ``Properties=`` (appending it if absent), "token" replaces a space-separated token.
    """
    kind, index, *args = mutation
    if kind == "truncate":
        return data[: index % (len(data) + 1)]
    if kind == "insert bytes":
        at = index % (len(data) + 1)
        return data[:at] + args[0] + data[at:]
    lines = data.split(b"\n")
    i = index % len(lines)
    if kind == "delete line":
        del lines[i]
    elif kind == "duplicate line":
        lines.insert(i, lines[i])
    elif kind == "swap lines":
        j = args[0] % len(lines)
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "atom count":
        counts = [k for k, line in enumerate(lines) if line.strip().isdigit()] or [i]
        lines[counts[index % len(counts)]] = args[0]
    elif kind == "info value":
        comments = [k for k, line in enumerate(lines) if b"Properties=" in line] or [i]
        k = comments[index % len(comments)]
        line, new = lines[k], args[0].encode() + b"=" + args[1]
        found = re.search(rb"(?<!\S)" + args[0].encode() + rb'=("[^"]*"|\S*)', line)
        lines[k] = line[: found.start()] + new + line[found.end() :] if found else line + b" " + new
    else:
        tokens = lines[i].split(b" ")
        tokens[args[0] % len(tokens)] = args[1]
        lines[i] = b" ".join(tokens)
    return b"\n".join(lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["molecules", "periodic"]),
       mutations=st.lists(_TEXT_MUTATION, min_size=1, max_size=3))
def test_malformed_extxyz_gives_one_line_error_or_valid_data(workdir, kind, mutations):
    data = original(kind)[1]
    for mutation in mutations:
        data = mutate_text(data, mutation)
    path = workdir / "mutated.extxyz"
    path.write_bytes(data)
    try:
        with bounded():
            s, _ = load(path)
    except LmlpError as exc:
        assert_one_line(exc, path)
        return
    assert_valid(s)
    write_structures(workdir / "converted.h5", s)  # what was read survives the HDF5 layout exactly
    assert_sets_equal(s, read_structures(workdir / "converted.h5")[0])


# --- HDF5: damaged bytes -----------------------------------------------------------------------

_BYTE_DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 2**20)),
    st.tuples(st.just("xor"), st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)),
                                       min_size=1, max_size=8)),
)


def damage_bytes(data: bytes, damage: tuple) -> bytes:
    """``data`` truncated, or with bytes xor-ed at offsets that wrap around its length."""
    kind, arg = damage
    if kind == "truncate":
        return data[: arg % len(data)]
    out = bytearray(data)
    for offset, mask in arg:
        out[offset % len(out)] ^= mask
    return bytes(out)


def read_both(path: Path) -> tuple[StructureSet | LmlpError, Summary | LmlpError]:
    """What ``read_structures`` and ``summarize`` make of ``path``: results or one-line errors."""
    results = []
    for reader in (lambda p: read_structures(p)[0], summarize):
        try:
            with bounded():
                results.append(reader(path))
        except LmlpError as exc:
            assert_one_line(exc, path)
            results.append(exc)
    return results[0], results[1]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["molecules", "periodic"]), damage=_BYTE_DAMAGE)
def test_damaged_hdf5_bytes_give_one_line_error_or_the_original_data(workdir, kind, damage):
    s, _, data, summary = original(kind)
    path = workdir / "damaged.h5"
    path.write_bytes(damage_bytes(data, damage))
    read, summarized = read_both(path)
    if not isinstance(read, LmlpError):
        assert_sets_equal(s, read)
    if not isinstance(summarized, LmlpError):
        assert numbers_of(summarized) == numbers_of(summary)


# --- HDF5: edits with h5py ---------------------------------------------------------------------

_ATTRIBUTE_VALUES = st.sampled_from([
    np.int64(7), np.int64(0), np.int64(-1), 1.5, np.nan, True, "", "x", "kcal/mol", "lmlp.structures",
    b"eV", np.arange(3), np.zeros((2, 2)), np.array(["a", "b"], dtype=h5py.string_dtype()),
]) | st.integers(-(2**40), 2**40) | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)

_REPLACEMENTS = st.sampled_from([
    "extra axis", "one row more", "one row less", "empty", "scalar", "float32", "int8", "uint64",
    "bool", "complex", "strings", "-1", "2**40", "nan", "inf", "1e308",
])

_EDIT = st.one_of(
    st.tuples(st.just("delete dataset"), _INDEX),
    st.tuples(st.just("delete attribute"), _INDEX),
    st.tuples(st.just("set attribute"), _INDEX, _ATTRIBUTE_VALUES),
    st.tuples(st.just("replace dataset"), _INDEX, _REPLACEMENTS),
    st.tuples(st.just("dataset to group"), _INDEX),
    st.tuples(st.just("group to dataset"), _INDEX),
)


def replacement(ds: h5py.Dataset, how: str) -> np.ndarray:
    """Data to put in place of ``ds``: another shape, another dtype, or other values."""
    shape = ds.shape
    rows = shape[0] if shape else 1
    like = np.zeros(shape, dtype=np.float64)
    return {
        "extra axis": lambda: np.zeros(shape + (2,)),
        "one row more": lambda: np.zeros((rows + 1, *shape[1:])),
        "one row less": lambda: np.zeros((max(rows - 1, 0), *shape[1:])),
        "empty": lambda: np.zeros((0, *shape[1:])),
        "scalar": lambda: np.float64(3.0),
        "float32": lambda: like.astype(np.float32),
        "int8": lambda: like.astype(np.int8),
        "uint64": lambda: np.full(shape, 2**63 + 5, dtype=np.uint64),
        "bool": lambda: like.astype(bool),
        "complex": lambda: like.astype(np.complex128),
        "strings": lambda: np.array([str(i) for i in range(rows)], dtype=h5py.string_dtype()),
        "-1": lambda: np.full(shape, -1, dtype=np.int64),
        "2**40": lambda: np.full(shape, 2**40, dtype=np.int64),
        "nan": lambda: np.full(shape, np.nan),
        "inf": lambda: np.full(shape, np.inf),
        "1e308": lambda: np.full(shape, 1e308),
    }[how]()


def members(f: h5py.File, cls: type) -> list[str]:
    """Names of the datasets or groups (``cls``) in ``f``, sorted."""
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, cls) else None)
    return sorted(names)


def edit(path: Path, change: tuple, rehash: bool) -> None:
    """Apply ``change`` to the file with h5py; with ``rehash``, store the new content hash too."""
    kind, index, *args = change
    with h5py.File(path, "r+") as f:
        datasets, groups, attrs = members(f, h5py.Dataset), members(f, h5py.Group), sorted(f.attrs)
        if kind == "delete dataset":
            del f[datasets[index % len(datasets)]]
        elif kind == "delete attribute":
            del f.attrs[attrs[index % len(attrs)]]
        elif kind == "set attribute":
            f.attrs[attrs[index % len(attrs)]] = args[0]
        elif kind == "replace dataset":
            name = datasets[index % len(datasets)]
            data = replacement(f[name], args[0])
            del f[name]
            f[name] = data
        elif kind == "dataset to group":
            name = datasets[index % len(datasets)]
            del f[name]
            f.create_group(name)
        else:
            name = groups[index % len(groups)]
            del f[name]
            f[name] = np.zeros(3)
        if rehash:  # as a writer that knows the hash would, so the reader's other checks are tested
            f.attrs["content_hash"] = _content_hash(f)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["molecules", "periodic"]), change=_EDIT, rehash=st.booleans())
def test_edited_hdf5_gives_one_line_error_or_valid_data(workdir, kind, change, rehash):
    s, _, data, summary = original(kind)
    path = workdir / "edited.h5"
    path.write_bytes(data)
    edit(path, change, rehash)
    read, summarized = read_both(path)
    if not isinstance(read, LmlpError):
        assert_valid(read)
        if not rehash:  # a changed payload without a matching hash must not go unnoticed
            assert_sets_equal(s, read)
    if not isinstance(summarized, LmlpError) and not rehash:
        assert numbers_of(summarized) == numbers_of(summary)


# --- the command line --------------------------------------------------------------------------

def spoil_extxyz(path: Path, old: bytes, new: bytes) -> None:
    """A valid extxyz file with the first ``old`` replaced by ``new``."""
    write_extxyz(path, small_set(periodic=False))
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))


def spoil_hdf5(path: Path, change: Callable[[h5py.File], None] | None = None) -> None:
    """A valid file, truncated, or changed by ``change`` with the content hash then recomputed."""
    write_structures(path, small_set(periodic=False))
    if change is None:
        path.write_bytes(path.read_bytes()[:3000])
        return
    with h5py.File(path, "r+") as f:
        change(f)
        f.attrs["content_hash"] = _content_hash(f)


def energy_in_kcal(f: h5py.File) -> None:
    f.attrs["energy_unit"] = "kcal/mol"


def split_as_dataset(f: h5py.File) -> None:
    del f["split"]
    f["split"] = np.zeros(3)


@pytest.mark.parametrize(("command", "name", "spoil"), [
    ("convert", "huge_count.extxyz", lambda p: spoil_extxyz(p, b"2\n", b"100000000000000000000\n")),
    ("convert", "text_charge.extxyz", lambda p: spoil_extxyz(p, b"charge=-1", b"charge=x")),
    ("info", "truncated.h5", lambda p: spoil_hdf5(p)),
    ("info", "kcal.h5", lambda p: spoil_hdf5(p, energy_in_kcal)),
    ("info", "split_dataset.h5", lambda p: spoil_hdf5(p, split_as_dataset)),
])
def test_cli_prints_one_error_line_for_damaged_files(tmp_path, command, name, spoil):
    path = tmp_path / name
    spoil(path)
    args = ["data", command, str(path)] + ([str(tmp_path / "out.h5")] if command == "convert" else [])
    result = subprocess.run([sys.executable, "-m", "lmlp", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"lmlp: error: {path}: "), result.stderr
