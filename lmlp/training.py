"""Training an HDNNP ensemble (spec §4, §6, §7): the epoch loop, checkpoints and the run directory.

Per epoch: lADS draws the structures to fit → one optimizer step per ``steps_per_epoch`` on the loss

    L_m = q² · mean_s ((E_ms − E_s)/N_s)² + w_F · mean over force components (F_m − F)²

summed over members m (members are independent) → energy and force RMSE / MAE per member and for
the ensemble mean on the training and validation structures. Each member keeps the weights of its
epoch with the lowest validation loss (early stopping). The test split is read once, after
training, to report its errors, as are the independent test sets of ``data.extra_test``. A data
file without a validation split (the older train/test layout) still trains: early stopping then
uses the test split, with a warning. Energies eV, forces eV/Å; reported metrics meV/atom and
meV/Å.

Run directory: config.yaml (resolved), run.json (versions, seeds, data hash), train.log,
learning_curve.csv, checkpoint_last.pt (everything to resume; the one before it is kept as
checkpoint_last.prev.pt, the fallback when the newer one is damaged), checkpoint_best.pt (a model
file with the best weights so far), model.pt, metrics.json and PNG plots. Every file is written
atomically; checkpoints and model files carry a SHA-256 checksum (``lmlp.integrity``).

Continual learning (``continue_from``): the weights of a model file, and the optimizer and
selection state of the ``checkpoint_last.pt`` beside it, carry over to a data set that grew.
Structures are matched by content; new ones enter the selection with p_new, and networks for
new elements are added with reference energies fitted on the new data.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import lmlp
from lmlp import distributed
from lmlp.batch import STRUCTURES_PER_CHUNK, Batch, chunks, compute_batch, predict, predict_all
from lmlp.cache import DiskCache, MemoryCache
from lmlp.config import Config, dump_config
from lmlp.data import StructureSet, load
from lmlp.distributed import Workers
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.descriptors.neighbors import find_neighbors
from lmlp.errors import LmlpError
from lmlp.integrity import load_with_fallback, previous_path, save_checked
from lmlp.fileio import atomic_path, atomic_write_text
from lmlp.metrics import UNITS, Metrics, evaluate, evaluate_model, member_losses, metrics_dict, model_batch
from lmlp.model import HDNNPEnsemble, fit_reference_energies
from lmlp.modelfile import load_model, save_model
from lmlp.optim import build_optimizer
from lmlp.selection import DataSelection
from lmlp.uncertainty import UncertaintyReport, format_report, uncertainty_report


@dataclass
class TrainingResult:
    """What ``train`` produced: the run directory, final metrics, best epochs and the wall time in s.

    ``validation`` holds the errors on the split that chose the epochs (the test split for files
    without a validation split: ``validation_split`` says which). ``extra_test`` maps each file of
    ``data.extra_test`` to its errors, ``extra_test_uncertainty`` to how the ensemble spread tells
    them (bad: error > 3× the test RMSE). ``continual`` maps each test label (reaction) to its
    ensemble test RMSEs before and after a continued run (empty for a fresh run).
    """

    run_dir: Path
    train: Metrics
    validation: Metrics
    test: Metrics
    best_epoch: np.ndarray
    wall_time: float
    continual: dict[str, dict[str, Any]]
    validation_split: str = "validation"
    extra_test: dict[str, Metrics] = field(default_factory=dict)
    extra_test_uncertainty: dict[str, UncertaintyReport] = field(default_factory=dict)


class RunLog:
    """Messages to the terminal and to ``train.log``; a progress bar on a terminal. ``quiet``: the
    file only (ranks other than 0 of a distributed run, which log to ``logs/rank<r>.log``)."""

    def __init__(self, path: Path, progress: bool, epochs: int, first_epoch: int, quiet: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        self.quiet = quiet
        self.bar = tqdm(total=epochs, initial=first_epoch - 1, unit="epoch", dynamic_ncols=True,
                        disable=quiet or not (progress and sys.stderr.isatty()))

    def __call__(self, message: str, echo: bool = True) -> None:
        self.file.write(message + "\n")
        self.file.flush()
        if echo and not self.quiet:
            if self.bar.disable:
                print(message, flush=True)
            else:
                self.bar.write(message)

    def epoch(self, validation: Metrics | None) -> None:
        """One epoch done; ``validation``: its validation metrics, if it was evaluated."""
        if validation is not None:
            self.bar.set_postfix_str(f"validation E {validation.ensemble['rmse_e']:.2f} meV/atom, "
                                     f"F {validation.ensemble['rmse_f']:.1f} meV/Å", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()
        self.file.close()


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
    return _filtered(s, cfg.data.reactions, cfg.data.max_structures)


def load_extra_test(cfg: Config, path: str) -> StructureSet:
    """All structures of an independent test file of ``data.extra_test`` (reaction filter applied)."""
    s, problems = load(path, on_invalid=cfg.data.on_invalid)
    for p in problems:
        print(f"{path}: skipped structure {p.index}: {p.reason}", flush=True)
    subset = _filtered(s, cfg.data.reactions, None)
    if len(subset) == 0:
        raise LmlpError(f"data.extra_test: {path} has no structures of the configured reactions")
    return subset


def _filtered(s: StructureSet, reactions: list[str] | None, max_structures: int | None) -> StructureSet:
    """``s`` restricted to the labels ``reactions`` and the first ``max_structures`` structures
    (None: no restriction), its split renumbered."""
    keep = np.ones(len(s), dtype=bool)
    if reactions is not None:
        keep &= np.isin(s.label.astype(str), reactions)
    if max_structures is not None:
        keep &= np.cumsum(keep) <= max_structures
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
    """The smallest interatomic distance (Å, periodic images included) in ``s``; ``cutoff`` if
    no two atoms are closer than that."""
    closest = cutoff
    for start in range(0, len(s), STRUCTURES_PER_CHUNK):
        part = s.subset(np.arange(start, min(start + STRUCTURES_PER_CHUNK, len(s))))
        cells = None if part.cell is None else torch.from_numpy(part.cell)
        pbc = None if part.pbc is None else torch.from_numpy(part.pbc)
        positions = torch.from_numpy(part.positions)
        nb = find_neighbors(positions, torch.from_numpy(part.offsets), cutoff, cells, pbc)
        if nb.pairs.shape[1]:
            closest = min(closest, float(nb.vectors(positions).norm(dim=1).min()))
    return closest


def build_model(cfg: Config, train: StructureSet, standardizer: Standardizer,
                descriptor: SymmetryFunctions) -> HDNNPEnsemble:
    """A new ensemble with reference energies fitted on the training set and its descriptor
    ``standardizer``."""
    elements = sorted(set(train.numbers.tolist()))
    e_ref = torch.from_numpy(fit_reference_energies(train.numbers, train.offsets, train.energy, elements))
    return HDNNPEnsemble(descriptor, standardizer, elements, e_ref,
                         hidden=cfg.model.hidden, activation=cfg.model.activation,
                         members=cfg.ensemble.members, seed=cfg.ensemble.seed)


def train(cfg: Config, resume: bool = False, continue_from: str | Path | None = None,
          workers: Workers | None = None) -> TrainingResult:
    """Train the ensemble ``cfg`` describes and write the run directory.

    Runs with torch's deterministic algorithms (multi-threaded ``index_add_`` otherwise sums in a
    varying order), so a run is bitwise reproducible. With ``resume`` the run continues from
    ``checkpoint_last.pt`` in the run directory; as every random stream is in the checkpoint, it
    ends with the same weights as an uninterrupted one. ``continue_from`` (a model file) starts a
    continual-learning run from a trained model (module docstring). ``workers``: the processes
    sharing the members (``lmlp.distributed``; default: the torchrun process group if one is
    initialised, else this process alone).
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, resume, None if continue_from is None else Path(continue_from),
                      workers or distributed.current())
    finally:
        torch.use_deterministic_algorithms(previous)


