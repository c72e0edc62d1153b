"""``checkpoint_last.pt``: everything a run needs to resume, one versioned record.

``Checkpoint.save`` is the only writer and ``Checkpoint.load`` the only reader. The file is a
checksummed ``torch.save`` dictionary (``lmlp.integrity``) with ``format`` = "lmlp.checkpoint",
``format_version`` and one entry per field of ``Checkpoint``; the one before it is kept as
``checkpoint_last.prev.pt``, the fallback when the newer one is damaged. Checkpoints written
before the format was versioned (the same entries, without ``format``) are read as version 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlp.errors import LmlpError
from lmlp.integrity import load_with_fallback, previous_path, save_checked

FORMAT = "lmlp.checkpoint"
FORMAT_VERSION = 1

LAST = "checkpoint_last.pt"
"""File name of the resumable checkpoint in a run directory."""


@dataclass
class Checkpoint:
    """The state of a run after ``epoch``, for the whole ensemble (every process's members).

    Attributes:
        epoch: the last completed epoch.
        model: state dict of the ensemble's current weights (CPU tensors).
        optimizer: the optimizer's state dict (state tensors of a parameter's shape cover all members).
        optimizer_name: registry name of the optimizer (``optimizer.name``).
        selection: ``DataSelection.state_dict()``.
        fingerprints: (S,) int64 content hash of every training structure (``train.data.fingerprints``).
        best_state: state dict holding each member's weights of its best epoch so far.
        best_loss: (M,) each member's best validation loss (eV²/atom² and eV²/Å² terms).
        best_epoch: (M,) the epoch of it (0: none yet).
        rows: the learning-curve rows so far (``train.rundir.curve_row``).
        continue_from: the model file a continual-learning run started from, or None.
    """

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    optimizer_name: str
    selection: dict[str, Any]
    fingerprints: torch.Tensor
    best_state: dict[str, torch.Tensor]
    best_loss: list[float]
    best_epoch: list[int]
    rows: list[dict[str, float]]
    continue_from: str | None

    def save(self, path: str | Path) -> None:
        """Write to ``path`` atomically and checksummed, keeping an intact older file as the
        ``.prev`` fallback."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        save_checked({"format": FORMAT, "format_version": FORMAT_VERSION, **fields}, path, keep_previous=True)

    @classmethod
    def load(cls, path: str | Path, warn: Callable[[str], None]) -> Checkpoint:
        """The checkpoint in ``path``, or in the previous one kept beside it when ``path`` is damaged
        (``warn`` is told). ``LmlpError`` naming the file when neither is readable, the file is not
        a checkpoint, or it was written by a newer lmlp."""
        path = Path(path)
        if not path.is_file() and not previous_path(path).is_file():
            raise LmlpError(f"{path}: no checkpoint to resume from")
        content, source = load_with_fallback(path, "checkpoint", warn)
        return cls._from_dict(content, source)

    @property
    def continued_from(self) -> Path | None:
        """``continue_from`` as a path."""
        return None if self.continue_from is None else Path(self.continue_from)

    @classmethod
    def _from_dict(cls, content: dict[str, Any], source: Path) -> Checkpoint:
        """The checkpoint of a loaded file ``source``; version 0 (unversioned) files have the same entries."""
        if content.get("format", FORMAT) != FORMAT:
            raise LmlpError(f"{source}: not an lmlp checkpoint (format {content['format']!r})")
        version = content.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise LmlpError(f"{source}: checkpoint format {version} is newer than this lmlp reads "
                            f"({FORMAT_VERSION}); upgrade lmlp")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in content]
        if missing:
            raise LmlpError(f"{source}: not an lmlp checkpoint (no {', '.join(missing)})")
        return cls(**{name: content[name] for name in names})
