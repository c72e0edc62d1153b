"""The lmlp HDF5 layout for structure sets (format version 1).

Per-atom arrays are ragged: all atoms of all structures stacked, with per-structure offsets.

    /                      attributes (all strings unless noted):
                             format = "lmlp.structures", format_version = 1 (int),
                             energy_unit = "eV", length_unit = "Angstrom",
                             force_unit = "eV/Angstrom", charge_unit = "e",
                             method, program, program_version  (reference electronic structure),
                             command (how the file was made), created (UTC, ISO 8601),
                             lmlp_version, content_hash = "sha256:<hex>", plus any other provenance
    /atoms/numbers         (N,)      int16    atomic numbers
    /atoms/positions       (N, 3)    float64  Å
    /atoms/forces          (N, 3)    float64  eV/Å
    /structures/offsets    (n + 1,)  int64    structure i owns atom rows offsets[i]:offsets[i+1]
    /structures/energy     (n,)      float64  total energy, eV
    /structures/charge     (n,)      int16    total charge, e
    /structures/label      (n,)      UTF-8    label, e.g. the reaction "F+CH3Cl"
    /structures/cell       (n, 3, 3) float64  Å           (only for periodic data)
    /structures/pbc        (n, 3)    bool                 (only for periodic data)
    /structures/trajectory (n,)      int64    id of the MD trajectory a structure comes from (optional)
    /split/<name>          (k,)      int64    sorted structure indices: train, validation, test

Arrays are gzip-compressed with the shuffle filter and chunked, so summaries stream through
them without loading a whole file. ``content_hash`` is a SHA-256 over every dataset's name,
dtype, shape and bytes; a mismatch on read means the file is corrupted.

Files are written in the HDF5 1.10 format, whose metadata carry checksums, and strings (labels,
attributes) are fixed-length, so nothing lives in HDF5's global heap: a damaged global heap can
make libhdf5 hang or crash, whereas checksum errors are reported. Reading checks the format,
the units, every dataset's dtype and shape, and the content hash; files from earlier lmlp
versions (variable-length strings) are read too.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

import lmlp
from lmlp.data.structures import StructureSet
from lmlp.data.validate import Problem, check_offsets, validate
from lmlp.elements import symbol
from lmlp.errors import DataError, LmlpError
from lmlp.fileio import atomic_path
from lmlp.units import DATA_UNITS as UNITS

FORMAT = "lmlp.structures"
FORMAT_VERSION = 1
_ROWS_PER_READ = 1 << 16


def write_structures(path: str | os.PathLike, s: StructureSet) -> None:
    """Write ``s`` to ``path`` in the lmlp HDF5 layout, atomically."""
    datasets: dict[str, np.ndarray] = {
        "atoms/numbers": s.numbers.astype(np.int16),
        "atoms/positions": s.positions,
        "atoms/forces": s.forces,
        "structures/offsets": s.offsets,
        "structures/energy": s.energy,
        "structures/charge": s.charge.astype(np.int16),
        "structures/label": _fixed_length_utf8([str(x) for x in s.label]),
    }
    if s.cell is not None:
        datasets["structures/cell"] = s.cell
        datasets["structures/pbc"] = s.pbc
    if s.trajectory is not None:
        datasets["structures/trajectory"] = s.trajectory
    for name, idx in s.split.items():
        datasets[f"split/{name}"] = np.sort(idx).astype(np.int64)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=("v110", "v110")) as f:
        for name, data in datasets.items():
            compress = {"compression": "gzip", "shuffle": True} if data.size else {}
            f.create_dataset(name, data=data, chunks=True if data.size else None, **compress)
        attrs = {k: str(v) for k, v in s.attrs.items()}
        attrs.update(UNITS, format=FORMAT, lmlp_version=lmlp.__version__,
                     created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        for key, value in attrs.items():
            _set_text_attr(f, key, value)
        f.attrs["format_version"] = FORMAT_VERSION
        _set_text_attr(f, "content_hash", _content_hash(f))


def read_structures(
    path: str | os.PathLike, on_invalid: Literal["raise", "skip"] = "raise"
) -> tuple[StructureSet, list[Problem]]:
    """Read and validate a structure file; return the set and the skipped structures.

    Raises ``DataError`` (one line, naming the file) for a missing, corrupted or foreign file,
    and for invalid structures unless ``on_invalid="skip"``.
    """
    source = str(path)
    with _verified(path) as f:
        s = StructureSet(
            numbers=f["atoms/numbers"][()],
            positions=f["atoms/positions"][()],
            forces=f["atoms/forces"][()],
            offsets=f["structures/offsets"][()],
            energy=f["structures/energy"][()],
            charge=f["structures/charge"][()],
            label=f["structures/label"].asstr()[()],
            cell=f["structures/cell"][()] if "structures/cell" in f else None,
            pbc=f["structures/pbc"][()] if "structures/pbc" in f else None,
            trajectory=f["structures/trajectory"][()] if "structures/trajectory" in f else None,
            split={name: ds[()] for name, ds in f.get("split", {}).items()},
            attrs={k: v for k, v in _text_attrs(f).items() if k not in _LAYOUT_ATTRS},
        )
    return validate(s, source, on_invalid)


@dataclass
class Summary:
    """What ``lmlp data info`` reports. Energies in eV, forces in eV/Å."""

    path: str
    n_structures: int
    n_atoms: int
    atoms_per_structure: tuple[int, int]
    elements: dict[str, int]
    labels: dict[str, int]
    energy_range: tuple[float, float]
    energy_per_atom_range: tuple[float, float]
    force_component_range: tuple[float, float]
    max_force_norm: float
    split_sizes: dict[str, int]
    periodic: bool
    n_trajectories: int | None = None
    attrs: dict[str, str] = field(default_factory=dict)


def summarize(path: str | os.PathLike) -> Summary:
    """Summarise a structure file, streaming through the per-atom arrays (bounded memory)."""
    source = str(path)
    with _verified(path) as f:
        offsets = f["structures/offsets"][()]
        check_offsets(offsets, len(f["atoms/numbers"]), source)
        energy = f["structures/energy"][()]
        labels = f["structures/label"].asstr()[()]
        n_atoms = np.diff(offsets)
        z_counts: Counter[int] = Counter()
        f_lo, f_hi, f_norm = [], [], [0.0]
        for z_block, f_block in zip(_blocks(f["atoms/numbers"]), _blocks(f["atoms/forces"])):
            z_counts.update(z_block.tolist())
            f_lo.append(float(f_block.min()))
            f_hi.append(float(f_block.max()))
            f_norm.append(float(np.linalg.norm(f_block, axis=1).max()))
        uniq, label_counts = np.unique(labels.astype(str), return_counts=True)
        e_per_atom = energy / n_atoms
        return Summary(
            path=source,
            n_structures=len(energy),
            n_atoms=int(offsets[-1]),
            atoms_per_structure=(int(n_atoms.min()), int(n_atoms.max())) if len(n_atoms) else (0, 0),
            elements={symbol(z): c for z, c in sorted(z_counts.items())},
            labels=dict(zip(uniq.tolist(), label_counts.tolist())),
            energy_range=_span(energy),
            energy_per_atom_range=_span(e_per_atom),
            force_component_range=(min(f_lo, default=np.nan), max(f_hi, default=np.nan)),
            max_force_norm=max(f_norm),
            split_sizes={name: len(ds) for name, ds in f.get("split", {}).items()},
            periodic="structures/pbc" in f and bool(f["structures/pbc"][()].any()),
            n_trajectories=len(np.unique(f["structures/trajectory"][()])) if "structures/trajectory" in f else None,
            attrs=_text_attrs(f),
        )


_LAYOUT_ATTRS = {"format", "format_version", "content_hash", "lmlp_version", "created", *UNITS}
_LAYOUT = {  # dataset: (dtype kinds, "S" for strings; shape in N atoms and n structures)
    "atoms/numbers": ("iu", "N"),
    "atoms/positions": ("f", "N 3"),
    "atoms/forces": ("f", "N 3"),
    "structures/offsets": ("iu", "n+1"),
    "structures/energy": ("f", "n"),
    "structures/charge": ("iu", "n"),
    "structures/label": ("S", "n"),
    "structures/cell": ("f", "n 3 3"),
    "structures/pbc": ("b", "n 3"),
    "structures/trajectory": ("iu", "n"),
}
_OPTIONAL = {"structures/cell", "structures/pbc", "structures/trajectory"}
_KIND_NAMES = {"iu": "integers", "f": "floats", "S": "strings", "b": "booleans"}


def _open(path: str | os.PathLike) -> h5py.File:
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file (truncated or corrupted?): "
                        f"{_first_line(exc)}") from None


@contextlib.contextmanager
def _verified(path: str | os.PathLike) -> Iterator[h5py.File]:
    """``path`` open for reading and checked by ``_check_integrity``, else a ``DataError`` naming it.

    libhdf5 reports damage wherever it meets it while reading, as KeyError, OSError, ValueError,
    ..., so every error inside the ``with`` block (bar MemoryError) becomes a ``DataError``.
    """
    f = _open(path)
    try:
        with f:
            _check_integrity(f, str(path))
            yield f
    except (LmlpError, MemoryError):
        raise
    except Exception as exc:  # the file-reading boundary: what fails here is the file
        raise DataError(f"{path}: cannot read data (corrupted?): {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message (a KeyError's without quotes), else its type."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return next((line for line in text.splitlines() if line.strip()), type(exc).__name__)


def _check_integrity(f: h5py.File, source: str) -> None:
    """Raise ``DataError`` unless ``f`` is an lmlp structure file in lmlp's units, with the
    layout's datasets and a matching content hash."""
    attrs = _text_attrs(f)
    if attrs.get("format") != FORMAT:
        raise DataError(f"{source}: not an lmlp structure file (attribute format != {FORMAT!r})")
    version = f.attrs.get("format_version")
    if not isinstance(version, np.integer) or version < 1:
        raise DataError(f"{source}: attribute format_version = {attrs.get('format_version')!r}, "
                        "expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise DataError(f"{source}: format version {version} is newer than this lmlp reads "
                        f"({FORMAT_VERSION}); upgrade lmlp")
    for key, unit in UNITS.items():
        if attrs.get(key) != unit:
            raise DataError(f"{source}: attribute {key} = {attrs.get(key)!r}, expected {unit!r}")
    _check_layout(f, source)
    if attrs.get("content_hash") != _content_hash(f):
        raise DataError(f"{source}: content hash mismatch: the file is corrupted or was changed "
                        "outside lmlp")