@dataclass
class _Carried:
    """What a continued run takes over from the earlier one."""

    model: HDNNPEnsemble
    checkpoint: dict[str, Any] | None


def _train(cfg: Config, resume: bool, continue_from: Path | None, workers: Workers) -> TrainingResult:
    """``train`` under deterministic algorithms."""
    start_time = time.perf_counter()
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    device = distributed.resolve_device(cfg.training.device, workers)
    dtype = getattr(torch, cfg.training.dtype)
    members = cfg.ensemble.members
    if workers.size > members:
        raise LmlpError(f"{workers.size} processes but ensemble.members = {members}: training spreads the "
                        f"members, so use at most {members} processes")
    data = load_training_data(cfg)
    validation_split = "validation" if "validation" in data.split else "test"
    train_set, validation_set = data.split_subset("train"), data.split_subset(validation_split)
    if len(train_set) == 0 or len(validation_set) == 0 or len(data.split["test"]) == 0:
        raise LmlpError(f"{cfg.data.path}: the train, {validation_split} and test splits must be non-empty")
    extra_sets = {path: load_extra_test(cfg, path) for path in cfg.data.extra_test}
    run_dir = cfg.run_dir
    fallbacks: list[str] = []
    if resume:
        saved = _load_checkpoint(run_dir / "checkpoint_last.pt", fallbacks.append)
        continue_from = Path(saved["continue_from"]) if saved.get("continue_from") else None
    carried = _carry_over(cfg, continue_from, fallbacks.append) if continue_from is not None else None
    if carried is not None:
        descriptor = carried.model.descriptor
    else:
        descriptor = SymmetryFunctions.from_config(cfg.descriptor, sorted(set(data.numbers.tolist())))
    train_cache, validation_cache = _caches(cfg, {"train": train_set, validation_split: validation_set},
                                            descriptor, dtype, workers, device)
    monitor = _monitor(cfg, train_cache)
    q, w_f = cfg.training.energy_weight, cfg.training.force_weight
    if carried is None:
        ensemble = build_model(cfg, train_set, train_cache.standardizer(), descriptor).to(device, dtype)
    else:
        ensemble = carried.model.to(device, dtype)
        known_test = _known_structures(ensemble, data.split_subset("test"))
        before = evaluate_model(ensemble, known_test, q, w_f) if len(known_test) else {}
        _add_new_elements(ensemble, train_set)
    member_keys = {name for name, _ in ensemble.named_parameters()}
    test_cache = None
    if workers.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".*.tmp"):  # left by a killed run's interrupted atomic write
            stale.unlink()
        _write_provenance(cfg, run_dir, continue_from, ensemble, workers)
    workers.barrier()
    first_epoch = saved["epoch"] + 1 if resume else 1
    log_path = run_dir / "train.log" if workers.main else run_dir / "logs" / f"rank{workers.rank}.log"
    log = RunLog(log_path, cfg.output.progress, cfg.training.epochs, first_epoch, quiet=not workers.main)
    try:
        for message in fallbacks:
            log(message)
        if validation_split == "test":
            log(f"warning: {cfg.data.path} has no validation split, so early stopping uses the test split and "
                f"the test errors are not independent of training (lmlp data split stores a validation split)")
        if resume:
            ensemble.load_state_dict(saved["model"])
        model = ensemble.member_subset(workers.share(members)) if workers.size > 1 else ensemble
        if carried is not None and carried.checkpoint is not None and not resume:
            optimizer = _carried_optimizer(cfg, model, carried.checkpoint, workers, members)
        else:
            optimizer = _optimizer(cfg, model.networks)
        selection = DataSelection(cfg.selection, len(train_set), cfg.training.seed)
        train_fingerprints = fingerprints(train_set)
        best_loss = np.full(members, np.inf)
        best_epoch = np.zeros(members, dtype=int)
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rows: list[dict[str, float]] = []
        if resume:
            optimizer.load_state_dict(workers.local_optimizer_state(saved["optimizer"], optimizer, members))
            selection.load_state_dict(saved["selection"])
            saved_best = workers.local_state(saved["best_state"], member_keys, members)
            best_state = {k: v.to(device) for k, v in saved_best.items()}
            rows = saved["rows"]
            best_loss, best_epoch = np.array(saved["best_loss"]), np.array(saved["best_epoch"])
            log(f"resumed {run_dir} after epoch {saved['epoch']}")
        elif carried is not None:
            _carry_selection(carried, selection, train_fingerprints, log)
        log(f"{len(train_set)} training, {len(validation_set)} {validation_split} and {len(data.split['test'])} "
            f"test structures from {cfg.data.path}; "
            f"{members} members, {descriptor.n_functions} descriptors, {cfg.optimizer.name}, "
            f"{cfg.training.epochs} epochs of {selection.n_fit} structures"
            + (f"; process {workers.rank} of {workers.size} trains members "
               f"{_members_text(workers.share(members))}" if workers.size > 1 else ""), echo=False)
        gather = partial(workers.gather_members, total=members)
        good = _Snapshot.take(model, optimizer, selection)
        for epoch in range(first_epoch, cfg.training.epochs + 1):
            validate = epoch % cfg.training.validation_every == 0 or epoch in (1, cfg.training.epochs)
            for attempt in range(cfg.training.divergence_retries + 1):
                finite = _fit_epoch(cfg, model, optimizer, selection, train_cache, epoch, data.split["train"], log,
                                    gather)
                if validate:
                    train_m = evaluate(model, monitor, q, w_f, gather)
                    val_m = evaluate(model, validation_cache, q, w_f, gather)
                    finite &= np.isfinite(train_m.loss) & np.isfinite(val_m.loss)
                if finite.all():
                    break
                _diverged(cfg, epoch, attempt, finite, log)
                good.restore(model, optimizer, selection, cfg.training.divergence_factor)
            good = _Snapshot.take(model, optimizer, selection)
            log.epoch(val_m if validate else None)
            if validate:
                improved = val_m.loss < best_loss if cfg.training.early_stopping else np.ones_like(best_loss, bool)
                best_loss = np.where(improved, val_m.loss, best_loss)
                best_epoch = np.where(improved, epoch, best_epoch)
                _keep_best(model, best_state, improved[workers.share(members)])
                rows.append(_curve_row(epoch, train_m, val_m))
                step = max(1, cfg.training.epochs // 20)  # a line for the first validated epoch of every 5 %
                if epoch == 1 or epoch // step != (epoch - cfg.training.validation_every) // step:
                    log(f"epoch {epoch:5d}/{cfg.training.epochs}  ensemble {validation_split} RMSE "
                        f"E {val_m.ensemble['rmse_e']:.2f} meV/atom, F {val_m.ensemble['rmse_f']:.1f} meV/Å",
                        echo=cfg.output.progress)
            if epoch % cfg.training.checkpoint_every == 0 or epoch == cfg.training.epochs:
                whole_best = _on_cpu(workers.gather_state(best_state, member_keys, members))
                whole_model = _on_cpu(workers.gather_state(model.state_dict(), member_keys, members))
                whole_optimizer = _on_cpu(workers.gather_optimizer_state(optimizer, members))
                if workers.main:
                    _write_curve(run_dir / "learning_curve.csv", rows, _monitored(monitor, train_cache))
                    _save_best(ensemble, whole_best, run_dir / "checkpoint_best.pt", best_epoch, best_loss)
                    save_checked({"epoch": epoch, "model": whole_model, "optimizer": whole_optimizer,
                                  "optimizer_name": cfg.optimizer.name, "selection": selection.state_dict(),
                                  "fingerprints": train_fingerprints, "best_state": whole_best,
                                  "best_loss": best_loss.tolist(), "best_epoch": best_epoch.tolist(), "rows": rows,
                                  "continue_from": None if continue_from is None else str(continue_from)},
                                 run_dir / "checkpoint_last.pt", keep_previous=True)
        ensemble.load_state_dict(workers.gather_state(best_state, member_keys, members))
        model = ensemble
        train_m, val_m = evaluate(model, train_cache, q, w_f), evaluate(model, validation_cache, q, w_f)
        test_set = data.split_subset("test")  # read once, after training: it chose nothing
        test_cache = _caches(cfg, {"test": test_set}, descriptor, dtype, workers, device)[0]
        test_m = evaluate(model, test_cache, q, w_f)
        extra_batches = {path: model_batch(model, s) for path, s in extra_sets.items()}
        extra = {path: evaluate(model, chunks(batch), q, w_f) for path, batch in extra_batches.items()}
        calibration = {path: uncertainty_report(model, batch, test_m.ensemble["rmse_e"], test_m.ensemble["rmse_f"])
                       for path, batch in extra_batches.items()}
        for path, report in calibration.items():
            log(f"{path}: {format_report(report)}", echo=False)
        continual = _continual_report(before, model, test_set, known_test, q, w_f, log) if carried else {}
        wall = time.perf_counter() - start_time
        result = TrainingResult(run_dir, train_m, val_m, test_m, best_epoch, wall, continual, validation_split, extra,
                                calibration)
        if workers.main:
            save_model(run_dir / "model.pt", model, {
                "validation_rmse_e": val_m.rmse_e.tolist(), "validation_rmse_f": val_m.rmse_f.tolist(),
                "validation_split": validation_split,
                "test_rmse_e": test_m.rmse_e.tolist(), "test_rmse_f": test_m.rmse_f.tolist(),
                "test_ensemble": test_m.ensemble, "best_epoch": best_epoch.tolist(), "config": dump_config(cfg),
                "min_pair_distance": closest_pair_distance(train_set, descriptor.cutoff)})
            atomic_write_text(run_dir / "metrics.json", json.dumps(_metrics_json(result), indent=2))
            if cfg.output.plots:
                _write_plots(model, rows, list(test_cache), run_dir)
        log(format_table(result), echo=False)
        workers.barrier()
        return result
    finally:
        log.close()
        for cache in (train_cache, validation_cache, test_cache):
            if isinstance(cache, DiskCache):
                cache.close()


def _caches(cfg: Config, sets: dict[str, StructureSet], descriptor: SymmetryFunctions, dtype: torch.dtype,
            workers: Workers, device: torch.device) -> list[MemoryCache | DiskCache]:
    """The descriptor caches of ``sets`` (split name: structures) that ``training.descriptor_cache``
    asks for; on disk, process 0 computes the files (or finds them from an earlier start) and the
    others wait."""
    if cfg.training.descriptor_cache == "memory":
        return [MemoryCache(compute_batch(s, descriptor, dtype), device) for s in sets.values()]

    def disk() -> list[DiskCache]:
        return [DiskCache.open(cfg.run_dir / f"descriptors_{split}.h5", s, descriptor, dtype, device=device)
                for split, s in sets.items()]

    if workers.main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        caches = disk()
    workers.barrier()
    if not workers.main:
        caches = disk()
    return caches


def _on_cpu(tree: Any) -> Any:
    """A state (nested dicts, lists and tensors) with every tensor on the CPU, for files."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_cpu(v) for v in tree)
    return tree


def _members_text(part: slice) -> str:
    return f"{part.start}" if part.stop - part.start == 1 else f"{part.start}–{part.stop - 1}"


def _fit_epoch(
    cfg: Config, model: HDNNPEnsemble, optimizer: torch.optim.Optimizer, selection: DataSelection,
    cache: MemoryCache | DiskCache, epoch: int, data_index: np.ndarray, log: RunLog,
    gather: Callable[[torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """Selection → optimizer step(s) → selection update from the fitted structures' losses
    (``gather`` completes the members' losses from this process's share of them).

    Returns (M,) whether each member's losses and gradients stayed finite; a step with a
    non-finite one is not taken, and the selection is not updated.
    """
    fitted = selection.select()
    in_memory = isinstance(cache, MemoryCache)
    kept = list(cache.select(fitted)) if in_memory else None
    totals = None if in_memory else (len(fitted), int((cache.offsets[fitted + 1] - cache.offsets[fitted]).sum()))
    for _ in range(cfg.training.steps_per_epoch):
        optimizer.zero_grad(set_to_none=True)
        loss, parts = 0.0, []
        for batch in kept or cache.select(fitted):  # pieces of the disk cache: gradients accumulate
            energies, forces = predict(model, batch)
            piece_loss, per_structure = member_losses(energies, forces, batch, cfg.training.energy_weight,
                                                      cfg.training.force_weight, totals)
            piece_loss.sum().backward()
            loss = loss + piece_loss.detach()
            parts.append(per_structure.detach())
        finite = gather(_finite_members(loss, model)).cpu().numpy()
        if not finite.all():
            return finite
        optimizer.step()
    per_structure = gather(torch.cat(parts, 1)).mean(0).cpu()
    for i in selection.update(fitted, per_structure, float(per_structure.mean())).tolist():
        log(f"epoch {epoch}: structure {int(data_index[i])} of {cfg.data.path} had an extreme error in "
            f"{cfg.selection.outlier_epochs} fits in a row (its reference data may be wrong)")
    return finite


def _finite_members(loss: torch.Tensor, model: HDNNPEnsemble) -> torch.Tensor:
    """(m,) whether each member's loss and every gradient entry are finite."""
    finite = torch.isfinite(loss.detach())
    for param in model.parameters():
        if param.grad is not None:
            finite &= torch.isfinite(param.grad).flatten(1).all(1)
    return finite


def _diverged(cfg: Config, epoch: int, attempt: int, finite: np.ndarray, log: RunLog) -> None:
    """Report a diverged epoch; ``LmlpError`` when the config says stop or the retries are used up."""
    t = cfg.training
    what = (f"epoch {epoch}: non-finite loss, gradient or test error in member(s) "
            f"{', '.join(map(str, np.flatnonzero(~finite)))}")
    if t.on_divergence == "stop" or attempt == t.divergence_retries:
        tried = "" if t.on_divergence == "stop" else f" after {attempt} step-size reductions"
        raise LmlpError(f"{what}{tried}: training diverged (the last checkpoint holds the state of an earlier "
                        f"epoch; lower optimizer.lr or change training.on_divergence)")
    log(f"{what}: epoch undone, retried with step sizes × {t.divergence_factor:g} "
        f"(retry {attempt + 1} of {t.divergence_retries})")


@dataclass
class _Snapshot:
    """Weights, optimizer state and selection state after the last good epoch (divergence guard)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    selection: dict[str, Any]

    @classmethod
    def take(cls, model: HDNNPEnsemble, optimizer: torch.optim.Optimizer, selection: DataSelection) -> _Snapshot:
        return cls({k: v.detach().clone() for k, v in model.state_dict().items()},
                   copy.deepcopy(optimizer.state_dict()), selection.state_dict())

    def restore(self, model: HDNNPEnsemble, optimizer: torch.optim.Optimizer, selection: DataSelection,
                factor: float) -> None:
        """Put the snapshot back with every learning rate and step size (and step-size bound)
        × ``factor``; the snapshot itself takes the lowered values, for further retries."""
        for group in self.optimizer["param_groups"]:
            group["lr"] *= factor
            if "step_sizes" in group:
                low, high = group["step_sizes"]
                group["step_sizes"] = (min(low, high * factor), high * factor)
        for state in self.optimizer["state"].values():
            if "step_size" in state:
                state["step_size"] = state["step_size"] * factor
        model.load_state_dict(self.model)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        selection.load_state_dict(self.selection)


def _monitored(monitor: MemoryCache | DiskCache, train: MemoryCache | DiskCache) -> str:
    """What the per-epoch training metrics cover, for the learning-curve header."""
    n, total = len(monitor), len(train)
    return f"all {total} training structures" if n == total else f"a fixed random sample of {n} of {total} training structures"


def _monitor(cfg: Config, train: MemoryCache | DiskCache) -> MemoryCache | DiskCache:
    """The training structures of the per-epoch metrics: all, or a fixed random sample (in memory)."""
    n, size = len(train), cfg.training.train_metrics_sample
    if size is None or size >= n:
        return train
    generator = torch.Generator().manual_seed(cfg.training.seed + 1)
    sample = torch.sort(torch.randperm(n, generator=generator)[:size]).values
    return MemoryCache(Batch.cat(list(train.select(sample))))


def _carry_over(cfg: Config, path: Path, warn: Callable[[str], None]) -> _Carried:
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
    checkpoint_path = path.parent / "checkpoint_last.pt"
    return _Carried(model, _load_checkpoint(checkpoint_path, warn) if checkpoint_path.is_file() else None)


def _add_new_elements(model: HDNNPEnsemble, train_set: StructureSet) -> None:
    """Networks for elements of ``train_set`` the model does not know, E_ref fitted on ``train_set``."""
    known = dict(zip(model.elements.tolist(), model.reference_energies.tolist()))
    new = sorted(set(train_set.numbers.tolist()) - set(known))
    if new:
        e_ref = fit_reference_energies(train_set.numbers, train_set.offsets, train_set.energy, new, known)
        model.add_elements(new, torch.from_numpy(e_ref))


def _carried_optimizer(cfg: Config, model: HDNNPEnsemble, saved: dict[str, Any], workers: Workers,
                       members: int) -> torch.optim.Optimizer:
    """The optimizer with the earlier run's state for the known element networks (this config's
    hyperparameters) and fresh groups for new elements; ``model`` holds this process's members."""
    if saved["optimizer_name"] != cfg.optimizer.name:
        raise LmlpError(f"the earlier run used the {saved['optimizer_name']} optimizer, this config "
                        f"{cfg.optimizer.name}; its state cannot carry over")
    n_known = len(saved["optimizer"]["param_groups"])
    optimizer = _optimizer(cfg, model.networks[:n_known])
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(workers.local_optimizer_state(saved["optimizer"], optimizer, members))
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)
    for group in _optimizer_groups(cfg, model.networks[n_known:]):
        optimizer.add_param_group(group)
    return optimizer


