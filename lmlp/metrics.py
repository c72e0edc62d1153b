"""Losses and error metrics of an ensemble (spec §4): per member and for the ensemble mean.

Energies are compared per atom, forces per Cartesian component; reported in meV/atom and meV/Å.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from lmlp.batch import Batch, chunks, compute_batch, predict
from lmlp.data import StructureSet
from lmlp.model import HDNNPEnsemble

UNITS = {"energy": "meV/atom", "forces": "meV/Angstrom"}
"""Units of every reported metric."""


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
    """Loss per member (M,) and loss per member and structure (M, S) (spec §4).

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
    """Metrics of every member and of the ensemble mean over the structures of ``pieces``
    (read once: they may come from disk, ``lmlp.cache``).

    ``gather`` completes the members' predictions (M, ...) from this process's share of them
    (distributed training, ``lmlp.distributed``).
    """
    predictions, reference_e, reference_f, n_atoms = [], [], [], []
    with torch.no_grad():
        for piece in pieces:
            predictions.append(predict(model, piece))
            reference_e.append(piece.energy)
            reference_f.append(piece.forces)
            n_atoms.append(piece.n_atoms)
    energies = torch.cat([e.double() for e, _ in predictions], 1)
    forces = torch.cat([f.double() for _, f in predictions], 1)
    if gather is not None:
        energies, forces = gather(energies), gather(forces)
    reference_e, n_atoms = torch.cat(reference_e), torch.cat(n_atoms)
    reference_f = torch.cat(reference_f).double()
    de = (energies - reference_e) / n_atoms * 1000.0
    df = (forces - reference_f).flatten(1) * 1000.0
    de_ens, df_ens = (energies.mean(0) - reference_e) / n_atoms * 1000.0, df.reshape(*forces.shape).mean(0).flatten()
    mse_e, mse_f = de.pow(2).mean(1), df.pow(2).mean(1)
    return Metrics(
        rmse_e=mse_e.sqrt().numpy(), mae_e=de.abs().mean(1).numpy(),
        rmse_f=mse_f.sqrt().numpy(), mae_f=df.abs().mean(1).numpy(),
        loss=(q**2 * mse_e + w_f * mse_f).numpy() / 1e6,
        ensemble={"rmse_e": float(de_ens.pow(2).mean().sqrt()), "mae_e": float(de_ens.abs().mean()),
                  "rmse_f": float(df_ens.pow(2).mean().sqrt()), "mae_f": float(df_ens.abs().mean())},
    )


def metrics_dict(m: Metrics) -> dict:
    return {"ensemble": m.ensemble,
            "members": {k: getattr(m, k).tolist() for k in ("rmse_e", "mae_e", "rmse_f", "mae_f")}}


def evaluate_model(
    model: HDNNPEnsemble, s: StructureSet, q: float = 10.9, w_f: float = 1.0
) -> dict[str, Metrics]:
    """Metrics of ``model`` on every structure of ``s`` ("all") and per label (e.g. reaction)."""
    dtype = next(model.parameters()).dtype
    batch = compute_batch(s, model.descriptor, dtype)
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
    return {"units": UNITS, "subsets": {name: metrics_dict(m) for name, m in results.items()}}
