"""Does the ensemble spread tell where the model is wrong? Uncertainty against actual error.

Per structure, the uncertainties are those of ``LMLPCalculator`` (and so of ``lmlp md``'s
flagging): the members' standard deviation (ddof 1) of the energy per atom, and the largest
standard deviation of a force component. The errors are those of the ensemble mean: |ΔE| per atom
and the root mean square of the force-component errors. Reported: Spearman's rank correlation of
uncertainty and error, and the uncertainty threshold that flags 90 % (``RECALL``) of the
structures whose error exceeds 3× (``BAD_FACTOR``) a reference RMSE (the test RMSE), with the
fraction of all structures it flags. Units: meV/atom and meV/Å.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from lmlp.batch import Batch, chunks, predict_all
from lmlp.model import HDNNPEnsemble
from lmlp.units import METRIC_UNITS

BAD_FACTOR = 3.0
"""A structure counts as badly predicted when its error exceeds this × the reference RMSE."""
RECALL = 0.9
"""Fraction of the badly predicted structures the threshold must flag."""


@dataclass
class Calibration:
    """How one uncertainty (energy or forces) tells the error of one quantity.

    Attributes:
        spearman: rank correlation of uncertainty and error over all structures.
        reference_rmse: the RMSE that defines a bad prediction (× ``BAD_FACTOR``), meV/atom or meV/Å.
        n_bad: structures with error > ``BAD_FACTOR`` × ``reference_rmse``.
        threshold: uncertainty that flags ``RECALL`` of them (None when there are none), meV/atom or meV/Å.
        threshold_factor: ``threshold`` / ``reference_rmse`` (the calculator's factor form).
        flagged_fraction: fraction of all structures at or above ``threshold``.
    """

    spearman: float
    reference_rmse: float
    n_bad: int
    threshold: float | None
    threshold_factor: float | None
    flagged_fraction: float | None


@dataclass
class UncertaintyReport:
    """Calibration of the energy and the force uncertainty on ``n_structures`` structures."""

    n_structures: int
    energy: Calibration
    forces: Calibration

    def as_dict(self) -> dict:
        return {"units": METRIC_UNITS, "bad_factor": BAD_FACTOR,
                "recall": RECALL, **asdict(self)}


def structure_errors(model: HDNNPEnsemble, batch: Batch) -> dict[str, np.ndarray]:
    """Per structure (S,) of ``batch`` (``lmlp.metrics.model_batch``): energy and force uncertainty
    and error, meV/atom and meV/Å (module docstring)."""
    energies, forces = predict_all(model, chunks(batch))  # (M, S), (M, N, 3), float64
    n_structures = len(batch.energy)
    n_atoms = batch.n_atoms.to(energies)
    atom_of = batch.structure_of_atom
    energy_std = energies.std(0) / n_atoms * 1000.0
    energy_error = (energies.mean(0) - batch.energy.to(energies)).abs() / n_atoms * 1000.0
    force_std = forces.std(0).amax(1) * 1000.0  # (N,) largest component spread per atom
    force_sq = ((forces.mean(0) - batch.forces.to(forces)) ** 2).sum(1) * 1e6
    max_std = torch.zeros(n_structures, dtype=forces.dtype, device=forces.device).scatter_reduce_(
        0, atom_of, force_std, "amax", include_self=False)
    force_error = (torch.zeros(n_structures, dtype=forces.dtype, device=forces.device).index_add_(0, atom_of, force_sq)
                   / (3 * n_atoms)).sqrt()
    return {k: v.cpu().numpy() for k, v in (("energy_uncertainty", energy_std), ("energy_error", energy_error),
                                            ("force_uncertainty", max_std), ("force_error", force_error))}


def calibrate(uncertainty: np.ndarray, error: np.ndarray, reference_rmse: float) -> Calibration:
    """``Calibration`` of one uncertainty (S,) against one error (S,) in the same unit."""
    bad = error > BAD_FACTOR * reference_rmse
    threshold = float(np.quantile(uncertainty[bad], 1.0 - RECALL, method="inverted_cdf")) if bad.any() else None
    return Calibration(
        spearman=spearman(uncertainty, error), reference_rmse=float(reference_rmse), n_bad=int(bad.sum()),
        threshold=threshold, threshold_factor=None if threshold is None else threshold / reference_rmse,
        flagged_fraction=None if threshold is None else float(np.mean(uncertainty >= threshold)),
    )


def uncertainty_report(model: HDNNPEnsemble, batch: Batch, rmse_e: float, rmse_f: float) -> UncertaintyReport:
    """Calibration of ``model``'s ensemble uncertainty on the structures of ``batch``; ``rmse_e``
    (meV/atom) and ``rmse_f`` (meV/Å) are the reference RMSEs of a bad prediction (e.g. the test split's)."""
    e = structure_errors(model, batch)
    return UncertaintyReport(len(batch.energy), calibrate(e["energy_uncertainty"], e["energy_error"], rmse_e),
                             calibrate(e["force_uncertainty"], e["force_error"], rmse_f))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (ties get their average rank)."""
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of ``x``, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def format_report(r: UncertaintyReport) -> str:
    """The report as a few lines of text."""
    lines = [f"ensemble uncertainty against error on {r.n_structures} structures:"]
    for name, c, unit in (("energy", r.energy, "meV/atom"), ("forces", r.forces, "meV/Å")):
        line = f"  {name:6s}  Spearman {c.spearman:5.2f};  {c.n_bad} structures with error > {BAD_FACTOR:g} × {c.reference_rmse:.2f} {unit}"
        if c.threshold is not None:
            line += (f"; flagging {RECALL:.0%} of them takes σ ≥ {c.threshold:.3g} {unit} ({c.threshold_factor:.2f} × the RMSE), "
                     f"which flags {c.flagged_fraction:.1%} of all structures")
        lines.append(line)
    return "\n".join(lines)