def _carry_selection(carried: _Carried, selection: DataSelection, train_fingerprints: torch.Tensor, log: RunLog) -> None:
    """Selection weights of the known structures (matched by content) from the earlier run."""
    saved = carried.checkpoint
    if saved is None:
        log("no checkpoint_last.pt beside the model: the optimizer and the selection start afresh")
        return
    old = {f: k for k, f in enumerate(saved["fingerprints"].tolist())}
    match = torch.tensor([old.get(f, -1) for f in train_fingerprints.tolist()], dtype=torch.int64)
    selection.carry_over(saved["selection"], match)
    log(f"continued from {len(old)} earlier training structures: {int((match >= 0).sum())} known and "
        f"{int((match < 0).sum())} new ones in this training set")


def _known_structures(model: HDNNPEnsemble, s: StructureSet) -> StructureSet:
    """The structures of ``s`` made only of elements ``model`` knows."""
    structure = np.repeat(np.arange(len(s)), np.diff(s.offsets))
    unknown = ~np.isin(s.numbers, model.elements.cpu().numpy())
    return s.subset(np.setdiff1d(np.arange(len(s)), structure[unknown]))


EARLIER = "known elements, all"
"""Report row of a continued run: every test structure the earlier model could already predict."""


def _continual_report(
    before: dict[str, Metrics], model: HDNNPEnsemble, test_set: StructureSet, known: StructureSet,
    q: float, w_f: float, log: RunLog,
) -> dict[str, dict]:
    """Ensemble test RMSEs per label, and over the ``known`` structures, before and after a
    continued run; logged as a table."""
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


