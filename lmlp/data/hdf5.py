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
    /split/<name>          (k,)      int64    sorted structure indices, e.g. train and test

Arrays are gzip-compressed with the shuffle filter and chunked, so summaries stream through
them without loading a whole file. ``content_hash`` is a SHA-256 over every dataset's name,
dtype, shape and bytes; a mismatch on read means the file is corrupted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

import lmlp
from lmlp.data.structures import StructureSet
from lmlp.data.validate import Problem, validate
from lmlp.elements import symbol
from lmlp.errors import DataError
from lmlp.fileio import atomic_path

FORMAT = "lmlp.structures"
FORMAT_VERSION = 1
UNITS = {"energy_unit": "eV", "length_unit": "Angstrom", "force_unit": "eV/Angstrom", "charge_unit": "e"}
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
        "structures/label": np.asarray([str(x) for x in s.label], dtype=h5py.string_dtype()),
    }
    if s.cell is not None:
        datasets["structures/cell"] = s.cell
        datasets["structures/pbc"] = s.pbc
    for name, idx in s.split.items():
        datasets[f"split/{name}"] = np.sort(idx).astype(np.int64)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, data in datasets.items():
            compress = {"compression": "gzip", "shuffle": True} if data.size else {}
            f.create_dataset(name, data=data, chunks=True if data.size else None, **compress)
        attrs = {k: str(v) for k, v in s.attrs.items()}
        attrs.update(UNITS, format=FORMAT, lmlp_version=lmlp.__version__,
                     created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["content_hash"] = _content_hash(f)


def read_structures(
    path: str | os.PathLike, on_invalid: Literal["raise", "skip"] = "raise"
) -> tuple[StructureSet, list[Problem]]:
    """Read and validate a structure file; return the set and the skipped structures.

    Raises ``DataError`` (one line, naming the file) for a missing, corrupted or foreign file,
    and for invalid structures unless ``on_invalid="skip"``.
    """
    source = str(path)
    with _open(path) as f:
        _check_integrity(f, source)
        structures = f["structures"]
        s = StructureSet(
            numbers=f["atoms/numbers"][()],
            positions=f["atoms/positions"][()],
            forces=f["atoms/forces"][()],
            offsets=structures["offsets"][()],
            energy=structures["energy"][()],
            charge=structures["charge"][()],
            label=structures["label"].asstr()[()],
            cell=structures["cell"][()] if "cell" in structures else None,
            pbc=structures["pbc"][()] if "pbc" in structures else None,
            split={name: ds[()] for name, ds in f.get("split", {}).items()},
            attrs={k: str(v) for k, v in f.attrs.items() if k not in _LAYOUT_ATTRS},
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
    attrs: dict[str, str] = field(default_factory=dict)


def summarize(path: str | os.PathLike) -> Summary:
    """Summarise a structure file, streaming through the per-atom arrays (bounded memory)."""
    source = str(path)
    with _open(path) as f:
        _check_integrity(f, source)
        offsets = f["structures/offsets"][()]
        energy = f["structures/energy"][()]
        labels = f["structures/label"].asstr()[()]
        n_atoms = np.diff(offsets)
        z_counts = np.zeros(1, dtype=np.int64)
        f_lo, f_hi, f_norm = np.inf, -np.inf, 0.0
        for z_block, f_block in zip(_blocks(f["atoms/numbers"]), _blocks(f["atoms/forces"])):
            counts = np.bincount(z_block.astype(np.int64))
            z_counts = np.pad(z_counts, (0, max(0, len(counts) - len(z_counts))))
            z_counts[: len(counts)] += counts
            f_lo, f_hi = min(f_lo, f_block.min()), max(f_hi, f_block.max())
            f_norm = max(f_norm, float(np.linalg.norm(f_block, axis=1).max()))
        uniq, label_counts = np.unique(labels.astype(str), return_counts=True)
        e_per_atom = energy / n_atoms
        return Summary(
            path=source,
            n_structures=len(energy),
            n_atoms=int(offsets[-1]),
            atoms_per_structure=(int(n_atoms.min()), int(n_atoms.max())),
            elements={symbol(z): int(c) for z, c in enumerate(z_counts) if c},
            labels=dict(zip(uniq.tolist(), label_counts.tolist())),
            energy_range=(float(energy.min()), float(energy.max())),
            energy_per_atom_range=(float(e_per_atom.min()), float(e_per_atom.max())),
            force_component_range=(float(f_lo), float(f_hi)),
            max_force_norm=f_norm,
            split_sizes={name: len(ds) for name, ds in f.get("split", {}).items()},
            periodic="structures/pbc" in f and bool(f["structures/pbc"][()].any()),
            attrs={k: str(v) for k, v in f.attrs.items()},
        )


_LAYOUT_ATTRS = {"format", "format_version", "content_hash", "lmlp_version", "created", *UNITS}
_REQUIRED = ("atoms/numbers", "atoms/positions", "structures/offsets", "structures/energy",
             "structures/charge", "structures/label")


def _open(path: str | os.PathLike) -> h5py.File:
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file (truncated or corrupted?): "
                        f"{str(exc).splitlines()[0]}") from None


def _check_integrity(f: h5py.File, source: str) -> None:
    """Raise ``DataError`` unless ``f`` is an lmlp structure file whose content hash matches."""
    if f.attrs.get("format") != FORMAT:
        raise DataError(f"{source}: not an lmlp structure file (attribute format != {FORMAT!r})")
    version = int(f.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise DataError(f"{source}: format version {version} is newer than this lmlp reads "
                        f"({FORMAT_VERSION}); upgrade lmlp")
    for name in _REQUIRED:
        if name not in f:
            raise DataError(f"{source}: missing dataset /{name}")
    if "atoms/forces" not in f:
        raise DataError(f"{source}: missing forces (/atoms/forces); lmlp trains on energies and forces")
    try:
        actual = _content_hash(f)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"{source}: cannot read data (corrupted?): {str(exc).splitlines()[0]}") from None
    if f.attrs.get("content_hash") != actual:
        raise DataError(f"{source}: content hash mismatch: the file is corrupted or was changed "
                        "outside lmlp")


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