def _check_layout(f: h5py.File, source: str) -> None:
    """Raise ``DataError`` unless the datasets of ``_LAYOUT`` and ``/split`` have their dtypes and shapes."""
    shapes = {}
    for name, (kinds, dims) in _LAYOUT.items():
        ds = f.get(name)
        if ds is None and name in _OPTIONAL:
            continue
        if ds is None and name == "atoms/forces":
            raise DataError(f"{source}: missing forces (/atoms/forces); lmlp trains on energies and forces")
        if not isinstance(ds, h5py.Dataset):
            raise DataError(f"{source}: missing dataset /{name}")
        kind = "S" if h5py.check_string_dtype(ds.dtype) else ds.dtype.kind
        if kind not in kinds or ds.ndim != len(dims.split()):
            raise DataError(f"{source}: /{name} holds {ds.dtype} with shape {ds.shape}, "
                            f"expected {_KIND_NAMES[kinds]} with shape ({', '.join(dims.split())})")
        shapes[name] = ds.shape
    sizes = {"N": shapes["atoms/numbers"][0], "n": shapes["structures/energy"][0], "3": 3}
    sizes["n+1"] = sizes["n"] + 1
    for name, shape in shapes.items():
        expected = tuple(sizes[d] for d in _LAYOUT[name][1].split())
        if shape != expected:
            raise DataError(f"{source}: /{name} has shape {shape}, expected {expected} "
                            f"({sizes['n']} structures, {sizes['N']} atoms)")
    split = f.get("split", {})
    if not isinstance(split, (h5py.Group, dict)):
        raise DataError(f"{source}: /split is not a group")
    for name, ds in split.items():
        if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "iu" or ds.ndim != 1:
            raise DataError(f"{source}: /split/{name} is not a list of structure indices")


