"""MACE (mace-torch 0.3.16) on lmlp's SN2 data: a side-by-side peer of the lmlp full protocol.

Run everything with the peers venv's Python (``bash benchmarks/peers/setup.sh`` makes it), from
the repository root::

    P=benchmarks/peers/.venv/bin/python
    $P benchmarks/peers/mace_sn2.py export                       # HDF5 -> extxyz, benchmarks/peers/work/
    $P benchmarks/peers/mace_sn2.py calibrate                    # optional: re-measure s/epoch here
    $P benchmarks/peers/mace_sn2.py train --budget-minutes 9 --name budget9
    $P benchmarks/peers/mace_sn2.py train --budget-minutes 25 --name budget25
    $P benchmarks/peers/mace_sn2.py evaluate --model benchmarks/peers/work/runs/budget9/budget9.model
    $P benchmarks/peers/mace_sn2.py evaluate --model benchmarks/peers/work/runs/budget25/budget25_stagetwo.model

Subcommands:

``export``
    Writes ``work/{train,validation,test}.xyz`` (the stored splits of ``data/sn2_gfn2xtb.h5``) and
    ``work/independent.xyz`` (every structure of ``data/sn2_gfn2xtb_independent.h5``) as extxyz:
    energy in ``info["REF_energy"]`` (eV), forces in ``arrays["REF_forces"]`` (eV/Å), the total
    charge in ``info["total_charge"]`` (e; always -1 for these anions; MACE 0.3.16 reads the key
    but a plain MACE model does not use it), plus ``label``, ``trajectory`` and ``split``.

``train --budget-minutes M --name NAME``
    Runs ``mace_run_train`` (``python -m mace.cli.run_train`` of this venv) in
    ``work/runs/NAME/`` on ``train.xyz`` with ``validation.xyz`` as ``--valid_file`` (so MACE
    carves no validation set of its own out of the training set) and ``test.xyz`` as
    ``--test_file``, with the settings of ``MACE_SETTINGS`` (a small molecular MACE: 64 channels,
    L = 0, correlation order 3, r_max = 12 Å like lmlp's cutoff, 2 interactions, batch 10,
    lr 0.01, energy weight 1, force weight 100 with MACE's stage two (``--swa``: the last quarter of
    the epochs at energy weight 1000 and lr 1e-3), E0s by least squares (``average``), EMA 0.99,
    AMSGrad, ReduceLROnPlateau patience 5, float32 on the CPU, seed 0). The number of epochs
    fills the budget::

        epochs = max(1, floor((60 * M - overhead_s) / seconds_per_epoch))
        seconds_per_epoch = TRAIN_S_PER_STRUCTURE * n_train + VALID_PASS_S

    ``seconds_per_epoch`` is one training pass plus one validation pass (MACE validates every
    epoch); ``overhead_s`` is everything else: Python's start-up, MACE's set-up (reading the data,
    E0s, building the model), the initial validation of the untrained model (with the warm-up of
    the first calls), the first epoch's warm-up, reloading and saving the model, and MACE's final
    error tables over train (all 7,204), validation and test.

    Measured here, under ``nice -n 19`` while another job was using both cores (MACE got about one
    core), so pessimistic for a quiet machine:

    * ``calibrate`` as first run, ``--max_num_epochs 1`` on 300 random training structures with
      the full validation (894) and test (888) sets: wall 225 s (217 s user CPU), of which set-up
      14 s, initial validation 64 s, epoch 0 32.6 s, final tables 33.5 s (train, 300) + 17.3 s
      (validation) + 12.3 s (test), end-of-run plot 41 s (now switched off, ``--plot False``).
    * the smoke run, 2 epochs on 200 training structures with 100 validation structures: epoch 1
      (past the warm-up) 8.33 s = training pass 6.62 s + validation pass 1.71 s, so
      0.0331 s per training structure; epoch 0 took 2.5 s longer (warm-up).

    Hence epoch 0 of the first run = 300 * 0.0331 s (9.9 s) + validation 17.3 s + 5.4 s warm-up,
    and the built-in constants (``work/calibration.json`` from a new ``calibrate`` replaces them)::

        TRAIN_S_PER_STRUCTURE = 0.0331 s, VALID_PASS_S = 17.3 s
        OVERHEAD_S = 8 (start-up) + 14 (set-up) + 64 (initial validation) + 5 (warm-up) + 2 (saving)
                     + 33.5 + 0.0166 * 6904 (train table grown to 7,204) + 17 + 12 = 272 s
        -> full training set: 0.0331 * 7204 + 17.3 = 256 s per epoch (721 steps of batch 10)
        -> 7 min budget:  floor((420 - 272) / 256) = 0 -> 1 epoch (about 8.8 min: over budget)
        -> 25 min budget: floor((1500 - 272) / 256) = 4 epochs (about 21.6 min)

    ``--seconds-per-epoch`` and ``--overhead-seconds`` override the measured numbers,
    ``--epochs`` skips the budget, ``--max-train N`` trains on a random N of the training
    structures (seed 0; smoke tests), in which case the default s/epoch is scaled to N;
    ``--max-valid N`` and ``--max-test N`` do the same to the validation and test files (smoke
    tests only: the benchmark validates and tests on the full splits).
    The run's settings, epochs, wall time and its own per-epoch timings (from MACE's log) go to
    ``work/runs/NAME/train_info.json``.

``calibrate``
    The short timing run behind the constants above: ``train --max-train 300 --epochs 2`` (the
    full validation and test sets), then writes ``work/calibration.json`` and prints the
    per-structure training time, the validation pass, the overhead and the extrapolation to the
    full training set (``derive_calibration``). About 4 min of wall time on this machine.

``evaluate --model PATH``
    Loads the model with ``mace.calculators.MACECalculator`` (CPU, in the dtype it was trained
    in) and computes, for the single model (no ensemble): energy-per-atom RMSE/MAE (meV/atom)
    and force-component RMSE/MAE (meV/Å) on the test split, on the independent set, and on each
    part of the independent set (trajectory id % 10: relaxed scan, displaced copies, MD at 500,
    750 and 1000 K). Everything runs with ``torch.set_num_threads(1)`` (with two threads on
    a machine whose cores are busy, a 6-atom call was 4x slower: 127 ms against 32 ms). Then the
    speed of energy + force calls through the ASE calculator: (a) the first test structure (6 atoms), (b) 16 test structures
    on a 4 x 4 grid 8 Å apart in one non-periodic Atoms (96 atoms; with r_max = 12 Å the
    complexes see each other, so this times a dense 96-atom graph), each call after a small
    random displacement (0.001 Å rms) so that nothing is cached; reported in calls/s. Writes
    everything to ``examples/results/peers/mace_NAME.json`` (NAME from the model file) and
    prints a table, with lmlp's full-protocol ensemble (the ``baseline`` line of
    ``examples/results/accuracy/experiments.jsonl``, where present) beside it.

Units: energies eV, forces eV/Å, lengths Å in the data; errors meV/atom and meV/Å; times s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORK = HERE / "work"
RUNS = WORK / "runs"
RESULTS = REPO / "examples" / "results" / "peers"
DATA = REPO / "data" / "sn2_gfn2xtb.h5"
INDEPENDENT = REPO / "data" / "sn2_gfn2xtb_independent.h5"
LMLP_EXPERIMENTS = REPO / "examples" / "results" / "accuracy" / "experiments.jsonl"

SPLITS = ("train", "validation", "test")
PARTS = {0: "relaxed scan", 1: "displaced copies", 2: "MD 500 K", 3: "MD 750 K", 4: "MD 1000 K"}
"""Part of the independent set by ``trajectory % 10`` (as ``lmlp.reference.sn2.INDEPENDENT_PARTS``)."""

ENERGY_KEY = "REF_energy"
FORCES_KEY = "REF_forces"
CHARGE_KEY = "total_charge"
DTYPE = "float32"
SEED = 0

MACE_SETTINGS: list[str] = [
    "--model", "MACE",
    "--num_channels", "64",
    "--max_L", "0",
    "--correlation", "3",
    "--r_max", "12.0",
    "--num_interactions", "2",
    "--batch_size", "10",
    "--valid_batch_size", "20",
    "--lr", "0.01",
    "--energy_weight", "1",
    "--forces_weight", "100",
    "--swa",  # stage two (MACE's recipe): the last quarter of the epochs with energy weight 1000, lr 1e-3
    "--E0s", "average",
    "--ema",
    "--ema_decay", "0.99",
    "--amsgrad",
    "--scheduler_patience", "5",
    "--device", "cpu",
    "--default_dtype", DTYPE,
    "--seed", str(SEED),
    "--energy_key", ENERGY_KEY,
    "--forces_key", FORCES_KEY,
    "--total_charge_key", CHARGE_KEY,
    "--plot", "False",  # no end-of-run plot: it re-evaluates every set and changes no result
]
"""MACE's command-line settings (all checked against ``mace_run_train --help`` of 0.3.16)."""