def _save_best(model: HDNNPEnsemble, best_state: dict[str, torch.Tensor], path: Path, best_epoch: np.ndarray,
               best_loss: np.ndarray) -> None:
    """A model file with each member's best weights so far."""
    best = copy.deepcopy(model)
    best.load_state_dict(best_state)
    save_model(path, best, {"best_epoch": best_epoch.tolist(), "best_validation_loss": best_loss.tolist()})


def _write_plots(model: HDNNPEnsemble, rows: list[dict[str, float]], test_pieces: list[Batch], run_dir: Path) -> None:
    """learning_curves.png and parity_test.png (ensemble mean of the final model on the test set)."""
    from lmlp.plots import plot_learning_curves, plot_parity

    plot_learning_curves(rows, run_dir / "learning_curves.png")
    test_pieces = [p.to(torch.device("cpu")) for p in test_pieces]
    energies, forces = (t.cpu() for t in predict_all(model.cpu(), test_pieces))
    baseline = torch.cat([model.reference_baseline(p.numbers, p.offsets) for p in test_pieces])
    plot_parity(energies.mean(0).numpy(), torch.cat([p.energy for p in test_pieces]).numpy(), baseline.numpy(),
                torch.cat([p.n_atoms for p in test_pieces]).numpy(), forces.mean(0).numpy(),
                torch.cat([p.forces for p in test_pieces]).double().numpy(), run_dir / "parity_test.png")


