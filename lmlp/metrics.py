"""Losses and error metrics of an ensemble (docs/method.md: loss and error metrics): per member and for the ensemble mean.

Energies are compared per atom, forces per Cartesian component; reported in meV/atom and meV/Å.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from lmlp.batch import Batch, chunks, compute_batch, predict
from lmlp.config import TrainingConfig
from lmlp.data import StructureSet
from lmlp.model import HDNNPEnsemble
from lmlp.units import METRIC_UNITS


@dataclass
class Metrics:
    """Errors of members (M,) and of the ensemble mean: energy per atom meV/atom, forces meV/Å;
    ``loss`` (M,) is the training loss of each member (eV²/atom², eV²/Å² terms)."""

    rmse_e: np.ndarray
    mae_e: np.ndarray
    rmse_f: np.ndarray
    mae_f: np.ndarray
    loss: np.ndarray
    ensemble: dict[str, float]


def member_losses(
    energies: torch.Tensor, forces: torch.Tensor, batch: Batch, q: float, w_f: float,
    totals: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss per member (M,) and loss per member and structure (M, S) (docs/method.md: loss and error metrics).

    ``totals`` (structures, atoms): ``batch`` is one piece of a larger set, and the loss is this
    piece's share of the set's loss (the pieces' losses add up to it).
    """
    n = batch.n_atoms.to(forces.dtype)
    de = ((energies - batch.energy) / batch.n_atoms).to(forces.dtype)  # difference in float64
    df2 = ((forces - batch.forces) ** 2).sum(-1)
    per_structure_f = torch.zeros_like(de).index_add_(1, batch.structure_of_atom, df2) / (3 * n)
    per_structure = q**2 * de**2 + w_f * per_structure_f
    if totals is None:
        total = q**2 * (de**2).mean(1) + w_f * df2.sum(1) / (3 * len(batch.numbers))
    else:
        total = q**2 * (de**2).sum(1) / totals[0] + w_f * df2.sum(1) / (3 * totals[1])
    return total, per_structure


def evaluate(model: HDNNPEnsemble, pieces: Iterable[Batch], q: float, w_f: float,
             gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Metrics:
    """Metrics of every member and of the ensemble mean over the structures of ``pieces``.

    The pieces are read once and only error sums are kept, so memory is bounded by a piece (they
    may come from disk, ``lmlp.cache``).

    ``gather`` completes the members' predictions (M, ...) from this process's share of them
    (distributed training, ``lmlp.distributed``).
    """
    sums: dict[str, torch.Tensor | float] = {}
    n_structures = n_components = 0
    with torch.no_grad():
        for piece in pieces:
            energies, forces = (t.double() for t in predict(model, piece))
            if gather is not None:
                energies, forces = gather(energies), gather(forces)
            n_atoms = piece.n_atoms
            de = (energies - piece.energy) / n_atoms * 1000.0
            df = (forces - piece.forces.double()).flatten(1) * 1000.0
            de_ens, df_ens = de.mean(0), df.mean(0)
            for key, value in (("e2", de.pow(2).sum(1)), ("e1", de.abs().sum(1)), ("f2", df.pow(2).sum(1)),
                               ("f1", df.abs().sum(1)), ("ens_e2", de_ens.pow(2).sum()),
                               ("ens_e1", de_ens.abs().sum()), ("ens_f2", df_ens.pow(2).sum()),
                               ("ens_f1", df_ens.abs().sum())):
                sums[key] = sums.get(key, 0.0) + value
            n_structures, n_components = n_structures + len(piece.energy), n_components + df.shape[1]
    mse_e, mse_f = sums["e2"] / n_structures, sums["f2"] / n_components
    return Metrics(
        rmse_e=mse_e.sqrt().cpu().numpy(), mae_e=(sums["e1"] / n_structures).cpu().numpy(),
        rmse_f=mse_f.sqrt().cpu().numpy(), mae_f=(sums["f1"] / n_components).cpu().numpy(),
        loss=(q**2 * mse_e + w_f * mse_f).cpu().numpy() / 1e6,
        ensemble={"rmse_e": math.sqrt(float(sums["ens_e2"]) / n_structures),
                  "mae_e": float(sums["ens_e1"]) / n_structures,
                  "rmse_f": math.sqrt(float(sums["ens_f2"]) / n_components),
                  "mae_f": float(sums["ens_f1"]) / n_components},
    )


def metrics_dict(m: Metrics) -> dict:
    return {"ensemble": m.ensemble,
            "members": {k: getattr(m, k).tolist() for k in ("rmse_e", "mae_e", "rmse_f", "mae_f")}}


def model_batch(model: HDNNPEnsemble, s: StructureSet) -> Batch:
    """The descriptors of ``s`` for ``model``: its descriptor, in its dtype, on its device."""
    weight = next(model.parameters())
    return compute_batch(s, model.descriptor, weight.dtype).to(weight.device)


def evaluate_model(
    model: HDNNPEnsemble, s: StructureSet, q: float = TrainingConfig.energy_weight,
    w_f: float = TrainingConfig.force_weight,
) -> dict[str, Metrics]:
    """Metrics of ``model`` on every structure of ``s`` ("all") and per label (e.g. reaction);
    the loss weights ``q`` and ``w_f`` (for ``Metrics.loss``) default to the training defaults."""
    batch = model_batch(model, s)
    result = {"all": evaluate(model, chunks(batch), q, w_f)}
    labels = s.label.astype(str)
    for label in sorted(set(labels.tolist())):
        indices = torch.from_numpy(np.flatnonzero(labels == label))
        result[label] = evaluate(model, chunks(batch.select(indices)), q, w_f)
    return result


def format_evaluation(results: dict[str, Metrics]) -> str:
    """Per-subset table: ensemble and member mean ± std of RMSE E (meV/atom) and F (meV/Å)."""
    width = max(len(k) for k in results)
    lines = [f"{'subset':{width}s}  {'ens. E':>8s} {'members E':>15s}  {'ens. F':>8s} {'members F':>15s}"]
    for name, m in results.items():
        lines.append(f"{name:{width}s}  {m.ensemble['rmse_e']:8.2f} {m.rmse_e.mean():8.2f} ± {m.rmse_e.std():4.2f}"
                     f"  {m.ensemble['rmse_f']:8.1f} {m.rmse_f.mean():8.1f} ± {m.rmse_f.std():4.1f}")
    lines.append("RMSE of energy per atom in meV/atom and of force components in meV/Å")
    return "\n".join(lines)


def evaluation_json(results: dict[str, Metrics]) -> dict:
    """``results`` as plain JSON data, with units."""
    return {"units": METRIC_UNITS, "subsets": {name: metrics_dict(m) for name, m in results.items()}}
