"""Continual learning (``continue_from``): the weights of a model file, and the optimizer and
selection state of the ``checkpoint_last.pt`` beside it, carry over to a data set that grew.

Structures are matched by content; new ones enter the selection with p_new, and networks for new
elements are added with reference energies fitted on the new data. With
``training.refit_reference_energies`` every element's reference energy is first refitted to the
new training data (labels from another method). The report compares the
ensemble test RMSEs per label before and after the continued run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmlp.batch import chunks, predict_all
from lmlp.config import Config
from lmlp.data import StructureSet
from lmlp.descriptors import SymmetryFunctions
from lmlp.distributed import Workers
from lmlp.errors import LmlpError
from lmlp.metrics import Metrics, evaluate_model, model_batch
from lmlp.model import HDNNPEnsemble, fit_reference_energies
from lmlp.modelfile import load_model
from lmlp.selection import DataSelection
from lmlp.train.build import optimizer_groups, training_optimizer
from lmlp.train.checkpoint import LAST, Checkpoint
from lmlp.train.log import RunLog

EARLIER = "known elements, all"
"""Report row of a continued run: every test structure the earlier model could already predict."""


@dataclass
class Carried:
    """What a continued run takes over from the earlier one: its model and, if there is one, the
    checkpoint beside the model file."""

    model: HDNNPEnsemble
    checkpoint: Checkpoint | None


def carry_over(cfg: Config, path: Path, warn: Callable[[str], None]) -> Carried:
    """The model of ``path`` and the ``checkpoint_last.pt`` beside it (if any), checked against ``cfg``
    (``warn`` is told of a fallback to the previous checkpoint)."""
    model, _ = load_model(path)
    h = model.hyperparameters
    wanted = {"hidden": list(cfg.model.hidden), "activation": cfg.model.activation, "members": cfg.ensemble.members}
    for key, value in wanted.items():
        if h[key] != value:
            raise LmlpError(f"{path}: the model has {key} = {h[key]}, the config asks for {value}; "
                            f"a continued run keeps the model's architecture")
    descriptor = SymmetryFunctions.from_config(cfg.descriptor, model.descriptor.hyperparameters["elements"])
    if descriptor.hyperparameters != model.descriptor.hyperparameters:
        raise LmlpError(f"{path}: the config's descriptor section differs from the model's; a continued "
                        f"run keeps the model's descriptor")
    checkpoint_path = path.parent / LAST
    return Carried(model, Checkpoint.load(checkpoint_path, warn) if checkpoint_path.is_file() else None)


def add_new_elements(model: HDNNPEnsemble, train_set: StructureSet) -> None:
    """Networks for elements of ``train_set`` the model does not know, E_ref (eV) fitted on ``train_set``."""
    known = dict(zip(model.elements.tolist(), model.reference_energies.tolist()))
    new = sorted(set(train_set.numbers.tolist()) - set(known))
    if new:
        e_ref = fit_reference_energies(train_set.numbers, train_set.offsets, train_set.energy, new, known)
        model.add_elements(new, torch.from_numpy(e_ref))


def refit_reference_energies(model: HDNNPEnsemble, train_set: StructureSet) -> np.ndarray:
    """Refit E_ref (eV) of every element to ``train_set``: least squares of its energies minus the
    networks' sum (ensemble mean), so that the networks keep what they learned and only the
    per-element constants change (new labels from another method, e.g. GFN2-xTB → DFT, differ by
    such constants, hundreds of eV per atom). Returns the old E_ref, in the order of ``elements``."""
    old = model.reference_energies.clone()
    energies, _ = predict_all(model, chunks(model_batch(model, train_set)))
    device = model.elements.device
    baseline = model.reference_baseline(torch.from_numpy(train_set.numbers).to(device),
                                        torch.from_numpy(train_set.offsets).to(device))
    networks = energies.mean(0).cpu() - baseline.cpu().to(torch.float64)
    elements = model.elements.tolist()
    model.set_reference_energies(torch.from_numpy(fit_reference_energies(
        train_set.numbers, train_set.offsets, train_set.energy - networks.numpy(), elements)))
    return old.numpy()


def carried_optimizer(cfg: Config, model: HDNNPEnsemble, saved: Checkpoint, workers: Workers,
                      members: int) -> torch.optim.Optimizer:
    """The optimizer with the earlier run's state for the known element networks (this config's
    hyperparameters) and fresh groups for new elements; ``model`` holds this process's members."""
    if saved.optimizer_name != cfg.optimizer.name:
        raise LmlpError(f"the earlier run used the {saved.optimizer_name} optimizer, this config "
                        f"{cfg.optimizer.name}; its state cannot carry over")
    n_known = len(saved.optimizer["param_groups"])
    optimizer = training_optimizer(cfg, model.networks[:n_known])
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(workers.local_optimizer_state(saved.optimizer, optimizer, members))
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)
    if hasattr(optimizer, "refresh_frozen_counts"):  # CoRe: this config's p_frozen, not the earlier run's
        optimizer.refresh_frozen_counts()
    for group in optimizer_groups(cfg, model.networks[n_known:]):
        optimizer.add_param_group(group)
    return optimizer


def carry_selection(carried: Carried, selection: DataSelection, train_fingerprints: torch.Tensor, log: RunLog) -> None:
    """Selection weights of the known structures (matched by content) from the earlier run."""
    saved = carried.checkpoint
    if saved is None:
        log("no checkpoint_last.pt beside the model: the optimizer and the selection start afresh")
        return
    old = {f: k for k, f in enumerate(saved.fingerprints.tolist())}
    match = torch.tensor([old.get(f, -1) for f in train_fingerprints.tolist()], dtype=torch.int64)
    selection.carry_over(saved.selection, match)
    log(f"continued from {len(old)} earlier training structures: {int((match >= 0).sum())} known and "
        f"{int((match < 0).sum())} new ones in this training set")


def known_structures(model: HDNNPEnsemble, s: StructureSet) -> StructureSet:
    """The structures of ``s`` made only of elements ``model`` knows."""
    structure = np.repeat(np.arange(len(s)), np.diff(s.offsets))
    unknown = ~np.isin(s.numbers, model.elements.cpu().numpy())
    return s.subset(np.setdiff1d(np.arange(len(s)), structure[unknown]))


def continual_report(
    before: dict[str, Metrics], model: HDNNPEnsemble, test_set: StructureSet, known: StructureSet,
    q: float, w_f: float, log: RunLog,
) -> dict[str, dict]:
    """Ensemble test RMSEs (E meV/atom, F meV/Å) per label, and over the ``known`` structures
    (``EARLIER``), before and after a continued run; logged as a table."""
    after = evaluate_model(model, test_set, q, w_f)
    report = {label: {"before": before[label].ensemble if label in before else None, "after": m.ensemble}
              for label, m in after.items() if label != "all"}
    if len(known):
        report[EARLIER] = {"before": before["all"].ensemble,
                           "after": evaluate_model(model, known, q, w_f)["all"].ensemble}
    width = max(len(k) for k in report)
    lines = ["continual learning, ensemble test RMSE (E meV/atom, F meV/Å) before → after:"]
    for label, r in report.items():
        b = f"{r['before']['rmse_e']:7.2f} {r['before']['rmse_f']:7.1f}" if r["before"] else f"{'new':>15s}"
        lines.append(f"  {label:{width}s}  {b}  →  {r['after']['rmse_e']:7.2f} {r['after']['rmse_f']:7.1f}")
    log("\n".join(lines))
    return report
