"""The run's messages: ``train.log`` and the terminal, with a progress bar on a terminal."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from lmlp.metrics import Metrics


class RunLog:
    """Messages to the terminal and to ``path``; a progress bar on a terminal. ``quiet``: the
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