# Measured with both cores busy with another job (nice -n 19): the 1-epoch calibration run on 300
# structures and the 2-epoch smoke run's steady-state epoch; see the module docstring.
# ``work/calibration.json`` (from ``calibrate``) overrides them.
TRAIN_S_PER_STRUCTURE = 0.0331
"""Seconds of one training pass per training structure (6 atoms each)."""
VALID_PASS_S = 17.3
"""Seconds of one validation pass over the 894 validation structures."""
OVERHEAD_S = 272.0
"""Seconds outside the epochs: start-up, initial validation, final error tables, saving."""
N_TRAIN_FULL = 7204
CALIBRATE_N = 300


# --------------------------------------------------------------------------------------- export


def export(work: Path = WORK) -> dict[str, int]:
    """Write the extxyz files MACE reads; return the number of structures per file."""
    import ase.io

    from lmlp.data import read_structures

    work.mkdir(parents=True, exist_ok=True)
    data, _ = read_structures(DATA)
    independent, _ = read_structures(INDEPENDENT)
    sets = {name: data.split_subset(name) for name in SPLITS}
    sets["independent"] = independent
    counts = {}
    for name, s in sets.items():
        images = [mace_atoms(s, i, split=name) for i in range(len(s))]
        ase.io.write(work / f"{name}.xyz", images, format="extxyz")
        counts[name] = len(images)
    return counts


