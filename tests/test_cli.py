import json
import subprocess
import sys
from pathlib import Path

import pytest
from factories import TINY

from lmlp.data import read_structures, write_structures

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def lmlp(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlp", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_help_lists_commands():
    top = lmlp("--help")
    assert top.returncode == 0 and "data" in top.stdout and "config" in top.stdout
    data = lmlp("data", "--help")
    assert data.returncode == 0
    for command in ("info", "convert", "generate"):
        assert command in data.stdout


@pytest.mark.parametrize("path", [TINY, TINY.with_name("sn2_gfn2xtb.h5")])
def test_data_info_on_shipped_sets(path):
    result = lmlp("data", "info", path)
    assert result.returncode == 0, result.stderr
    assert "GFN2-xTB" in result.stdout
    assert "eV/Angstrom" in result.stdout
    summary = json.loads(lmlp("data", "info", path, "--json").stdout)
    s, _ = read_structures(path)
    assert set(summary["labels"]) == {f"{x}+CH3{y}" for x in "F Cl Br I".split() for y in "F Cl Br I".split()}
    assert summary["n_structures"] == len(s)
    assert summary["split_sizes"] == {k: len(v) for k, v in s.split.items()}


def test_convert_round_trip_and_skip_report(tmp_path, molecules):
    molecules.energy[5] = float("nan")
    write_structures(tmp_path / "bad.h5", molecules)
    failed = lmlp("data", "convert", tmp_path / "bad.h5", tmp_path / "out.extxyz")
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "structure 5" in failed.stderr
    assert "Traceback" not in failed.stderr
    ok = lmlp("data", "convert", tmp_path / "bad.h5", tmp_path / "out.extxyz", "--skip-invalid")
    assert ok.returncode == 0, ok.stderr
    assert "skipped structure 5: non-finite energy" in ok.stderr
    assert "wrote 19 structures" in ok.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("data", "info", "absent.h5"), "absent.h5: no such file"),
    (("config", "check", "absent.yaml"), "absent.yaml: no such file"),
    (("train", "--resume", "absent"), "absent/config.yaml: no such file"),
    (("train",), "give a config file, or --resume RUN_DIR"),
    (("train", "--resume", "absent", "--set", "training.epochs=3"), "--continue-from and --set are for a new run"),
    (("config", "check", CONFIGS / "sn2.yaml", "--set", "training.epochs=0"),
     "with --set training.epochs: training.epochs: got 0, expected an integer >= 1"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, args, message):
    result = lmlp(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_config_show_applies_set_overrides():
    shown = lmlp("config", "show", CONFIGS / "sn2.yaml", "--set", "data.max_train=100", "--set", "name=dft")
    assert shown.returncode == 0, shown.stderr
    assert "  max_train: 100\n" in shown.stdout and shown.stdout.startswith("name: dft\n")


def test_data_merge_joins_files_and_splits(tmp_path):
    from factories import random_molecules

    a, b = random_molecules(10, seed=1), random_molecules(6, seed=2)
    write_structures(tmp_path / "a.h5", a)
    write_structures(tmp_path / "b.h5", b)
    done = lmlp("data", "merge", tmp_path / "ab.h5", tmp_path / "a.h5", tmp_path / "b.h5")
    assert done.returncode == 0, done.stderr
    merged, _ = read_structures(tmp_path / "ab.h5")
    assert len(merged) == 16 and len(merged.split["train"]) == len(a.split["train"]) + len(b.split["train"])
    b.attrs["method"] = "other"
    write_structures(tmp_path / "c.h5", b)
    bad = lmlp("data", "merge", tmp_path / "x.h5", tmp_path / "a.h5", tmp_path / "c.h5")
    assert bad.returncode == 1 and "different methods" in bad.stderr


def test_data_split_round_trip_by_trajectory(tmp_path, molecules):
    import numpy as np

    from lmlp.data import split_indices

    molecules.trajectory = np.arange(len(molecules)) // 2
    write_structures(tmp_path / "m.h5", molecules)
    done = lmlp("data", "split", tmp_path / "m.h5", "--fractions", "0.6,0.2,0.2", "--seed", "4")
    assert done.returncode == 0, done.stderr
    s, _ = read_structures(tmp_path / "m.h5")
    expected = split_indices(molecules.label, (0.6, 0.2, 0.2), 4, molecules.trajectory)
    assert sorted(s.split) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(s.split[name], expected[name])
    np.testing.assert_array_equal(s.positions, molecules.positions)
    assert s.attrs["split_command"].endswith("m.h5 --fractions 0.6,0.2,0.2 --seed 4")
    info = lmlp("data", "info", tmp_path / "m.h5")
    assert "trajectories  10" in info.stdout


def test_data_split_by_trajectory_without_ids_is_one_line(tmp_path, molecules):
    write_structures(tmp_path / "m.h5", molecules)
    failed = lmlp("data", "split", tmp_path / "m.h5")
    assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1
    assert "m.h5: the structures have no trajectory ids" in failed.stderr
    bad = lmlp("data", "split", tmp_path / "m.h5", "--by", "random", "--fractions", "0.8,0.2")
    assert bad.returncode == 1 and "--fractions" in bad.stderr
    ok = lmlp("data", "split", tmp_path / "m.h5", "--by", "random", "--out", tmp_path / "r.h5")
    assert ok.returncode == 0, ok.stderr
    assert set(read_structures(tmp_path / "r.h5")[0].split) == {"train", "validation", "test"}


def test_md_thresholds_left_out_are_the_calculators(monkeypatch):
    """Without --energy-factor / --force-factor, run_md's defaults apply (lmlp.calculator's
    ENERGY_FACTOR and FORCE_FACTOR), not a copy of their values."""
    from typer.testing import CliRunner

    import lmlp.md
    from lmlp.cli import app

    calls = []

    class Summary:
        def format(self) -> str:
            return "summary"

    monkeypatch.setattr(lmlp.md, "run_md", lambda *args, **kwargs: calls.append(kwargs) or Summary())
    runner = CliRunner()
    assert runner.invoke(app, ["md", "model.pt", "start.xyz"]).exit_code == 0
    assert not {"energy_factor", "force_factor"} & set(calls[0])
    assert runner.invoke(app, ["md", "model.pt", "start.xyz", "--energy-factor", "3"]).exit_code == 0
    assert calls[1]["energy_factor"] == 3.0 and "force_factor" not in calls[1]
