"""``train``: one training run from a config, end to end (docs/method.md: one training epoch, lifelong adaptive data selection, continual learning).

Per epoch (``Trainer``): lADS draws the structures to fit → one optimizer step per
``steps_per_epoch`` on the loss

    L_m = q² · mean_s ((E_ms − E_s)/N_s)² + w_F · mean over force components (F_m − F)²

summed over members m (members are independent) → energy and force RMSE / MAE per member and for
the ensemble mean on the training and validation structures. Each member keeps the weights of its
epoch with the lowest validation loss (early stopping). The test split is read once, after
training, to report its errors, as are the independent test sets of ``data.extra_test``. A data
file without a validation split (the older train/test layout) still trains: early stopping then
uses the test split, with a warning. Energies eV, forces eV/Å; reported metrics meV/atom and
meV/Å. The run directory is described in ``lmlp.train.rundir``, the checkpoint in
``lmlp.train.checkpoint``, continued runs in ``lmlp.train.continual``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmlp import distributed, memory
from lmlp.batch import chunks
from lmlp.config import Config
from lmlp.data import StructureSet
from lmlp.descriptors import SymmetryFunctions
from lmlp.distributed import Workers
from lmlp.elements import symbol
from lmlp.errors import LmlpError
from lmlp.metrics import Metrics, evaluate, evaluate_model, model_batch
from lmlp.model import HDNNPEnsemble
from lmlp.selection import DataSelection
from lmlp.train import rundir
from lmlp.train.build import build_model, training_optimizer
from lmlp.train.caches import Cache, build_caches, close_caches, monitor_cache
from lmlp.train.checkpoint import LAST, Checkpoint
from lmlp.train.continual import (
    Carried,
    add_new_elements,
    carried_optimizer,
    carry_over,
    carry_selection,
    continual_report,
    known_structures,
    refit_reference_energies,
)
from lmlp.train.data import TrainingData, closest_pair_distance, fingerprints
from lmlp.train.early_stopping import EarlyStopping
from lmlp.train.log import RunLog
from lmlp.train.result import TrainingResult, format_table
from lmlp.train.trainer import Trainer
from lmlp.uncertainty import format_report, uncertainty_report


def train(cfg: Config, resume: bool = False, continue_from: str | Path | None = None,
          workers: Workers | None = None) -> TrainingResult:
    """Train the ensemble ``cfg`` describes and write the run directory.

    Runs with torch's deterministic algorithms (multi-threaded ``index_add_`` otherwise sums in a
    varying order), so a run is bitwise reproducible. With ``resume`` the run continues from
    ``checkpoint_last.pt`` in the run directory; as every random stream is in the checkpoint, it
    ends with the same weights as an uninterrupted one. ``continue_from`` (a model file) starts a
    continual-learning run from a trained model (``lmlp.train.continual``). ``workers``: the
    processes sharing the members (``lmlp.distributed``; default: the torchrun process group if
    one is initialised, else this process alone). Sets the C allocator to keep freed memory for
    reuse (``lmlp.memory``).
    """
    memory.keep_freed_memory()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, resume, None if continue_from is None else Path(continue_from),
                      workers or distributed.current())
    finally:
        torch.use_deterministic_algorithms(previous)


@dataclass
class _Setup:
    """What a run starts from: its config, processes, precision, data and descriptor; the checkpoint
    of a resumed run (``saved``) or the model of a continued one (``carried``, from ``continue_from``);
    messages for the log (``notes``) and the start time (``time.perf_counter``, s)."""

    cfg: Config
    workers: Workers
    device: torch.device
    dtype: torch.dtype
    data: TrainingData
    saved: Checkpoint | None
    carried: Carried | None
    continue_from: Path | None
    descriptor: SymmetryFunctions
    notes: list[str]
    start_time: float


def _train(cfg: Config, resume: bool, continue_from: Path | None, workers: Workers) -> TrainingResult:
    """``train`` under deterministic algorithms."""
    start_time = time.perf_counter()
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    device = distributed.resolve_device(cfg.training.device, workers)
    if workers.size > cfg.ensemble.members:
        raise LmlpError(f"{workers.size} processes but ensemble.members = {cfg.ensemble.members}: training "
                        f"spreads the members, so use at most {cfg.ensemble.members} processes")
    data = TrainingData.load(cfg)
    notes: list[str] = []
    saved = Checkpoint.load(cfg.run_dir / LAST, notes.append) if resume else None
    if saved is not None:
        continue_from = saved.continued_from
    carried = carry_over(cfg, continue_from, notes.append) if continue_from is not None else None
    descriptor = carried.model.descriptor if carried is not None else SymmetryFunctions.from_config(
        cfg.descriptor, sorted(set(data.structures.numbers.tolist())))
    setup = _Setup(cfg, workers, device, getattr(torch, cfg.training.dtype), data, saved, carried, continue_from,
                   descriptor, notes, start_time)
    caches = build_caches(cfg, {"train": data.train, data.validation_split: data.validation}, descriptor,
                          setup.dtype, workers, device)
    try:
        return _run(setup, caches)
    finally:
        close_caches(caches)


def _run(setup: _Setup, caches: list[Cache]) -> TrainingResult:
    """Build or take over the model, train it and write the results; ``caches`` (train,
    validation) get the test cache appended, for the caller to close."""
    cfg, workers, data, t = setup.cfg, setup.workers, setup.data, setup.cfg.training
    ensemble, before, known_test = _ensemble(setup, caches[0])
    if workers.main:
        rundir.prepare(cfg.run_dir)
        rundir.write_provenance(cfg, cfg.run_dir, setup.continue_from, ensemble, workers)
    workers.barrier()
    first_epoch = setup.saved.epoch + 1 if setup.saved is not None else 1
    log_path = cfg.run_dir / "train.log" if workers.main else cfg.run_dir / "logs" / f"rank{workers.rank}.log"
    log = RunLog(log_path, cfg.output.progress, t.epochs, first_epoch, quiet=not workers.main)
    try:
        for message in setup.notes:
            log(message)
        if data.validation_split == "test":
            log(f"warning: {cfg.data.path} has no validation split, so early stopping uses the test split and "
                f"the test errors are not independent of training (lmlp data split stores a validation split)")
        trainer = _trainer(setup, ensemble, caches, log)
        _log_start(setup, trainer)
        trainer.run(first_epoch)
        keys = {name for name, _ in ensemble.named_parameters()}
        ensemble.load_state_dict(workers.gather_state(trainer.stopping.state, keys, cfg.ensemble.members))
        return _finish(setup, ensemble, trainer, caches, before, known_test)
    finally:
        log.close()


def _ensemble(setup: _Setup, train_cache: Cache) -> tuple[HDNNPEnsemble, dict[str, Metrics], StructureSet | None]:
    """A new ensemble, or the continued one with networks for new elements; for a continued run
    also its test metrics before (per label) on the ``known`` test structures (its elements only)."""
    cfg, data, carried, t = setup.cfg, setup.data, setup.carried, setup.cfg.training
    if carried is None:
        ensemble = build_model(cfg, data.train, train_cache.standardizer(), setup.descriptor)
        return ensemble.to(setup.device, setup.dtype), {}, None
    ensemble = carried.model.to(setup.device, setup.dtype)
    if t.refit_reference_energies:
        old = refit_reference_energies(ensemble, data.train)
        setup.notes.append("reference energies refitted to the training data: " + ", ".join(
            f"{symbol(int(z))} {a:.4f} → {b:.4f} eV" for z, a, b in
            zip(ensemble.elements.tolist(), old, ensemble.reference_energies.tolist())))
    known = known_structures(ensemble, data.test())
    before = evaluate_model(ensemble, known, t.energy_weight, t.force_weight) if len(known) else {}
    add_new_elements(ensemble, data.train)
    return ensemble, before, known


def _trainer(setup: _Setup, ensemble: HDNNPEnsemble, caches: list[Cache], log: RunLog) -> Trainer:
    """The trainer of a fresh, resumed (``setup.saved``) or continued (``setup.carried``) run."""
    cfg, workers, data, saved, carried = setup.cfg, setup.workers, setup.data, setup.saved, setup.carried
    members = cfg.ensemble.members
    if saved is not None:
        ensemble.load_state_dict(saved.model)
    model = ensemble.member_subset(workers.share(members)) if workers.size > 1 else ensemble
    if carried is not None and carried.checkpoint is not None and saved is None:
        optimizer = carried_optimizer(cfg, model, carried.checkpoint, workers, members)
    else:
        optimizer = training_optimizer(cfg, model.networks)
    selection = DataSelection(cfg.selection, len(data.train), cfg.training.seed)
    stopping = EarlyStopping.start(model, members, cfg.training.early_stopping)
    rows: list[dict[str, float]] = []
    train_fingerprints = fingerprints(data.train)
    if saved is not None:
        optimizer.load_state_dict(workers.local_optimizer_state(saved.optimizer, optimizer, members))
        selection.load_state_dict(saved.selection)
        keys = {name for name, _ in ensemble.named_parameters()}
        stopping.state = {k: v.to(setup.device) for k, v in workers.local_state(saved.best_state, keys, members).items()}
        stopping.loss, stopping.epoch = np.array(saved.best_loss), np.array(saved.best_epoch)
        rows = saved.rows
        log(f"resumed {cfg.run_dir} after epoch {saved.epoch}")
    elif carried is not None:
        carry_selection(carried, selection, train_fingerprints, log)
    train_cache, validation_cache = caches
    return Trainer(cfg, ensemble, model, optimizer, selection, train_cache, validation_cache, data.validation_split,
                   monitor_cache(cfg, train_cache), workers, log, stopping, rows, train_fingerprints,
                   data.train_index, setup.continue_from)


def _log_start(setup: _Setup, trainer: Trainer) -> None:
    """The run's set-up in one line of train.log."""
    cfg, data, workers, members = setup.cfg, setup.data, setup.workers, setup.cfg.ensemble.members
    share = workers.share(members)
    processes = "" if workers.size == 1 else (
        f"; process {workers.rank} of {workers.size} trains members "
        + (f"{share.start}" if share.stop - share.start == 1 else f"{share.start}–{share.stop - 1}"))
    trainer.log(f"{len(data.train)} training, {len(data.validation)} {data.validation_split} and "
                f"{len(data.structures.split['test'])} test structures from {cfg.data.path}; "
                f"{members} members, {setup.descriptor.n_functions} descriptors, {cfg.optimizer.name}, "
                f"{cfg.training.epochs} epochs of {trainer.selection.n_fit} structures" + processes, echo=False)


