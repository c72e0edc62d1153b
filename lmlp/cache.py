"""Descriptor caches for training: all in memory, or on disk for data larger than memory.

Both hold the descriptors G and dG/dR of a structure set (computed once) and hand them
out as ``Batch`` pieces: ``select(indices)`` for the structures fitted in an epoch, and all of
them for evaluation, by iterating over the cache. ``MemoryCache`` keeps one ``Batch`` (fast; the
default). ``DiskCache`` keeps only the labels in memory; the descriptors live in an HDF5 file and are read per epoch for the
selected structures, one block of ``STRUCTURES_PER_CHUNK`` structures at a time, so memory stays
bounded by a block whatever the size of the data set. Training then accumulates the gradient over
the blocks (one optimizer step per epoch, as in memory).

Disk layout (``training.descriptor_cache: disk``; ``descriptors_<split>.h5`` in the run directory):

    /                 attributes: format = "lmlp.descriptor_cache", format_version = 2,
                      key (JSON: descriptor hyperparameters, dtype, content digest of the
                      structures, structures per block), structures_per_block (the
                      ``STRUCTURES_PER_CHUNK`` the file was written with), units
                      ("descriptor units; derivatives per Angstrom")
    /blocks/<k>/G       (n_k, F)      block k's atoms' descriptors
    /blocks/<k>/values  (n_k, F, 3K)  dG/dR grouped by centre (``CentreDerivatives``)
    /blocks/<k>/atom    (n_k, K)      int32 moving atom of each slot, counted from the block's first atom

Datasets are chunked along atoms with the Fletcher-32 checksum filter, so a damaged chunk is
reported on read. A cache whose key does not match the run's data, descriptor and block size is
rebuilt; a cache file is read in the blocks it was written in.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from lmlp.batch import STRUCTURES_PER_CHUNK, Batch, chunks, compute_batch
from lmlp.data import StructureSet
from lmlp.descriptors import CentreDerivatives, Standardizer, SymmetryFunctions
from lmlp.errors import LmlpError
from lmlp.fileio import atomic_path

FORMAT = "lmlp.descriptor_cache"
FORMAT_VERSION = 2
ROWS_PER_CHUNK = 64
"""Atoms per HDF5 chunk (the unit of reads and checksums)."""


class MemoryCache:
    """Every descriptor in one ``Batch``."""

    def __init__(self, batch: Batch, device: torch.device = torch.device("cpu")) -> None:
        self.batch = batch.to(device)

    def __len__(self) -> int:
        return len(self.batch.energy)

    def select(self, indices: torch.Tensor) -> Iterator[Batch]:
        """The structures ``indices`` (sorted) as one piece."""
        yield self.batch.select(indices)

    def __iter__(self) -> Iterator[Batch]:
        """All structures, in pieces of ``STRUCTURES_PER_CHUNK`` (for evaluation)."""
        return iter(chunks(self.batch))

    def standardizer(self) -> Standardizer:
        return Standardizer.fit(self.batch.G.double())


class DiskCache:
    """Descriptors in an HDF5 file (module docstring); labels of ``s`` in memory.

    Build with ``DiskCache.open``; the file stays open for reading until ``close``.
    """

    def __init__(self, path: Path, s: StructureSet, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")) -> None:
        self.path = path
        self.device = device
        self.numbers = torch.from_numpy(s.numbers)
        self.offsets = torch.from_numpy(s.offsets)
        self.energy = torch.from_numpy(s.energy)
        self.forces = torch.from_numpy(s.forces).to(dtype)
        self.file = h5py.File(path, "r")
        self.block = _block_size(self.file, path)
        """Structures per block of this file."""

    @classmethod
    def open(cls, path: str | os.PathLike, s: StructureSet, descriptor: SymmetryFunctions,
             dtype: torch.dtype, log=print, device: torch.device = torch.device("cpu")) -> DiskCache:
        """The cache of ``s`` at ``path``, computed (block by block) unless a matching one exists."""
        path = Path(path)
        key = cache_key(s, descriptor, dtype)
        if not _matches(path, key):
            log(f"computing the descriptor cache {path} ({len(s)} structures)")
            _write(path, s, descriptor, dtype, key)
        return cls(path, s, dtype, device)

    def __len__(self) -> int:
        return len(self.energy)

    def close(self) -> None:
        self.file.close()

    def select(self, indices: torch.Tensor) -> Iterator[Batch]:
        """The structures ``indices`` (sorted), one piece per block that holds any of them."""
        blocks = torch.div(indices, self.block, rounding_mode="floor")
        for k in torch.unique_consecutive(blocks).tolist():
            local = indices[blocks == k]
            yield self._read(k, int(local[0]), int(local[-1]) + 1).select(local - local[0])

    def __iter__(self) -> Iterator[Batch]:
        """All structures, block by block (read anew on every iteration)."""
        for k in range(self._n_blocks):
            start = k * self.block
            yield self._read(k, start, min(start + self.block, len(self)))

    def standardizer(self) -> Standardizer:
        """Mean and population std of G over every atom (two passes over the blocks, float64)."""
        n = int(self.offsets[-1])
        mean = sum(self._G(k).sum(0) for k in range(self._n_blocks)) / n
        var = sum(((self._G(k) - mean) ** 2).sum(0) for k in range(self._n_blocks)) / n
        return Standardizer(mean, var.sqrt())

    @property
    def _n_blocks(self) -> int:
        return -(-len(self) // self.block)

    def _G(self, k: int) -> torch.Tensor:
        return torch.from_numpy(self._dataset(k, "G")[:]).double()

    def _dataset(self, k: int, name: str) -> h5py.Dataset:
        return self.file[f"blocks/{k}/{name}"]

    def _read(self, k: int, first: int, stop: int) -> Batch:
        """Structures ``first``…``stop − 1`` (all in block k) as a ``Batch``."""
        block_atom = int(self.offsets[k * self.block])
        a, b = int(self.offsets[first]), int(self.offsets[stop])
        rows = slice(a - block_atom, b - block_atom)
        try:
            G = torch.from_numpy(self._dataset(k, "G")[rows])
            values = torch.from_numpy(self._dataset(k, "values")[rows])
            atom = torch.from_numpy(self._dataset(k, "atom")[rows].astype(np.int64)) - rows.start
        except (OSError, KeyError) as exc:
            raise LmlpError(f"{self.path}: descriptor cache unreadable ({str(exc).splitlines()[0]}); delete it "
                            f"and resume to rebuild it") from None
        return Batch(numbers=self.numbers[a:b], offsets=self.offsets[first: stop + 1] - a, G=G,
                     derivatives=CentreDerivatives(values, atom), energy=self.energy[first:stop],
                     forces=self.forces[a:b]).to(self.device)


def cache_key(s: StructureSet, descriptor: SymmetryFunctions, dtype: torch.dtype) -> str:
    """What a cache file must have been computed from: descriptor, precision, structures and the
    number of structures per block."""
    digest = hashlib.sha256()
    for array in (s.numbers, s.positions, s.offsets):
        digest.update(np.ascontiguousarray(array).tobytes())
    return json.dumps({"descriptor": descriptor.hyperparameters, "dtype": str(dtype),
                       "structures": digest.hexdigest(), "structures_per_block": STRUCTURES_PER_CHUNK},
                      sort_keys=True, default=str)


def _block_size(file: h5py.File, path: Path) -> int:
    """Structures per block of an open cache file; ``LmlpError`` for a file without it."""
    try:
        return int(file.attrs["structures_per_block"])
    except KeyError:
        raise LmlpError(f"{path}: descriptor cache without its block size (written by an older lmlp); delete "
                        f"it and resume to rebuild it") from None
    except OSError as exc:
        raise LmlpError(f"{path}: descriptor cache unreadable ({str(exc).splitlines()[0]}); delete it and resume "
                        f"to rebuild it") from None


def _matches(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT and f.attrs.get("key") == key
    except OSError:
        return False


def _write(path: Path, s: StructureSet, descriptor: SymmetryFunctions, dtype: torch.dtype, key: str) -> None:
    """Compute and write the cache block by block (atomically: a killed build leaves no file)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=("v110", "v110")) as f:
        f.attrs["format"], f.attrs["format_version"], f.attrs["key"] = FORMAT, FORMAT_VERSION, key
        f.attrs["structures_per_block"] = STRUCTURES_PER_CHUNK
        f.attrs["units"] = "descriptor units; derivatives per Angstrom"
        for k, start in enumerate(range(0, len(s), STRUCTURES_PER_CHUNK)):
            part = s.subset(np.arange(start, min(start + STRUCTURES_PER_CHUNK, len(s))))
            batch = compute_batch(part, descriptor, dtype)
            for name, data in (("G", batch.G), ("values", batch.derivatives.values),
                               ("atom", batch.derivatives.atom.to(torch.int32))):
                array = data.numpy()
                f.create_dataset(f"blocks/{k}/{name}", data=array, fletcher32=True,
                                 chunks=(min(ROWS_PER_CHUNK, max(1, len(array))), *array.shape[1:]))
            del batch
            _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Writing HDF5 chunks between large tensor allocations fragments glibc's heap: without this the
    resident memory of a cache build grows with the data set (by ~6 MB per block), though none
    of it is in use.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