def _load_checkpoint(path: Path, warn: Callable[[str], None]) -> dict:
    """The training state saved in ``path``, or in the previous checkpoint kept beside it when
    ``path`` is damaged (``warn`` is told); ``LmlpError`` when neither is readable."""
    if not path.is_file() and not previous_path(path).is_file():
        raise LmlpError(f"{path}: no checkpoint to resume from")
    return load_with_fallback(path, "checkpoint", warn)[0]


def _optimizer(cfg: Config, networks: torch.nn.ModuleList) -> torch.optim.Optimizer:
    """The configured optimizer over the element ``networks``."""
    return build_optimizer(cfg.optimizer.name, _optimizer_groups(cfg, networks), cfg.optimizer.lr,
                           **cfg.optimizer.params)


def _optimizer_groups(cfg: Config, networks: torch.nn.ModuleList) -> list[dict[str, Any]]:
    """One parameter group per element network (new elements of a continued run become new
    groups); CoRe freezes per member (member_dim 0 of the stacked tensors)."""
    extra = {"member_dim": 0} if cfg.optimizer.name == "core" else {}
    return [{"params": list(network.parameters()), **extra} for network in networks]


def _keep_best(model: HDNNPEnsemble, best: dict[str, torch.Tensor], improved: np.ndarray) -> None:
    """Copy the member slices of every stacked parameter whose member ``improved``."""
    members = torch.from_numpy(improved)
    for name, param in model.named_parameters():
        best[name][members.to(param.device)] = param.detach()[members.to(param.device)]


