"""The structures of a run: the configured subset of the data file, its splits and the
independent test files; content fingerprints and the closest atom pair of a set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from lmlp.batch import structure_chunks
from lmlp.config import Config
from lmlp.data import StructureSet, load
from lmlp.descriptors.neighbors import find_neighbors
from lmlp.errors import LmlpError


@dataclass
class TrainingData:
    """The structures of a run.

    ``validation_split`` names the split that chooses the epochs: "validation", or "test" for a
    data file without a validation split (the older train/test layout); ``validation`` holds its
    structures. ``extra`` maps each file of ``data.extra_test`` to its structures.
    """

    structures: StructureSet
    validation_split: str
    train: StructureSet
    validation: StructureSet
    extra: dict[str, StructureSet]

    @classmethod
    def load(cls, cfg: Config) -> TrainingData:
        """The configured structures and independent test files; ``LmlpError`` for an empty split."""
        s = load_training_data(cfg)
        validation_split = "validation" if "validation" in s.split else "test"
        train, validation = s.split_subset("train"), s.split_subset(validation_split)
        if len(train) == 0 or len(validation) == 0 or len(s.split["test"]) == 0:
            raise LmlpError(f"{cfg.data.path}: the train, {validation_split} and test splits must be non-empty")
        extra = {path: load_extra_test(cfg, path) for path in cfg.data.extra_test}
        return cls(s, validation_split, train, validation, extra)

    def test(self) -> StructureSet:
        """The test split (read once, after training: it chooses nothing)."""
        return self.structures.split_subset("test")

    @property
    def train_index(self) -> np.ndarray:
        """(S_train,) index in the data file of every training structure."""
        return self.structures.split["train"]


def load_training_data(cfg: Config) -> StructureSet:
    """The configured structures (reaction filter, size cap) with a train/(validation/)test split."""
    s, problems = load(cfg.data.path, on_invalid=cfg.data.on_invalid)
    for p in problems:
        print(f"{cfg.data.path}: skipped structure {p.index}: {p.reason}", flush=True)
    if not {"train", "test"} <= set(s.split):
        raise LmlpError(f"{cfg.data.path}: needs a stored train/validation/test split (lmlp data split makes one)")
    unknown = set(cfg.data.reactions or ()) - set(s.label.tolist())
    if unknown:
        raise LmlpError(f"data.reactions: {sorted(unknown)} not in {cfg.data.path}")
    return _filtered(s, cfg.data.reactions, cfg.data.max_structures, cfg.data.max_train)


def load_extra_test(cfg: Config, path: str) -> StructureSet:
    """All structures of an independent test file of ``data.extra_test`` (reaction filter applied)."""
    s, problems = load(path, on_invalid=cfg.data.on_invalid)
    for p in problems:
        print(f"{path}: skipped structure {p.index}: {p.reason}", flush=True)
    subset = _filtered(s, cfg.data.reactions, None, None)
    if len(subset) == 0:
        raise LmlpError(f"data.extra_test: {path} has no structures of the configured reactions")
    return subset


def _filtered(s: StructureSet, reactions: list[str] | None, max_structures: int | None,
              max_train: int | None) -> StructureSet:
    """``s`` restricted to the labels ``reactions``, the first ``max_structures`` structures and of
    the training split the first ``max_train`` (None: no restriction), its split renumbered."""
    keep = np.ones(len(s), dtype=bool)
    if reactions is not None:
        keep &= np.isin(s.label.astype(str), reactions)
    if max_structures is not None:
        keep &= np.cumsum(keep) <= max_structures
    if max_train is not None and "train" in s.split:
        train = np.zeros(len(s), dtype=bool)
        train[s.split["train"]] = True
        keep &= ~train | (np.cumsum(keep & train) <= max_train)
    if keep.all():
        return s
    new_index = np.cumsum(keep) - 1
    split = {k: new_index[v[keep[v]]] for k, v in s.split.items()}
    subset = s.subset(np.flatnonzero(keep))
    subset.split = split
    return subset


def fingerprints(s: StructureSet) -> torch.Tensor:
    """(S,) int64 content hash of every structure (atomic numbers and positions), to match
    structures between data sets."""
    digests = [
        hashlib.blake2b(s.numbers[a:b].tobytes() + s.positions[a:b].tobytes(), digest_size=8).digest()
        for a, b in zip(s.offsets[:-1], s.offsets[1:])
    ]
    return torch.from_numpy(np.frombuffer(b"".join(digests), dtype=np.int64).copy())


def closest_pair_distance(s: StructureSet, cutoff: float) -> float:
    """The smallest interatomic distance (Å, periodic images included) in ``s``; ``cutoff`` (Å) if
    no two atoms are closer than that."""
    closest = cutoff
    for _, (_, positions, offsets, cells, pbc) in structure_chunks(s):
        nb = find_neighbors(positions, offsets, cutoff, cells, pbc)
        if nb.pairs.shape[1]:
            closest = min(closest, float(nb.vectors(positions).norm(dim=1).min()))
    return closest
