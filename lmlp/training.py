"""Training an HDNNP ensemble (spec §4): cached descriptors, selection, optimizer steps, metrics.

Per epoch: lADS draws the structures to fit → one optimizer step per ``steps_per_epoch`` on the loss

    L_m = q² · mean_s ((E_ms − E_s)/N_s)² + w_F · mean over force components (F_m − F)²

summed over members m (members are independent) → energy and force RMSE / MAE per member and for
the ensemble mean on the training and test structures. Each member keeps the weights of its epoch
with the lowest test loss (early stopping). Energies eV, forces eV/Å; reported metrics meV/atom
and meV/Å.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import lmlp
from lmlp.config import Config, dump_config
from lmlp.data import StructureSet, load
from lmlp.descriptors import CentreDerivatives, Standardizer, SymmetryFunctions
from lmlp.errors import LmlpError
from lmlp.fileio import atomic_path, atomic_write_text
from lmlp.model import HDNNPEnsemble, fit_reference_energies
from lmlp.modelfile import save_model
from lmlp.optim import build_optimizer
from lmlp.selection import DataSelection

UNITS = {"energy": "meV/atom", "forces": "meV/Angstrom"}
"""Units of every reported metric."""

STRUCTURES_PER_CHUNK = 500
"""Structures per descriptor computation (bounds temporaries, keeps the cache-friendly size)."""


@dataclass
class Batch:
    """Descriptors and labels of a set of structures, ready for the model.

    Attributes:
        numbers: (N,) atomic numbers. offsets: (S + 1,) atom offsets.
        G: (N, F) descriptors. derivatives: dG/dR grouped by centre atom.
        energy: (S,) float64 reference energies, eV. forces: (N, 3) reference forces, eV/Å.
    """

    numbers: torch.Tensor
    offsets: torch.Tensor
    G: torch.Tensor
    derivatives: CentreDerivatives
    energy: torch.Tensor
    forces: torch.Tensor

    @property
    def n_atoms(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def structure_of_atom(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(self.energy)), self.n_atoms)

    def select(self, indices: torch.Tensor) -> Batch:
        """The structures ``indices`` (sorted), with atom indices renumbered."""
        keep = torch.zeros(len(self.energy), dtype=torch.bool)
        keep[indices] = True
        atom_keep = keep[self.structure_of_atom]
        new_atom = torch.cumsum(atom_keep, 0) - 1
        atoms = torch.nonzero(atom_keep).flatten()
        return Batch(
            numbers=self.numbers[atoms],
            offsets=torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(self.n_atoms[indices], 0)]),
            G=self.G[atoms],
            derivatives=self.derivatives.select(atoms, new_atom),
            energy=self.energy[indices],
            forces=self.forces[atoms],
        )


def compute_batch(s: StructureSet, descriptor: SymmetryFunctions, dtype: torch.dtype) -> Batch:
    """Descriptors and derivatives of every structure of ``s``, computed once in chunks."""
    G_parts, derivative_parts, starts = [], [], []
    for start in range(0, len(s), STRUCTURES_PER_CHUNK):
        part = s.subset(np.arange(start, min(start + STRUCTURES_PER_CHUNK, len(s))))
        numbers, offsets = torch.from_numpy(part.numbers), torch.from_numpy(part.offsets)
        G, d = descriptor.with_derivatives(numbers, torch.from_numpy(part.positions).to(dtype), offsets)
        G_parts.append(G)
        derivative_parts.append(d.by_centre(len(numbers)))
        starts.append(int(s.offsets[start]))
    return Batch(
        numbers=torch.from_numpy(s.numbers),
        offsets=torch.from_numpy(s.offsets),
        G=torch.cat(G_parts),
        derivatives=CentreDerivatives.cat(derivative_parts, starts),
        energy=torch.from_numpy(s.energy),
        forces=torch.from_numpy(s.forces).to(dtype),
    )


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


def predict(model: HDNNPEnsemble, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies (M, S) eV and forces (M, N, 3) eV/Å of every member (differentiable in the weights
    unless grad mode is off)."""
    return model.from_descriptors(batch.G, batch.derivatives, batch.numbers, batch.offsets)