def _curve_row(epoch: int, train_m: Metrics, val_m: Metrics) -> dict[str, float]:
    row: dict[str, float] = {"epoch": epoch}
    for split, m in (("train", train_m), ("validation", val_m)):
        for key in ("rmse_e", "mae_e", "rmse_f", "mae_f"):
            row[f"{split}_{key}_ensemble"] = m.ensemble[key]
            for k, value in enumerate(getattr(m, key)):
                row[f"{split}_{key}_m{k}"] = float(value)
    return row


def _write_curve(path: Path, rows: list[dict[str, float]], monitored: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        fh.write(f"# energies meV/atom, forces meV/Angstrom; m<k> = ensemble member k; train columns over {monitored}\n")
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _metrics_json(result: TrainingResult) -> dict:
    return {"units": UNITS, "train": metrics_dict(result.train), "validation": metrics_dict(result.validation),
            "validation_split": result.validation_split, "test": metrics_dict(result.test),
            "extra_test": {path: metrics_dict(m) for path, m in result.extra_test.items()},
            "extra_test_uncertainty": {path: r.as_dict() for path, r in result.extra_test_uncertainty.items()},
            "best_epoch": result.best_epoch.tolist(), "wall_time_s": result.wall_time,
            **({"continual": result.continual} if result.continual else {})}


def _write_provenance(cfg: Config, run_dir: Path, continue_from: Path | None, model: HDNNPEnsemble,
                      workers: Workers) -> None:
    """Resolved config, seeds, versions, the data file's hash, the initial weights' hash, the
    model continued from and the number of processes."""
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    digest = hashlib.sha256(Path(cfg.data.path).read_bytes()).hexdigest()
    info = {"lmlp": lmlp.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "command": sys.argv,
            "seeds": {"ensemble": cfg.ensemble.seed, "training": cfg.training.seed},
            "data": {"path": cfg.data.path, "sha256": digest},
            "continued_from": None if continue_from is None else str(continue_from),
            "initial_weights_sha256": _weights_digest(model), "processes": workers.size}
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))


