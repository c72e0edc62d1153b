"""Self-contained model files (``model.pt``): everything needed to rebuild and run an ensemble.

A model file is a ``torch.save`` dictionary with: ``format`` ("lmlp.model"), ``format_version``,
``lmlp_version``, ``units`` (energy eV, length Angstrom, forces eV/Angstrom), ``descriptor``
(the symmetry-function parameters), ``network`` (hidden widths, activation, members, seed),
``elements``, ``state_dict`` (weights, standardisation, reference energies) and ``metadata``
(free-form: per-member test RMSEs, config, data hash, ...). Writes are atomic.

From ``format_version`` 2 the dictionary is stored checksummed (``lmlp.integrity``: a wrapper
holding its ``torch.save`` bytes and their SHA-256), so a truncated or corrupted file is reported
on load; version 1 files (the plain dictionary) still load.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import lmlp
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.errors import LmlpError
from lmlp.integrity import load_checked, save_checked
from lmlp.model import HDNNPEnsemble
from lmlp.units import MODEL_UNITS as UNITS

FORMAT = "lmlp.model"
FORMAT_VERSION = 2


def save_model(path: str | os.PathLike, model: HDNNPEnsemble, metadata: dict[str, Any] | None = None, *,
               keep_previous: bool = False) -> None:
    """Write ``model`` and ``metadata`` to ``path`` atomically, checksummed.

    With ``keep_previous`` an intact existing ``path`` is kept as ``<stem>.prev<suffix>``.
    """
    content = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lmlp_version": lmlp.__version__,
        "units": UNITS,
        "descriptor": model.descriptor.hyperparameters,
        "network": model.hyperparameters,
        "elements": model.elements.tolist(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "metadata": metadata or {},
    }
    save_checked(content, path, keep_previous=keep_previous)


def load_model(path: str | os.PathLike) -> tuple[HDNNPEnsemble, dict[str, Any]]:
    """Rebuild the ensemble stored in ``path``; return it (eval mode) and its metadata.

    ``LmlpError`` (one line naming ``path``) when the file is missing, truncated, corrupted (checksum
    mismatch), not an lmlp model file or of a newer format.
    """
    content = load_checked(path, "model file")
    if content.get("format") != FORMAT:
        raise LmlpError(f"{path}: not an lmlp model file")
    if content["format_version"] > FORMAT_VERSION:
        raise LmlpError(f"{path}: model format {content['format_version']} is newer than this lmlp "
                        f"reads ({FORMAT_VERSION}); upgrade lmlp")
    state = content["state_dict"]
    descriptor = SymmetryFunctions(**content["descriptor"])
    standardizer = Standardizer(state["standardizer.mean"], state["standardizer.std"])
    model = HDNNPEnsemble(descriptor, standardizer, content["elements"], state["reference_energies_micro_ev"] * 1e-6,
                          **content["network"])
    model.to(getattr(torch, content["dtype"]))
    model.load_state_dict(state)
    return model.eval(), content["metadata"]
