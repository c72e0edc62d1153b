"""Small labelled structure sets made on the fly, for tests (importable as ``factories``)."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lmlp.config import Config, config_from_dict
from lmlp.data import StructureSet, stratified_split
from lmlp.modelfile import load_model
from lmlp.train import rundir

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "sn2_tiny.h5"


def random_molecules(n: int = 20, seed: int = 0, sizes: tuple[int, ...] = (6, 7)) -> StructureSet:
    """``n`` random molecules of the given sizes (C, H, F, Cl, Br, I) with random labels.

    Atoms sit on a jittered grid, so no two are closer than 1 Å.
    """
    rng = np.random.default_rng(seed)
    counts = rng.choice(sizes, size=n)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3) * 1.6
    positions = np.concatenate(
        [grid[rng.permutation(len(grid))[:c]] + rng.uniform(-0.2, 0.2, (c, 3)) for c in counts]
    )
    total = int(counts.sum())
    s = StructureSet(
        numbers=rng.choice([1, 6, 9, 17, 35, 53], size=total),
        positions=positions,
        forces=rng.normal(size=(total, 3)),
        offsets=np.concatenate([[0], np.cumsum(counts)]),
        energy=rng.normal(-300.0, 10.0, size=n),
        charge=np.full(n, -1),
        label=rng.choice(["F+CH3Cl", "Cl+CH3F", "Br+CH3I"], size=n),
        attrs={"method": "random", "program": "tests", "program_version": "0"},
    )
    s.split = stratified_split(s.label, 0.2, seed)
    return s


def assert_sets_equal(a: StructureSet, b: StructureSet) -> None:
    """Exact equality of every array, the split and the cell/pbc/trajectory presence."""
    for name in ("numbers", "positions", "forces", "offsets", "energy", "charge", "label"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.cell is None) == (b.cell is None)
    if a.cell is not None:
        np.testing.assert_array_equal(a.cell, b.cell)
        np.testing.assert_array_equal(a.pbc, b.pbc)
    assert (a.trajectory is None) == (b.trajectory is None)
    if a.trajectory is not None:
        np.testing.assert_array_equal(a.trajectory, b.trajectory)
    assert sorted(a.split) == sorted(b.split)
    for name in a.split:
        np.testing.assert_array_equal(a.split[name], b.split[name])


def kill_at_random_moments(command: Callable[[], list[str]], run_dir: Path, seed: int, kills: int = 3,
                           after_kill: Callable[[], None] = lambda: None) -> None:
    """Run ``command()`` ``kills`` times, each killed by SIGKILL at a random moment (0–2 s) after it
    starts writing to a ``train.log`` under ``run_dir``, then once to its end (which must succeed)."""
    rng = random.Random(seed)

    def logged() -> dict[Path, int]:
        return {p: p.stat().st_size for p in run_dir.rglob("train.log")}

    for kill in [True] * kills + [False]:
        before = logged()
        process = subprocess.Popen(command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while process.poll() is None and logged() == before:
            assert time.monotonic() < deadline, "the command wrote no log line within 120 s"
            time.sleep(0.02)
        if kill:
            time.sleep(rng.uniform(0.0, 2.0))
            process.send_signal(signal.SIGKILL)
        assert process.wait() in ((-signal.SIGKILL, 0) if kill else (0,)), process.stderr.read()
        if kill:
            after_kill()


def tiny_config(run_dir: Path, reactions: list[str] | None = None, **training) -> Config:
    """A 30-epoch run of 3 members of 16-16 neurons (CoRe, p_frozen 0.1) on the tiny SN2 set;
    ``training`` overrides keys of the training section."""
    return config_from_dict({
        "name": "tiny",
        "data": {"path": str(TINY), "reactions": reactions},
        "ensemble": {"members": 3},
        "model": {"hidden": [16, 16]},
        "selection": {"fit_fraction": 0.5},
        "training": {"epochs": 30, "checkpoint_every": 10, **training},
        "optimizer": {"name": "core", "lr": 0.01, "params": {"p_frozen": 0.1}},
        "output": {"run_dir": str(run_dir), "progress": False},
    })


def assert_same_weights(a: Path, b: Path) -> None:
    """Bitwise equality of the weights of two model files."""
    x, _ = load_model(a)
    y, _ = load_model(b)
    assert x.state_dict().keys() == y.state_dict().keys()
    for (name, u), v in zip(x.state_dict().items(), y.state_dict().values()):
        torch.testing.assert_close(u, v, rtol=0, atol=0, msg=name)


def crash_at(monkeypatch, epoch: int) -> Callable[[], None]:
    """Make training stop with KeyboardInterrupt when it records validated epoch ``epoch`` (a kill
    between two checkpoints); returns the function that undoes this."""
    original = rundir.curve_row

    def crash(at, *args):
        if at == epoch:
            raise KeyboardInterrupt
        return original(at, *args)

    monkeypatch.setattr(rundir, "curve_row", crash)
    return lambda: monkeypatch.setattr(rundir, "curve_row", original)