def _text_attrs(f: h5py.File) -> dict[str, str]:
    """The file's attributes as text (fixed-length UTF-8 decoded)."""
    return {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for k, v in f.attrs.items()}


def _fixed_length_utf8(texts: list[str]) -> np.ndarray:
    """``texts`` as fixed-length UTF-8 strings, which HDF5 stores in place (not in its global heap)."""
    encoded = [text.encode() for text in texts]
    return np.asarray(encoded, dtype=h5py.string_dtype("utf-8", max([1, *map(len, encoded)])))


def _set_text_attr(f: h5py.File, key: str, value: str) -> None:
    """Set attribute ``key`` of ``f`` to ``value`` as a fixed-length UTF-8 string."""
    text = _fixed_length_utf8([value])
    f.attrs.create(key, text[0], dtype=text.dtype)


def _span(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``values``; NaNs for an empty array."""
    return (float(values.min()), float(values.max())) if values.size else (np.nan, np.nan)


def _content_hash(f: h5py.File) -> str:
    """SHA-256 over every dataset's name, dtype, shape and bytes, in name order, streamed."""
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    digest = hashlib.sha256()
    for name in sorted(names):
        ds = f[name]
        digest.update(f"{name}|{ds.dtype.str if ds.dtype.kind != 'O' else 'str'}|{ds.shape}|".encode())
        if ds.dtype.kind == "O":
            for block in _blocks(ds.asstr()):
                digest.update("\0".join(block.tolist()).encode() + b"\0")
        else:
            for block in _blocks(ds):
                digest.update(np.ascontiguousarray(block).tobytes())
    return "sha256:" + digest.hexdigest()


def _blocks(ds) -> Iterator[np.ndarray]:
    """Row blocks of a dataset, ``_ROWS_PER_READ`` rows at a time."""
    n = ds.shape[0] if ds.shape else 0
    for start in range(0, n, _ROWS_PER_READ):
        yield np.asarray(ds[start : start + _ROWS_PER_READ])
