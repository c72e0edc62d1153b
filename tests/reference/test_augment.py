"""Displaced copies: labelled with the file's method, joined to their source's split and trajectory, seeded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lmlp.data import read_structures, resplit
from lmlp.errors import LmlpError
from lmlp.reference.augment import augment, displaced
from lmlp.reference.labellers import Labeller, get_labeller

TINY = Path(__file__).parents[2] / "data" / "sn2_tiny.h5"
needs_tblite = pytest.mark.skipif(importlib.util.find_spec("tblite") is None, reason="needs tblite")


class ShiftedLabeller(Labeller):
    """A stand-in labeller: the stored method's name, energy −Σ|R|² and forces 2R (eV, eV/Å)."""

    method = "GFN2-xTB"
    program = "test"
    program_version = "0"

    def label(self, atoms, charge):
        return -float((atoms.positions**2).sum()), 2.0 * atoms.positions


@pytest.fixture(scope="module")
def tiny():
    return read_structures(TINY)[0]


def test_copies_join_the_split_with_their_sources_trajectory(tiny):
    out, failed = augment(tiny, 30, (0.05, 0.1), 3, ShiftedLabeller())
    new = np.arange(len(tiny), len(out))
    assert failed == 0 and len(new) == 30
    assert set(new) <= set(out.split["train"]) and len(out.split["train"]) == len(tiny.split["train"]) + 30
    for name in ("validation", "test"):
        np.testing.assert_array_equal(out.split[name], tiny.split[name])
    train_trajectories = set(tiny.trajectory[tiny.split["train"]])
    assert set(out.trajectory[new]) <= train_trajectories
    np.testing.assert_array_equal(out.trajectory[: len(tiny)], tiny.trajectory)
    for i in new:
        a = out.atoms(int(i))
        np.testing.assert_allclose(a.get_potential_energy(), -(a.positions**2).sum())
        source = [j for j in tiny.split["train"] if tiny.trajectory[j] == out.trajectory[i]]
        rms = min(np.sqrt(((tiny.atoms(j).positions - a.positions) ** 2).sum(1).mean()) for j in source)
        assert 0.01 < rms < 0.25
        assert out.label[i] == tiny.label[source[0]] and out.charge[i] == -1
    assert "30 displaced copies of train structures" in out.attrs["augmentation"]


def test_copies_stay_with_their_sources_when_resplit(tiny):
    out, _ = augment(tiny, 40, (0.05, 0.1), 0, ShiftedLabeller())
    split = resplit(out, "trajectory", (0.6, 0.2, 0.2), seed=5).split
    side = {i: name for name, idx in split.items() for i in idx}
    for i in range(len(tiny), len(out)):
        same = np.flatnonzero(out.trajectory == out.trajectory[i])
        assert {side[j] for j in same} == {side[i]}


def test_seeded(tiny):
    a, _ = augment(tiny, 5, (0.05, 0.1), 7, ShiftedLabeller())
    b, _ = augment(tiny, 5, (0.05, 0.1), 7, ShiftedLabeller())
    c, _ = augment(tiny, 5, (0.05, 0.1), 8, ShiftedLabeller())
    np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.array_equal(a.positions, c.positions)


def test_displacement_width():
    from ase import Atoms

    atoms = Atoms("C2000", positions=np.zeros((2000, 3)))
    rms = np.sqrt((displaced(atoms, np.random.default_rng(0), (0.08, 0.08)).positions ** 2).sum(1).mean())
    assert rms == pytest.approx(0.08, rel=0.05)


def test_other_method_and_bad_arguments_are_errors(tiny):
    class Other(ShiftedLabeller):
        method = "B3LYP/def2-SVPD"

    with pytest.raises(LmlpError, match="labelled with 'GFN2-xTB', not 'B3LYP/def2-SVPD'"):
        augment(tiny, 3, (0.05, 0.1), 0, Other())
    with pytest.raises(LmlpError, match="copies"):
        augment(tiny, 0, (0.05, 0.1), 0, ShiftedLabeller())
    with pytest.raises(LmlpError, match="sigma"):
        augment(tiny, 3, (0.1, 0.05), 0, ShiftedLabeller())
    with pytest.raises(LmlpError, match="split 'extra'"):
        augment(tiny, 3, (0.05, 0.1), 0, ShiftedLabeller(), split="extra")


@needs_tblite
def test_cli_labels_copies_with_gfn2_xtb(tmp_path):
    from typer.testing import CliRunner

    from lmlp.cli import app

    out = tmp_path / "aug.h5"
    result = CliRunner().invoke(app, ["data", "augment", str(TINY), "--copies", "4", "--seed", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    s = read_structures(out)[0]
    xtb = get_labeller("gfn2-xtb")
    for i in range(len(s) - 4, len(s)):
        atoms = s.atoms(i)
        energy, forces = xtb.label(atoms, -1)
        assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), forces, atol=1e-6)
    bad = CliRunner().invoke(app, ["data", "augment", str(TINY), "--copies", "2", "--sigma", "0.1", "--out", str(out)])
    assert bad.exit_code != 0 and "--sigma" in str(bad.exception)