def _finish(setup: _Setup, model: HDNNPEnsemble, trainer: Trainer, caches: list[Cache],
            before: dict[str, Metrics], known_test: StructureSet | None) -> TrainingResult:
    """Final metrics of the best weights in ``model`` on every split and independent test file,
    the continual-learning report, model.pt, metrics.json and plots."""
    cfg, data, workers, log = setup.cfg, setup.data, setup.workers, trainer.log
    q, w_f = cfg.training.energy_weight, cfg.training.force_weight
    train_m, val_m = evaluate(model, trainer.train, q, w_f), evaluate(model, trainer.validation, q, w_f)
    test_set = data.test()
    test_cache = build_caches(cfg, {"test": test_set}, setup.descriptor, setup.dtype, workers, setup.device)[0]
    caches.append(test_cache)
    test_m = evaluate(model, test_cache, q, w_f)
    extra_batches = {path: model_batch(model, s) for path, s in data.extra.items()}
    extra = {path: evaluate(model, chunks(batch), q, w_f) for path, batch in extra_batches.items()}
    calibration = {path: uncertainty_report(model, batch, test_m.ensemble["rmse_e"], test_m.ensemble["rmse_f"])
                   for path, batch in extra_batches.items()}
    for path, report in calibration.items():
        log(f"{path}: {format_report(report)}", echo=False)
    continual = {} if setup.carried is None else continual_report(before, model, test_set, known_test, q, w_f, log)
    result = TrainingResult(cfg.run_dir, train_m, val_m, test_m, trainer.stopping.epoch,
                            time.perf_counter() - setup.start_time, continual, data.validation_split, extra,
                            calibration)
    if workers.main:
        rundir.write_results(cfg, result, model, trainer.rows, list(test_cache),
                             closest_pair_distance(data.train, setup.descriptor.cutoff))
    log(format_table(result), echo=False)
    workers.barrier()
    return result