def _weights_digest(model: HDNNPEnsemble) -> str:
    """SHA-256 of the network weights (float64 bytes, in parameter order)."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().to(torch.float64).cpu().numpy().tobytes())
    return digest.hexdigest()


def format_table(result: TrainingResult) -> str:
    """The end-of-training table: ensemble and member mean ± std on train, validation, test and
    every independent test file."""
    sets = [("train", result.train), ("test", result.test)]
    if result.validation_split == "validation":
        sets.insert(1, ("validation", result.validation))
    sets += [(Path(path).stem, m) for path, m in result.extra_test.items()]
    width = max(22, *(len(name) + 10 for name, _ in sets))
    lines = [f"{'':{width}s}{'RMSE E / meV/atom':>20s}{'RMSE F / meV/Å':>18s}"]
    for split, m in sets:
        lines.append(f"{split + ' ensemble':{width}s}{m.ensemble['rmse_e']:20.2f}{m.ensemble['rmse_f']:18.1f}")
        lines.append(f"{split + ' members':{width}s}{m.rmse_e.mean():12.2f} ± {m.rmse_e.std():5.2f}"
                     f"{m.rmse_f.mean():10.1f} ± {m.rmse_f.std():5.1f}")
    lines.append(f"best epochs {result.best_epoch.tolist()}, wall time {result.wall_time:.0f} s, "
                 f"run directory {result.run_dir}")
    return "\n".join(lines)
