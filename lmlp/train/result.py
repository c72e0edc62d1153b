"""What a training run produced, and its end-of-training table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmlp.metrics import Metrics
from lmlp.uncertainty import UncertaintyReport


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


def format_table(result: TrainingResult) -> str:
    """The end-of-training table: ensemble and member mean ± std on train, validation, test and
    every independent test file (E meV/atom, F meV/Å)."""
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