def member_losses(
    energies: torch.Tensor, forces: torch.Tensor, batch: Batch, q: float, w_f: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss per member (M,) and loss per member and structure (M, S) (spec §4)."""
    n = batch.n_atoms.to(forces.dtype)
    de = ((energies - batch.energy) / batch.n_atoms).to(forces.dtype)  # difference in float64
    df2 = ((forces - batch.forces) ** 2).sum(-1)
    per_structure_f = torch.zeros_like(de).index_add_(1, batch.structure_of_atom, df2) / (3 * n)
    per_structure = q**2 * de**2 + w_f * per_structure_f
    total = q**2 * (de**2).mean(1) + w_f * df2.sum(1) / (3 * len(batch.numbers))
    return total, per_structure


def chunks(batch: Batch) -> list[Batch]:
    """``batch`` cut into pieces of ``STRUCTURES_PER_CHUNK`` structures (for evaluation)."""
    n = len(batch.energy)
    return [batch.select(torch.arange(a, min(a + STRUCTURES_PER_CHUNK, n))) for a in range(0, n, STRUCTURES_PER_CHUNK)]


def predict_all(model: HDNNPEnsemble, pieces: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies (M, S) eV and forces (M, N, 3) eV/Å of every member over all ``pieces``, float64."""
    with torch.no_grad():
        predictions = [predict(model, piece) for piece in pieces]
    return torch.cat([e.double() for e, _ in predictions], 1), torch.cat([f.double() for _, f in predictions], 1)


def evaluate(model: HDNNPEnsemble, pieces: list[Batch], q: float, w_f: float) -> Metrics:
    """Metrics of every member and of the ensemble mean over the structures of ``pieces``."""
    energies, forces = predict_all(model, pieces)
    reference_e = torch.cat([p.energy for p in pieces])
    reference_f = torch.cat([p.forces for p in pieces]).double()
    n_atoms = torch.cat([p.n_atoms for p in pieces])
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


@dataclass
class TrainingResult:
    """What ``train`` produced: the run directory, final metrics and the wall time in s."""

    run_dir: Path
    train: Metrics
    test: Metrics
    best_epoch: np.ndarray
    wall_time: float


def load_training_data(cfg: Config) -> StructureSet:
    """The configured structures (reaction filter, size cap) with a train/test split."""
    s, problems = load(cfg.data.path, on_invalid=cfg.data.on_invalid)
    for p in problems:
        print(f"{cfg.data.path}: skipped structure {p.index}: {p.reason}", flush=True)
    if not {"train", "test"} <= set(s.split):
        raise LmlpError(f"{cfg.data.path}: needs a stored train/test split (lmlp data convert makes one)")
    keep = np.ones(len(s), dtype=bool)
    if cfg.data.reactions is not None:
        unknown = set(cfg.data.reactions) - set(s.label.tolist())
        if unknown:
            raise LmlpError(f"data.reactions: {sorted(unknown)} not in {cfg.data.path}")
        keep &= np.isin(s.label.astype(str), cfg.data.reactions)
    if cfg.data.max_structures is not None:
        keep &= np.cumsum(keep) <= cfg.data.max_structures
    if keep.all():
        return s
    new_index = np.cumsum(keep) - 1
    split = {k: new_index[v[keep[v]]] for k, v in s.split.items()}
    subset = s.subset(np.flatnonzero(keep))
    subset.split = split
    return subset


def build_model(cfg: Config, train: StructureSet, batch_G: torch.Tensor, descriptor: SymmetryFunctions) -> HDNNPEnsemble:
    """A new ensemble with standardisation and reference energies fitted on the training set."""
    elements = sorted(set(train.numbers.tolist()))
    e_ref = torch.from_numpy(fit_reference_energies(train.numbers, train.offsets, train.energy, elements))
    return HDNNPEnsemble(descriptor, Standardizer.fit(batch_G.double()), elements, e_ref,
                         hidden=cfg.model.hidden, activation=cfg.model.activation,
                         members=cfg.ensemble.members, seed=cfg.ensemble.seed)


def train(cfg: Config, resume: bool = False) -> TrainingResult:
    """Train the ensemble ``cfg`` describes and write the run directory.

    Runs with torch's deterministic algorithms (multi-threaded ``index_add_`` otherwise sums in a
    varying order), so a run is bitwise reproducible. With ``resume`` the run continues from
    ``checkpoint_last.pt`` in the run directory; as every random stream is in the checkpoint, it
    ends with the same weights as an uninterrupted run.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, resume)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(cfg: Config, resume: bool) -> TrainingResult:
    """``train`` under deterministic algorithms."""
    start_time = time.perf_counter()
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    dtype = getattr(torch, cfg.training.dtype)
    data = load_training_data(cfg)
    train_set, test_set = data.split_subset("train"), data.split_subset("test")
    if len(train_set) == 0 or len(test_set) == 0:
        raise LmlpError(f"{cfg.data.path}: the train and test splits must both be non-empty")
    elements = sorted(set(data.numbers.tolist()))
    descriptor = SymmetryFunctions.from_config(cfg.descriptor, elements)
    train_batch = compute_batch(train_set, descriptor, dtype)
    test_batch = compute_batch(test_set, descriptor, dtype)
    train_pieces, test_pieces = chunks(train_batch), chunks(test_batch)
    model = build_model(cfg, train_set, train_batch.G, descriptor).to(dtype)

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_provenance(cfg, run_dir)
    optimizer = _optimizer(cfg, model)
    selection = DataSelection(cfg.selection, len(train_set), cfg.training.seed)
    q, w_f = cfg.training.energy_weight, cfg.training.force_weight
    best_loss = np.full(cfg.ensemble.members, np.inf)
    best_epoch = np.zeros(cfg.ensemble.members, dtype=int)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows: list[dict[str, float]] = []
    first_epoch = 1
    checkpoint = run_dir / "checkpoint_last.pt"
    if resume:
        saved = _load_checkpoint(checkpoint)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        selection.load_state_dict(saved["selection"])
        best_state, rows = saved["best_state"], saved["rows"]
        best_loss, best_epoch = np.array(saved["best_loss"]), np.array(saved["best_epoch"])
        first_epoch = saved["epoch"] + 1
    for epoch in range(first_epoch, cfg.training.epochs + 1):
        fitted = selection.select()
        batch = train_batch.select(fitted)
        for _ in range(cfg.training.steps_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            energies, forces = predict(model, batch)
            loss, per_structure = member_losses(energies, forces, batch, q, w_f)
            loss.sum().backward()
            optimizer.step()
        per_structure = per_structure.detach().mean(0)
        outliers = selection.update(fitted, per_structure, float(per_structure.mean()))
        for i in outliers.tolist():
            print(f"epoch {epoch}: structure {int(data.split['train'][i])} of {cfg.data.path} had an extreme "
                  f"error in {cfg.selection.outlier_epochs} fits in a row (its reference data may be wrong)",
                  flush=True)
        train_m, test_m = evaluate(model, train_pieces, q, w_f), evaluate(model, test_pieces, q, w_f)
        improved = test_m.loss < best_loss if cfg.training.early_stopping else np.ones_like(best_loss, bool)
        best_loss = np.where(improved, test_m.loss, best_loss)
        best_epoch = np.where(improved, epoch, best_epoch)
        _keep_best(model, best_state, improved)
        rows.append(_curve_row(epoch, train_m, test_m))
        if cfg.output.progress and (epoch % max(1, cfg.training.epochs // 20) == 0 or epoch == 1):
            print(f"epoch {epoch:5d}/{cfg.training.epochs}  ensemble test RMSE E "
                  f"{test_m.ensemble['rmse_e']:.2f} meV/atom, F {test_m.ensemble['rmse_f']:.1f} meV/Å", flush=True)
        if epoch % cfg.training.checkpoint_every == 0 or epoch == cfg.training.epochs:
            _write_curve(run_dir / "learning_curve.csv", rows)
            with atomic_path(checkpoint) as tmp:
                torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "selection": selection.state_dict(), "best_state": best_state,
                            "best_loss": best_loss.tolist(), "best_epoch": best_epoch.tolist(), "rows": rows}, tmp)
    model.load_state_dict(best_state)
    train_m, test_m = evaluate(model, train_pieces, q, w_f), evaluate(model, test_pieces, q, w_f)
    wall = time.perf_counter() - start_time
    save_model(run_dir / "model.pt", model, {"test_rmse_e": test_m.rmse_e.tolist(),
                                             "test_rmse_f": test_m.rmse_f.tolist(),
                                             "best_epoch": best_epoch.tolist(), "config": dump_config(cfg)})
    atomic_write_text(run_dir / "metrics.json", json.dumps(_metrics_json(train_m, test_m, best_epoch, wall), indent=2))
    if cfg.output.plots:
        _write_plots(model, rows, test_pieces, run_dir)
    return TrainingResult(run_dir, train_m, test_m, best_epoch, wall)


def _write_plots(model: HDNNPEnsemble, rows: list[dict[str, float]], test_pieces: list[Batch], run_dir: Path) -> None:
    """learning_curves.png and parity_test.png (ensemble mean of the final model on the test set)."""
    from lmlp.plots import plot_learning_curves, plot_parity

    plot_learning_curves(rows, run_dir / "learning_curves.png")
    energies, forces = predict_all(model, test_pieces)
    baseline = torch.cat([model.reference_baseline(p.numbers, p.offsets) for p in test_pieces])
    plot_parity(energies.mean(0).numpy(), torch.cat([p.energy for p in test_pieces]).numpy(), baseline.numpy(),
                torch.cat([p.n_atoms for p in test_pieces]).numpy(), forces.mean(0).numpy(),
                torch.cat([p.forces for p in test_pieces]).double().numpy(), run_dir / "parity_test.png")


def _load_checkpoint(path: Path) -> dict:
    """The training state saved in ``path``; ``LmlpError`` when it is missing or unreadable."""
    if not path.is_file():
        raise LmlpError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise LmlpError(f"{path}: unreadable checkpoint (truncated or corrupted?): {type(exc).__name__}") from None


def _optimizer(cfg: Config, model: HDNNPEnsemble) -> torch.optim.Optimizer:
    """The configured optimizer; CoRe freezes per member (member_dim 0 of stacked tensors)."""
    params: list = list(model.parameters())
    if cfg.optimizer.name == "core":
        params = [{"params": params, "member_dim": 0}]
    return build_optimizer(cfg.optimizer.name, params, cfg.optimizer.lr, **cfg.optimizer.params)


def _keep_best(model: HDNNPEnsemble, best: dict[str, torch.Tensor], improved: np.ndarray) -> None:
    """Copy the member slices of every stacked parameter whose member ``improved``."""
    members = torch.from_numpy(improved)
    for name, param in model.named_parameters():
        best[name][members] = param.detach()[members]


def _curve_row(epoch: int, train_m: Metrics, test_m: Metrics) -> dict[str, float]:
    row: dict[str, float] = {"epoch": epoch}
    for split, m in (("train", train_m), ("test", test_m)):
        for key in ("rmse_e", "mae_e", "rmse_f", "mae_f"):
            row[f"{split}_{key}_ensemble"] = m.ensemble[key]
            for k, value in enumerate(getattr(m, key)):
                row[f"{split}_{key}_m{k}"] = float(value)
    return row


def _write_curve(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        fh.write("# energies meV/atom, forces meV/Angstrom; m<k> = ensemble member k\n")
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _metrics_json(train_m: Metrics, test_m: Metrics, best_epoch: np.ndarray, wall: float) -> dict:
    return {"units": UNITS, "train": _metrics_dict(train_m), "test": _metrics_dict(test_m),
            "best_epoch": best_epoch.tolist(), "wall_time_s": wall}


def _metrics_dict(m: Metrics) -> dict:
    return {"ensemble": m.ensemble,
            "members": {k: getattr(m, k).tolist() for k in ("rmse_e", "mae_e", "rmse_f", "mae_f")}}


def _write_provenance(cfg: Config, run_dir: Path) -> None:
    """Resolved config, seeds, versions and the data file's hash."""
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    digest = hashlib.sha256(Path(cfg.data.path).read_bytes()).hexdigest()
    info = {"lmlp": lmlp.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "seeds": {"ensemble": cfg.ensemble.seed,
                                                           "training": cfg.training.seed},
            "data": {"path": cfg.data.path, "sha256": digest}}
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))


def format_table(result: TrainingResult) -> str:
    """The end-of-training table: ensemble and member mean ± std, train and test."""
    lines = [f"{'':22s}{'RMSE E / meV/atom':>20s}{'RMSE F / meV/Å':>18s}"]
    for split, m in (("train", result.train), ("test", result.test)):
        lines.append(f"{split + ' ensemble':22s}{m.ensemble['rmse_e']:20.2f}{m.ensemble['rmse_f']:18.1f}")
        lines.append(f"{split + ' members':22s}{m.rmse_e.mean():12.2f} ± {m.rmse_e.std():5.2f}"
                     f"{m.rmse_f.mean():10.1f} ± {m.rmse_f.std():5.1f}")
    lines.append(f"best epochs {result.best_epoch.tolist()}, wall time {result.wall_time:.0f} s, "
                 f"run directory {result.run_dir}")
    return "\n".join(lines)


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
    return {"units": UNITS, "subsets": {name: _metrics_dict(m) for name, m in results.items()}}