def mace_atoms(s: Any, i: int, split: str) -> Any:
    """Structure ``i`` of the StructureSet ``s`` as Atoms with MACE's reference keys, no calculator."""
    atoms = s.atoms(i)
    energy = float(atoms.calc.results["energy"])
    forces = np.array(atoms.calc.results["forces"], dtype=np.float64)
    atoms.calc = None
    atoms.info = {
        ENERGY_KEY: energy,
        CHARGE_KEY: int(s.charge[i]),
        "label": str(s.label[i]),
        "split": split,
    }
    if s.trajectory is not None:
        atoms.info["trajectory"] = int(s.trajectory[i])
    atoms.arrays[FORCES_KEY] = forces
    return atoms


# ---------------------------------------------------------------------------------------- train


@dataclass
class LogTimes:
    """Timings read off a MACE training log, in seconds."""

    setup_s: float
    """First log line to the start of the initial validation (reading data, E0s, building the model)."""
    initial_valid_s: float
    """The initial validation pass of the untrained model, including the first calls' warm-up."""
    epoch_s: list[float]
    """Each epoch: training pass plus validation pass (plus a checkpoint when it improved)."""
    save_s: float
    """'Training complete' to the final error tables: reloading the best checkpoint, saving."""
    eval_s: dict[str, float]
    """The final error tables, per set ('train', 'valid', 'test'): one evaluation pass each."""
    tail_s: float
    """The last error table to the last log line (the end-of-run plot when ``--plot`` is on)."""

    def logged_s(self) -> float:
        """Seconds from the first to the last log line."""
        return (self.setup_s + self.initial_valid_s + sum(self.epoch_s) + self.save_s
                + sum(self.eval_s.values()) + self.tail_s)


