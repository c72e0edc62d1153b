"""Training and comparison spread over processes (torchrun, gloo on the loopback)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from factories import TINY

from lmlp import distributed
from lmlp.config import load_config
from lmlp.distributed import Workers
from lmlp.errors import LmlpError
from lmlp.integrity import load_checked, previous_path
from lmlp.train import train

CONFIG = {
    "name": "dist",
    "data": {"path": str(TINY)},
    "ensemble": {"members": 3},
    "model": {"hidden": [12, 12]},
    "selection": {"fit_fraction": 0.5},
    "training": {"epochs": 12, "checkpoint_every": 5, "dtype": "float64", "threads": 1},
    "optimizer": {"name": "core", "lr": 0.01, "params": {"p_frozen": 0.1}},
    "output": {"progress": False, "plots": False},
}


def write_config(path, run_dir, **sections):
    cfg = {**CONFIG, **sections, "output": {**CONFIG["output"], "run_dir": str(run_dir)}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def lmlp(*args, processes=1):
    """Run the lmlp CLI, under torchrun (standalone, CPU threads 1) for several processes."""
    launcher = [sys.executable, "-m", "lmlp"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "lmlp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(run_dir, name="model.pt"):
    return load_checked(run_dir / name, "model file")["state_dict"]


@pytest.mark.parametrize("n, size", [(n, size) for n in range(1, 12) for size in range(1, n + 1)])
def test_shares_split_members_contiguously_and_evenly(n, size):
    parts = [Workers(r, size).share(n) for r in range(size)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    counts = [p.stop - p.start for p in parts]
    assert max(counts) - min(counts) <= 1 and min(counts) >= 1


def test_optimizer_state_slices_and_gathers_back_in_one_process():
    params = [torch.nn.Parameter(torch.randn(4, 3, 2)), torch.nn.Parameter(torch.randn(4, 2))]
    optimizer = torch.optim.Adam(params)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    full = optimizer.state_dict()
    assert Workers().gather_optimizer_state(optimizer, 4) == full
    assert Workers().local_optimizer_state(full, optimizer, 4) is full


def test_more_processes_than_members_is_refused(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run"))
    with pytest.raises(LmlpError, match="4 processes but ensemble.members = 3"):
        train(cfg, workers=Workers(0, 4))


def test_device_choice():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    assert distributed.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LmlpError, match="training.device: cuda"):
            distributed.resolve_device("cuda")


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same config trained by 1 and by 2 processes."""
    base = tmp_path_factory.mktemp("dist")
    one = lmlp("train", str(write_config(base / "one.yaml", base / "one")))
    two = lmlp("train", str(write_config(base / "two.yaml", base / "two")), processes=2)
    return base, one, two


def test_two_processes_give_the_weights_and_metrics_of_one(one_and_two):
    base, one, two = one_and_two
    a, b = weights(base / "one"), weights(base / "two")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-10)
    m1, m2 = (json.loads((base / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert m2["best_epoch"] == m1["best_epoch"]
    for split in ("train", "validation", "test"):
        assert m2[split]["ensemble"] == pytest.approx(m1[split]["ensemble"], rel=1e-9)
    assert two.stdout.count("test ensemble") == 1  # only rank 0 prints


def test_rank_zero_writes_the_run_directory_and_every_rank_logs(one_and_two):
    base, _, _ = one_and_two
    run = base / "two"
    assert (run / "train.log").is_file() and (run / "logs" / "rank1.log").is_file()
    assert "process 1 of 2 trains members 2" in (run / "logs" / "rank1.log").read_text()
    assert json.loads((run / "run.json").read_text())["processes"] == 2
    assert not list(run.glob(".*.tmp"))


def test_a_two_process_checkpoint_resumes_in_one_process(one_and_two, tmp_path):
    base, _, _ = one_and_two
    run = tmp_path / "resumed"
    shutil.copytree(base / "two", run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["output"]["run_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copy(previous_path(run / "checkpoint_last.pt"), run / "checkpoint_last.pt")  # epoch 10 of 12
    assert load_checked(run / "checkpoint_last.pt", "checkpoint")["epoch"] == 10
    (run / "model.pt").unlink()
    lmlp("train", "--resume", str(run))
    a, b = weights(base / "one"), weights(run)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-10)


def test_comparison_over_two_processes_equals_one(tmp_path):
    compare = {"variants": [{"name": "CoRe", "optimizer": "core", "lr": 0.01},
                            {"name": "Adam", "optimizer": "adam", "lr": 0.001},
                            {"name": "RPROP", "optimizer": "rprop", "lr": 0.01}],
               "seeds": 2}
    results = []
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        config = write_config(tmp_path / f"c{processes}.yaml", tmp_path / "unused",
                              training={**CONFIG["training"], "epochs": 4}, compare={**compare, "out": str(out)})
        lmlp("compare", str(config), processes=processes)
        results.append(json.loads((out / "comparison.json").read_text()))
    strip = [[{k: v for k, v in run.items() if k != "seconds_per_epoch"} for run in r["runs"]] for r in results]
    assert strip[0] == strip[1]
    assert np.allclose([r["A"] for r in results[0]["runs"]], [r["A"] for r in results[1]["runs"]])


def test_two_processes_share_the_disk_cache_and_match_one_process(one_and_two, tmp_path):
    base, _, _ = one_and_two
    training = {**CONFIG["training"], "descriptor_cache": "disk"}
    lmlp("train", str(write_config(tmp_path / "c.yaml", tmp_path / "run", training=training)), processes=2)
    assert (tmp_path / "run" / "descriptors_train.h5").is_file()
    a, b = weights(base / "one"), weights(tmp_path / "run")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-9)
