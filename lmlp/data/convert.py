"""Conversion between the lmlp HDF5 layout and files ASE reads (extxyz, ASE db, ...).

extxyz written here keeps every float exactly (shortest round-trip repr), and carries the
per-structure ``charge``, ``label``, ``split`` and ``trajectory`` as info keys, so HDF5 → extxyz → HDF5 is lossless.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import ase.io
import numpy as np
from ase import Atoms

from lmlp.data.hdf5 import read_structures, write_structures
from lmlp.data.structures import StructureSet, stratified_split
from lmlp.data.validate import Problem, validate
from lmlp.elements import symbol
from lmlp.errors import DataError
from lmlp.fileio import atomic_path

H5_SUFFIXES = {".h5", ".hdf5"}
XYZ_SUFFIXES = {".xyz", ".extxyz"}


def read_ase(path: str | os.PathLike, default_charge: int = 0, fmt: str | None = None) -> StructureSet:
    """Read every structure of an ASE-readable file with energies and forces.

    Charges come from ``info["charge"]`` (else ``default_charge``), labels from ``info["label"]``
    (else the formula), the split from ``info["split"]`` when every structure has one.
    """
    images = read_images(path, fmt=fmt)
    return StructureSet.from_atoms(images, default_charge=default_charge, source=str(path))


def read_images(path: str | os.PathLike, index: int | str = ":", fmt: str | None = None) -> list[Atoms]:
    """Structures ``index`` (one number, or a slice such as ":") of an ASE-readable file.

    A missing or unreadable file, or one without structures, is a ``DataError`` naming it.
    """
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    what = "it" if isinstance(index, str) else f"structure {index}"
    if fmt == "extxyz" or fmt is None and Path(path).suffix.lower() in XYZ_SUFFIXES:
        _check_xyz_frame_sizes(path)
    try:
        images = ase.io.read(path, index=index, format=fmt)
    except Exception as exc:  # ASE's parsers raise many types; the message is what matters
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: ASE cannot read {what}: {first}") from None
    images = images if isinstance(images, list) else [images]
    if not images:
        raise DataError(f"{path}: no structures in the file")
    return images


def _check_xyz_frame_sizes(path: str | os.PathLike) -> None:
    """Raise ``DataError`` if an (ext)xyz frame declares < 0 atoms or more than the file has lines.

    ASE skips a frame's declared number of lines one call at a time, so a corrupted count such as
    10**20 would make it loop practically forever. Other errors are left to ASE.
    """
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")  # the line breaks of readline, unlike str.splitlines
    i = 0
    while i < len(lines) and lines[i].strip():
        try:
            natoms = int(lines[i])
        except ValueError:
            return
        if not 0 <= natoms <= len(lines):
            raise DataError(f"{path}: line {i + 1}: a frame of {natoms} atoms cannot fit in a file "
                            f"of {len(lines)} lines")
        i += natoms + 2
        while i < len(lines) and lines[i].lstrip().startswith("VEC"):
            i += 1


def write_extxyz(path: str | os.PathLike, s: StructureSet) -> None:
    """Write ``s`` as extended XYZ with exact floats and energy, forces, charge, label, split, trajectory."""
    split_of = np.full(len(s), "", dtype=object)
    for name, idx in s.split.items():
        split_of[idx] = name
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for i in range(len(s)):
            a, b = s.offsets[i], s.offsets[i + 1]
            info = [
                "Properties=species:S:1:pos:R:3:forces:R:3",
                f"energy={float(s.energy[i])!r}",
                f"charge={int(s.charge[i])}",
                f'label="{s.label[i]}"',
            ]
            if split_of[i]:
                info.append(f"split={split_of[i]}")
            if s.trajectory is not None:
                info.append(f"trajectory={int(s.trajectory[i])}")
            if s.cell is not None:
                cell = " ".join(repr(x) for x in s.cell[i].ravel().tolist())
                info.append(f'Lattice="{cell}"')
                info.append('pbc="' + " ".join("T" if p else "F" for p in s.pbc[i]) + '"')
            else:
                info.append('pbc="F F F"')
            out.write(f"{b - a}\n{' '.join(info)}\n")
            for z, pos, frc in zip(s.numbers[a:b], s.positions[a:b].tolist(), s.forces[a:b].tolist()):
                out.write(" ".join([symbol(int(z)), *map(repr, pos), *map(repr, frc)]) + "\n")


def load(
    path: str | os.PathLike, on_invalid: Literal["raise", "skip"] = "raise", default_charge: int = 0
) -> tuple[StructureSet, list[Problem]]:
    """Read and validate structures from an lmlp HDF5 file or any ASE-readable file."""
    if Path(path).suffix.lower() in H5_SUFFIXES:
        return read_structures(path, on_invalid=on_invalid)
    return validate(read_ase(path, default_charge=default_charge), str(path), on_invalid)


def convert(
    source: str | os.PathLike,
    target: str | os.PathLike,
    on_invalid: Literal["raise", "skip"] = "raise",
    default_charge: int = 0,
    test_fraction: float = 0.1,
    seed: int = 0,
    attrs: dict[str, str] | None = None,
) -> tuple[StructureSet, list[Problem]]:
    """Convert between HDF5 and extxyz (by file suffix); return what was written and what was skipped.

    Into HDF5, a set without a stored split gets a ``test_fraction`` split stratified by label;
    ``attrs`` (method, program, ...) are added to the provenance.
    """
    s, problems = load(source, on_invalid=on_invalid, default_charge=default_charge)
    if Path(target).suffix.lower() in H5_SUFFIXES:
        if not s.split:
            s.split = stratified_split(s.label, test_fraction, seed)
        s.attrs.setdefault("method", "unknown")
        s.attrs.update(attrs or {})
        write_structures(target, s)
    elif Path(target).suffix.lower() in {".xyz", ".extxyz"}:
        write_extxyz(target, s)
    else:
        raise DataError(f"{target}: unknown output format; use .h5 or .extxyz/.xyz")
    return s, problems