def seconds_per_epoch(n_train: int, calibration: dict[str, float] | None = None) -> float:
    """Seconds per epoch (training + validation pass) for ``n_train`` structures."""
    c = calibration or default_calibration()
    return c["train_s_per_structure"] * n_train + c["valid_pass_s"]


def default_calibration() -> dict[str, float]:
    """``work/calibration.json`` (written by ``calibrate``) if there is one, else the built-in numbers."""
    path = WORK / "calibration.json"
    if path.is_file():
        return json.loads(path.read_text())["constants"]
    return {"train_s_per_structure": TRAIN_S_PER_STRUCTURE, "valid_pass_s": VALID_PASS_S, "overhead_s": OVERHEAD_S}


def epochs_for_budget(minutes: float, s_per_epoch: float, overhead_s: float) -> int:
    """Epochs that fit ``minutes`` of wall time: floor((60 M - overhead) / s_per_epoch), at least 1."""
    return max(1, math.floor((60.0 * minutes - overhead_s) / s_per_epoch))


def subset_file(name: str, n: int, run_dir: Path) -> Path:
    """A random ``n`` of the exported structures of ``work/NAME.xyz`` (seed 0), written to ``run_dir``."""
    import ase.io

    images = ase.io.read(WORK / f"{name}.xyz", index=":", format="extxyz")
    pick = np.sort(np.random.default_rng(SEED).choice(len(images), size=min(n, len(images)), replace=False))
    path = run_dir / f"{name}_{len(pick)}.xyz"
    ase.io.write(path, [images[i] for i in pick], format="extxyz")
    return path


def mace_command(name: str, files: dict[str, Path], epochs: int, run_dir: Path) -> list[str]:
    """The ``mace_run_train`` command line (as ``python -m mace.cli.run_train`` of this venv)."""
    return [
        sys.executable, "-m", "mace.cli.run_train",
        "--name", name,
        "--work_dir", str(run_dir),
        "--train_file", str(files["train"]),
        "--valid_file", str(files["validation"]),
        "--test_file", str(files["test"]),
        "--max_num_epochs", str(epochs),
        *MACE_SETTINGS,
    ]


def ensure_exported() -> None:
    """Run ``export`` unless its files are there."""
    if not all((WORK / f"{name}.xyz").is_file() for name in (*SPLITS, "independent")):
        print("exporting the data first ...", flush=True)
        print(export())


