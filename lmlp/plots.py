"""PNG figures (matplotlib, no display): learning curves and parity plots of a training run,
accuracy scores and test-error curves of an optimizer comparison."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from lmlp.fileio import atomic_path  # noqa: E402


def plot_learning_curves(rows: list[dict[str, float]], path: Path) -> None:
    """Train and validation RMSE of the ensemble (lines) and the members (thin) versus epoch."""
    epochs = np.array([r["epoch"] for r in rows])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, unit in ((axes[0], "rmse_e", "meV/atom"), (axes[1], "rmse_f", "meV/Å")):
        for split, color in (("train", "tab:blue"), ("validation", "tab:orange")):
            members = [k for k in rows[0] if k.startswith(f"{split}_{key}_m")]
            for k in members:
                ax.plot(epochs, [r[k] for r in rows], color=color, alpha=0.25, lw=0.7)
            ax.plot(epochs, [r[f"{split}_{key}_ensemble"] for r in rows], color=color, lw=1.8,
                    label=f"{split} ensemble")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"RMSE {'E' if key == 'rmse_e' else 'F'} / {unit}")
        ax.legend()
    _save(fig, path)


def plot_parity(
    energy_pred: np.ndarray, energy_ref: np.ndarray, baseline: np.ndarray, n_atoms: np.ndarray,
    forces_pred: np.ndarray, forces_ref: np.ndarray, path: Path,
) -> None:
    """Predicted (ensemble mean) against reference: energy per atom and force components.

    Energies (S,) eV are shown per atom relative to ``baseline`` (S,) eV, the sum of the
    per-element reference energies, so structures of different composition share one scale.
    Forces (N, 3) eV/Å.
    """
    e_ref, e_pred = (energy_ref - baseline) / n_atoms, (energy_pred - baseline) / n_atoms
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), constrained_layout=True)
    panels = ((axes[0], e_ref, e_pred, "(E − Σ E_ref)/atom / eV/atom", 1000.0, "meV/atom"),
              (axes[1], forces_ref.ravel(), forces_pred.ravel(), "force component / eV/Å", 1000.0, "meV/Å"))
    for ax, ref, pred, label, scale, unit in panels:
        ax.scatter(ref, pred, s=2, alpha=0.4)
        lo, hi = min(ref.min(), pred.min()), max(ref.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        rmse = np.sqrt(np.mean((pred - ref) ** 2)) * scale
        ax.set_title(f"test set, RMSE {rmse:.2f} {unit}")
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"lMLP {label}")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_accuracy_scores(names: list[str], a: np.ndarray, da: np.ndarray, path: Path) -> None:
    """Bar chart of the overall accuracy score A with its uncertainty ΔA (CoRe paper Fig. 4)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(names) + 1.5), 4), constrained_layout=True)
    ax.bar(range(len(names)), a, yerr=da, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("accuracy score A")
    ax.set_ylim(0, 1.05 * max(1.0, float(np.max(a + da))))
    _save(fig, path)


def plot_comparison_curves(curves: dict[str, tuple[list, list, list]], path: Path) -> None:
    """Validation RMSE of E and F versus epoch, mean over seeds with a ± std band, per variant (CoRe paper Fig. 5).

    ``curves`` maps a variant name to its validated epochs and the (E, F) lists of their (mean, std).
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, (epochs, *series) in curves.items():
        for ax, values in zip(axes, series):
            mean, std = np.array(values).T
            ax.plot(epochs, mean, lw=1.5, label=name)
            ax.fill_between(epochs, np.maximum(mean - std, 0.05 * mean), mean + std, alpha=0.25)
    for ax, label in zip(axes, ("validation RMSE E / meV/atom", "validation RMSE F / meV/Å")):
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
    _save(fig, path)