def train(name: str, budget_minutes: float | None, epochs: int | None, max_n: dict[str, int | None],
          s_per_epoch: float | None, overhead_s: float | None, threads: int | None = None) -> dict[str, Any]:
    """Train MACE in ``work/runs/NAME``; return (and write) the run's ``train_info.json``.

    ``max_n`` maps a split to the number of its structures to use (random, seed 0; None: all).
    ``threads`` sets OMP_NUM_THREADS for MACE (None: torch's default, one per core).
    """
    ensure_exported()
    run_dir = RUNS / name
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {split: subset_file(split, n, run_dir) if n else WORK / f"{split}.xyz" for split, n in max_n.items()}
    n_train = count_structures(files["train"])
    calibration = default_calibration()
    if budget_minutes is not None and not (WORK / "calibration.json").is_file() and s_per_epoch is None:
        print("note: no work/calibration.json; using the built-in timings, measured on a busy machine "
              "(run `calibrate` first for this machine's)", flush=True)
    s_per_epoch = s_per_epoch or seconds_per_epoch(n_train, calibration)
    overhead_s = calibration["overhead_s"] if overhead_s is None else overhead_s
    if epochs is None:
        if budget_minutes is None:
            raise SystemExit("give --budget-minutes or --epochs")
        epochs = epochs_for_budget(budget_minutes, s_per_epoch, overhead_s)
        if overhead_s + s_per_epoch > 60.0 * budget_minutes:
            print(f"warning: even one epoch ({overhead_s:.0f} s overhead + {s_per_epoch:.0f} s) exceeds the "
                  f"budget of {budget_minutes} min; running 1 epoch", flush=True)
    command = mace_command(name, files, epochs, run_dir)
    print(f"MACE: {n_train} training structures, {epochs} epochs "
          f"(budget {budget_minutes} min, {s_per_epoch:.1f} s/epoch, overhead {overhead_s:.0f} s)", flush=True)
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    subprocess.run(command, check=True, cwd=run_dir, env=env)
    wall = time.perf_counter() - start
    times = parse_log(run_dir / "logs" / f"{name}_run-{SEED}.log")
    info = {
        "name": name,
        "model": str((run_dir / f"{name}.model").relative_to(REPO)),
        "n_train": n_train,
        "files": {split: str(path.relative_to(REPO)) for split, path in files.items()},
        "budget_minutes": budget_minutes,
        "epochs": epochs,
        "assumed_seconds_per_epoch": round(s_per_epoch, 2),
        "assumed_overhead_s": round(overhead_s, 1),
        "wall_s": round(wall, 1),
        "log_times_s": asdict(times),
        "default_dtype": DTYPE,
        "settings": MACE_SETTINGS,
        "command": command,
        "threads": threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count(),
        "nice": os.nice(0),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    (run_dir / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"done in {wall:.1f} s; model {info['model']}", flush=True)
    return info


def count_structures(path: Path) -> int:
    """Number of frames of an extxyz file (each frame starts with its atom count)."""
    n = 0
    with path.open() as f:
        for line in f:
            atoms = int(line)
            f.readline()
            for _ in range(atoms):
                f.readline()
            n += 1
    return n


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO: ")
_EVAL = re.compile(r"^Evaluating (train|valid|Default)_")


def parse_log(path: Path) -> LogTimes:
    """Timings of a MACE training log from its line stamps (see ``LogTimes``)."""
    stamped = []
    for line in path.read_text().splitlines():
        m = _STAMP.match(line)
        if m:
            stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            stamped.append((stamp, line[m.end():]))
    first, last = stamped[0][0], stamped[-1][0]

    def when(text: str) -> float:
        return next(t for t, line in stamped if line.startswith(text))

    valid_start, initial = when("Loss metrics on validation set"), when("Initial: head")
    epochs = [t for t, line in stamped if re.match(r"Epoch \d+: head", line)]
    done = when("Training complete")
    # each "Evaluating X ..." pass ends where the next line is stamped
    eval_s, first_eval, end_of_tables = {}, None, done
    for (t, line), (t_next, _) in zip(stamped, stamped[1:]):
        m = _EVAL.match(line)
        if m:
            eval_s[{"Default": "test"}.get(m.group(1), m.group(1))] = round(t_next - t, 2)
            first_eval = first_eval or t
            end_of_tables = t_next
    marks = [initial, *epochs]
    return LogTimes(
        setup_s=round(valid_start - first, 2),
        initial_valid_s=round(initial - valid_start, 2),
        epoch_s=[round(b - a, 2) for a, b in zip(marks, marks[1:])],
        save_s=round((first_eval or last) - done, 2),
        eval_s=eval_s,
        tail_s=round(last - end_of_tables, 2),
    )


def derive_calibration(info: dict[str, Any]) -> dict[str, Any]:
    """The budget formula's constants, for the full training set, from a short run (``calibrate``).

    The run trains on a few hundred structures and validates and tests on the full sets. The
    validation pass is the final tables' evaluation rate per structure (validation and test:
    same model and loader as the per-epoch validation, after the warm-up) times the full
    validation set. The training pass is the last epoch less
    that pass (with 2 epochs the last one is past the warm-up of the training step; with 1 epoch
    the warm-up stays in, a pessimistic number), per training structure. The overhead is
    Python's start-up before the first log line, MACE's set-up, the initial validation (with the
    first calls' warm-up), the extra time of the first epoch over the last, saving the model and
    the final error tables, the training-set table grown to all 7,204 structures at the
    evaluation rate of the validation and test tables.
    """
    t = LogTimes(**info["log_times_s"])
    startup = max(0.0, info["wall_s"] - t.logged_s())
    n_train = info["n_train"]
    n_valid, n_test = (count_structures(REPO / info["files"][s]) for s in ("validation", "test"))
    n_valid_full, n_test_full = (count_structures(WORK / f"{s}.xyz") for s in ("validation", "test"))
    per_structure = (t.epoch_s[-1] - t.eval_s["valid"]) / n_train
    eval_per_structure = (t.eval_s["valid"] + t.eval_s["test"]) / (n_valid + n_test)
    valid_pass = eval_per_structure * n_valid_full
    tables = t.eval_s["train"] + eval_per_structure * (N_TRAIN_FULL - n_train + n_valid_full + n_test_full)
    overhead = (startup + t.setup_s + t.initial_valid_s + (t.epoch_s[0] - t.epoch_s[-1]) + t.save_s
                + t.tail_s + tables)
    constants = {"train_s_per_structure": round(per_structure, 5), "valid_pass_s": round(valid_pass, 2),
                 "overhead_s": round(overhead, 1)}
    full_epoch = seconds_per_epoch(N_TRAIN_FULL, constants)
    return {
        "run": {k: info[k] for k in ("n_train", "epochs", "wall_s", "log_times_s", "nice", "load_average_after")},
        "constants": constants,
        "seconds_per_epoch_full": round(full_epoch, 1),
        "epochs_7_min": epochs_for_budget(7, full_epoch, overhead),
        "epochs_25_min": epochs_for_budget(25, full_epoch, overhead),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def calibrate(n: int = CALIBRATE_N, epochs: int = 2) -> dict[str, Any]:
    """``epochs`` epochs on ``n`` training structures; write and print the budget formula's constants."""
    info = train("calibrate", None, epochs, {"train": n, "validation": None, "test": None}, None, None)
    result = derive_calibration(info)
    (WORK / "calibration.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"written: {(WORK / 'calibration.json').relative_to(REPO)} (train uses it from now on)")
    return result


# ------------------------------------------------------------------------------------- evaluate


def predict(calc: Any, s: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """Energies (n,) in eV and forces [(n_i, 3)] in eV/Å of every structure of ``s``."""
    energies, forces = [], []
    for i in range(len(s)):
        atoms = s.atoms(i)
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    return np.asarray(energies), forces


def errors(s: Any, energies: np.ndarray, forces: list[np.ndarray], which: np.ndarray | None = None) -> dict[str, float]:
    """RMSE and MAE of energy per atom (meV/atom) and force components (meV/Å) over ``which``."""
    idx = np.arange(len(s)) if which is None else np.flatnonzero(which)
    n_atoms = s.n_atoms[idx]
    de = (energies[idx] - s.energy[idx]) / n_atoms * 1e3
    df = np.concatenate([(forces[i] - s.forces[s.offsets[i]:s.offsets[i + 1]]).ravel() for i in idx]) * 1e3
    return {
        "n": int(len(idx)),
        "rmse_e": round(float(np.sqrt(np.mean(de**2))), 3),
        "mae_e": round(float(np.mean(np.abs(de))), 3),
        "rmse_f": round(float(np.sqrt(np.mean(df**2))), 3),
        "mae_f": round(float(np.mean(np.abs(df))), 3),
    }


def grid_of_complexes(s: Any, n_side: int = 4, spacing: float = 8.0) -> Any:
    """The first ``n_side**2`` structures of ``s``, centred on a square grid ``spacing`` Å apart."""
    from ase import Atoms

    system = Atoms()
    for k in range(n_side * n_side):
        atoms = s.atoms(k)
        atoms.calc = None
        atoms.positions += np.array([spacing * (k // n_side), spacing * (k % n_side), 0.0]) - atoms.positions.mean(0)
        system += atoms
    system.info = {}
    return system


def calls_per_second(calc: Any, atoms: Any, n_calls: int, n_warmup: int = 5) -> float:
    """Energy + force calls per second on ``atoms``, each after a fresh 0.001 Å displacement."""
    rng = np.random.default_rng(SEED)
    atoms = atoms.copy()
    atoms.calc = calc
    base = atoms.positions.copy()

    def call() -> None:
        atoms.positions = base + rng.normal(0.0, 1e-3 / math.sqrt(3), base.shape)
        atoms.get_potential_energy()
        atoms.get_forces()

    for _ in range(n_warmup):
        call()
    start = time.perf_counter()
    for _ in range(n_calls):
        call()
    return n_calls / (time.perf_counter() - start)


LMLP_PROTOCOL = "finer_steps2_validate5"
"""The record of experiments.jsonl whose config is configs/sn2.yaml (lmlp's full protocol)."""


def lmlp_baseline() -> dict[str, Any] | None:
    """lmlp's full-protocol ensemble errors (``LMLP_PROTOCOL`` of experiments.jsonl), if recorded."""
    if not LMLP_EXPERIMENTS.is_file():
        return None
    for line in reversed(LMLP_EXPERIMENTS.read_text().splitlines()):
        record = json.loads(line) if line.strip() else {}
        if record.get("name") == LMLP_PROTOCOL:
            independent = next(iter(record["independent"].values()))
            parts = next(iter(record.get("independent_parts", {}).values()), {})
            return {"source": str(LMLP_EXPERIMENTS.relative_to(REPO)), "wall_s": record.get("wall_s"),
                    "test": record["test"], "independent": independent, "independent_parts": parts}
    return None


def evaluate(model: Path, dtype: str | None, calls_small: int, calls_large: int) -> dict[str, Any]:
    """Errors and speed of a trained MACE model; written to examples/results/peers/mace_NAME.json."""
    import ase
    import torch
    from importlib.metadata import version
    from mace.calculators import MACECalculator

    from lmlp.data import read_structures

    name = model.name.removesuffix(".model")
    info_path = model.parent / "train_info.json"
    train_info = json.loads(info_path.read_text()) if info_path.is_file() else None
    dtype = dtype or (train_info or {}).get("default_dtype", DTYPE)
    torch.set_num_threads(1)  # errors do not depend on it; calls/s are single-threaded by design
    calc = MACECalculator(model_paths=str(model), device="cpu", default_dtype=dtype)

    data, _ = read_structures(DATA)
    test = data.split_subset("test")
    independent, _ = read_structures(INDEPENDENT)
    e_test, f_test = predict(calc, test)
    e_ind, f_ind = predict(calc, independent)
    part_of = independent.trajectory % 10
    parts = {label: errors(independent, e_ind, f_ind, part_of == k) for k, label in PARTS.items()}

    small = test.atoms(0)
    small.calc = None
    large = grid_of_complexes(test)
    speed = {
        "threads": 1,
        "small": {"n_atoms": len(small), "calls": calls_small,
                  "calls_per_s": round(calls_per_second(calc, small, calls_small), 2)},
        "large": {"n_atoms": len(large), "calls": calls_large, "layout": "16 test structures, 4 x 4 grid, 8 A apart, non-periodic",
                  "calls_per_s": round(calls_per_second(calc, large, calls_large), 2)},
    }

    result = {
        "peer": "MACE",
        "name": name,
        "model": str(model.resolve().relative_to(REPO)) if model.resolve().is_relative_to(REPO) else str(model),
        "default_dtype": dtype,
        "units": {"rmse_e": "meV/atom", "mae_e": "meV/atom", "rmse_f": "meV/Angstrom (force components)",
                  "mae_f": "meV/Angstrom (force components)", "calls_per_s": "energy+force calls per second",
                  "wall_s": "s"},
        "ensemble": False,
        "test": errors(test, e_test, f_test),
        "independent": errors(independent, e_ind, f_ind),
        "independent_parts": parts,
        "speed": speed,
        "training": train_info,
        "lmlp_reference": lmlp_baseline(),
        "versions": {"mace-torch": version("mace-torch"), "torch": torch.__version__, "ase": ase.__version__,
                     "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"mace_{name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"\nwritten: {out.relative_to(REPO)}")
    return result


def table(result: dict[str, Any]) -> str:
    """A short Markdown table of ``evaluate``'s result, lmlp's baseline beside it when known."""
    ref = result.get("lmlp_reference") or {}
    head = "| set | MACE E RMSE (meV/atom) | MACE F RMSE (meV/Å) |"
    rule = "|---|---:|---:|"
    if ref:
        head += " lmlp E RMSE | lmlp F RMSE |"
        rule += "---:|---:|"
    rows = [("test", result["test"], ref.get("test")), ("independent", result["independent"], ref.get("independent"))]
    rows += [(f"  {k}", v, (ref.get("independent_parts") or {}).get(k)) for k, v in result["independent_parts"].items()]
    lines = [head, rule]
    for label, mace, lmlp in rows:
        line = f"| {label} (n={mace['n']}) | {mace['rmse_e']:.2f} | {mace['rmse_f']:.1f} |"
        if ref:
            line += f" {lmlp['rmse_e']:.2f} | {lmlp['rmse_f']:.1f} |" if lmlp else " - | - |"
        lines.append(line)
    training = result.get("training") or {}
    speed = result["speed"]
    lines += [
        "",
        f"MACE {result['name']}: {training.get('epochs', '?')} epochs on {training.get('n_train', '?')} structures, "
        f"{training.get('wall_s', '?')} s training wall time, {result['default_dtype']}",
        f"speed (1 thread): {speed['small']['n_atoms']} atoms {speed['small']['calls_per_s']:.1f} calls/s; "
        f"{speed['large']['n_atoms']} atoms {speed['large']['calls_per_s']:.1f} calls/s",
    ]
    if ref:
        lines.append(f"lmlp: 10-member ensemble, full protocol ({ref.get('wall_s')} s), from {ref['source']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("export", help="write the extxyz files into benchmarks/peers/work/")
    p_cal = sub.add_parser("calibrate", help="2 epochs on 300 training structures: measure s/epoch")
    p_cal.add_argument("--n", type=int, default=CALIBRATE_N, help="training structures (default 300)")
    p_cal.add_argument("--epochs", type=int, default=2, help="epochs (default 2: the last is timed past the warm-up)")
    p_train = sub.add_parser("train", help="train MACE within a wall-time budget")
    p_train.add_argument("--name", required=True, help="run name: work/runs/NAME/NAME.model")
    p_train.add_argument("--budget-minutes", type=float, help="wall-time budget in minutes")
    p_train.add_argument("--epochs", type=int, help="epochs (instead of the budget)")
    p_train.add_argument("--max-train", type=int, help="train on a random N of the training structures")
    p_train.add_argument("--max-valid", type=int, help="smoke tests only: a random N of the validation set")
    p_train.add_argument("--max-test", type=int, help="smoke tests only: a random N of the test set")
    p_train.add_argument("--seconds-per-epoch", type=float,
                         help=f"s per epoch (default: work/calibration.json, else {TRAIN_S_PER_STRUCTURE} * n_train "
                              f"+ {VALID_PASS_S}, = {TRAIN_S_PER_STRUCTURE * N_TRAIN_FULL + VALID_PASS_S:.0f} "
                              f"for all {N_TRAIN_FULL})")
    p_train.add_argument("--threads", type=int, help="OMP_NUM_THREADS for MACE (default: one per core)")
    p_train.add_argument("--overhead-seconds", type=float,
                         help=f"s outside the epochs (default: work/calibration.json, else {OVERHEAD_S})")
    p_eval = sub.add_parser("evaluate", help="errors and speed of a trained model")
    p_eval.add_argument("--model", type=Path, required=True, help="work/runs/NAME/NAME.model")
    p_eval.add_argument("--dtype", choices=["float32", "float64"], help="default: as trained")
    p_eval.add_argument("--calls-small", type=int, default=300, help="timed calls on 6 atoms")
    p_eval.add_argument("--calls-large", type=int, default=50, help="timed calls on 96 atoms")
    args = parser.parse_args(argv)

    if args.command == "export":
        print(export())
    elif args.command == "calibrate":
        calibrate(args.n, args.epochs)
    elif args.command == "train":
        max_n = {"train": args.max_train, "validation": args.max_valid, "test": args.max_test}
        train(args.name, args.budget_minutes, args.epochs, max_n, args.seconds_per_epoch, args.overhead_seconds,
              args.threads)
    else:
        evaluate(args.model, args.dtype, args.calls_small, args.calls_large)


if __name__ == "__main__":
    main()
