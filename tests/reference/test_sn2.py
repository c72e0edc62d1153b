"""SN2 data-set generator: labelled anions, seeded, split per reaction, resumable, parallel-safe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.lj import LennardJones

from lmlp.data import StructureSet, read_structures
from lmlp.errors import LmlpError
from lmlp.reference import sn2
from lmlp.reference.sn2 import (
    GenerationReport,
    RestrainedCalculator,
    SamplingProtocol,
    build_geometry,
    generate_sn2,
    reaction_windows,
    sample_reaction,
)

needs_tblite = pytest.mark.skipif(importlib.util.find_spec("tblite") is None, reason="needs tblite")
FAST = SamplingProtocol(equilibration=10, stride=5)
REACTIONS = ["F+CH3Cl", "Br+CH3I"]
BUDGET = 16 * 12
"""12 structures per reaction: 12 of the 81 trajectories run, one frame each."""


def generate(out: Path, **kwargs) -> tuple[GenerationReport, StructureSet]:
    options = dict(n_structures=BUDGET, reactions=REACTIONS, protocol=FAST, command="pytest")
    report = generate_sn2(out, **{**options, **kwargs})
    return report, read_structures(out)[0]


def make_parts_only(out: Path, monkeypatch: pytest.MonkeyPatch, **kwargs) -> None:
    """A run interrupted after writing its parts, before merging them."""

    def interrupt(sets):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(sn2, "concatenate", interrupt)
        with pytest.raises(KeyboardInterrupt):
            generate(out, **kwargs)


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> tuple[GenerationReport, StructureSet]:
    return generate(tmp_path_factory.mktemp("serial") / "sn2.h5")


def assert_same(a: StructureSet, b: StructureSet) -> None:
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.energy, b.energy)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.trajectory, b.trajectory)
    assert sorted(a.split) == sorted(b.split)
    for name in a.split:
        np.testing.assert_array_equal(a.split[name], b.split[name])


@needs_tblite
def test_structures_are_labelled_sn2_anions(serial):
    report, s = serial
    assert report.n_written == len(s) == sum(report.per_reaction.values())
    assert len(s) + report.n_failed_labels <= BUDGET // 16 * len(REACTIONS)
    assert set(report.per_reaction) == set(s.label) == set(REACTIONS)
    assert np.all(s.charge == -1) and np.all(s.n_atoms == 6)
    expected = {"F+CH3Cl": [6, 1, 1, 1, 9, 17], "Br+CH3I": [6, 1, 1, 1, 35, 53]}
    for i in range(len(s)):
        assert s.numbers[s.offsets[i]:s.offsets[i + 1]].tolist() == expected[s.label[i]]
    assert np.isfinite(s.energy).all() and np.isfinite(s.forces).all()


@needs_tblite
def test_provenance_is_stored(serial):
    report, s = serial
    assert (s.attrs["method"], s.attrs["program"], s.attrs["command"]) == ("GFN2-xTB", "tblite", "pytest")
    assert s.attrs["program_version"]
    with h5py.File(report.path) as f:
        assert f.attrs["created"].startswith(b"20")  # fixed-length UTF-8, read as bytes
    assert "Langevin" in s.attrs["sampling"] and s.attrs["sampling"].endswith("seed 0")
    assert not report.path.with_name("sn2.h5.parts").exists()


@needs_tblite
def test_split_is_80_10_10_per_reaction_by_whole_trajectory(serial):
    _, s = serial
    sides = [s.split[name] for name in ("train", "validation", "test")]
    np.testing.assert_array_equal(np.sort(np.concatenate(sides)), np.arange(len(s)))
    for reaction in REACTIONS:
        members = np.flatnonzero(s.label == reaction)
        assert np.isin(members, s.split["test"]).sum() == round(0.1 * len(members))
        assert np.isin(members, s.split["validation"]).sum() == round(0.1 * len(members))
    for trajectory in np.unique(s.trajectory):
        frames = np.flatnonzero(s.trajectory == trajectory)
        assert sum(np.isin(frames, side).any() for side in sides) == 1


@needs_tblite
def test_trajectory_ids_follow_the_md_runs():
    frames, _ = sample_reaction("F+CH3Cl", 200, 0, (300.0,), FAST)
    ids = np.array([a.info["trajectory"] for a in frames])
    assert len(np.unique(ids)) == 27  # one per window at one temperature
    assert np.all(np.diff(ids) >= 0)  # frames of one trajectory are consecutive


@needs_tblite
def test_independent_protocol_is_reproducible_and_all_test(tmp_path):
    options = dict(n_structures=16 * 10, reactions=["Cl+CH3Br"], sampling="independent", seed=7, command="pytest")
    generate_sn2(tmp_path / "a.h5", **options)
    generate_sn2(tmp_path / "b.h5", **options)
    a, b = read_structures(tmp_path / "a.h5")[0], read_structures(tmp_path / "b.h5")[0]
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.energy, b.energy)
    np.testing.assert_array_equal(a.trajectory, b.trajectory)
    assert len(a) == 10 and set(a.split) == {"test"} and len(a.split["test"]) == 10
    assert a.attrs["sampling"].startswith("independent protocol") and a.attrs["sampling"].endswith("seed 7")
    r_cx = np.linalg.norm(a.positions[4::6] - a.positions[0::6], axis=1)
    assert r_cx.max() - r_cx.min() > 2.0  # the scan runs from beyond the complex into the C–Cl bond


@needs_tblite
def test_relaxed_scan_holds_c_x_and_relaxes_the_rest():
    points, failed = sn2.relaxed_scan("F", "Cl", 4, sn2.IndependentProtocol())
    assert failed == 0 and len(points) == 4
    targets = np.linspace(sn2.COMPLEX["F"] + 1.5, sn2.BOND["F"] - 0.1, 4)
    np.testing.assert_allclose([p.get_distance(0, 4) for p in points], targets, atol=1e-6)
    assert points[-1].get_distance(0, 5) > points[0].get_distance(0, 5) + 0.8  # Cl⁻ has left


@needs_tblite
def test_parallel_run_reproduces_serial_run(serial, tmp_path):
    _, parallel = generate(tmp_path / "sn2.h5", workers=2)
    assert_same(serial[1], parallel)


@needs_tblite
def test_resume_keeps_existing_parts(serial, tmp_path, monkeypatch):
    out = tmp_path / "sn2.h5"
    make_parts_only(out, monkeypatch)
    parts = tmp_path / "sn2.h5.parts"
    assert sorted(p.name for p in parts.iterdir()) == [f"{r}.h5" for r in sorted(REACTIONS)]
    (parts / f"{REACTIONS[1]}.h5").unlink()
    made = []
    real = sn2._make_part
    monkeypatch.setattr(sn2, "_make_part", lambda chunk: made.append(chunk.reaction) or real(chunk))
    _, resumed = generate(out)
    assert made == [REACTIONS[1]]
    assert_same(serial[1], resumed)


@needs_tblite
def test_part_from_other_settings_is_rejected(tmp_path, monkeypatch):
    out = tmp_path / "sn2.h5"
    make_parts_only(out, monkeypatch, reactions=["F+CH3F"], n_structures=16, seed=1)
    with pytest.raises(LmlpError, match=r"made with other settings \(sampling: .*delete"):
        generate(out, reactions=["F+CH3F"], n_structures=16, seed=0)


@needs_tblite
def test_sampling_depends_only_on_seed():
    def positions(seed: int) -> np.ndarray:
        frames, _ = sample_reaction("Cl+CH3Cl", 2, seed, (300.0, 1000.0), FAST)
        return np.stack([a.positions for a in frames])

    first = positions(0)
    np.testing.assert_array_equal(first, positions(0))
    assert not np.allclose(first, positions(1))


def test_restraint_forces_are_minus_gradient():
    atoms = Atoms("ArArAr", positions=[[0, 0, 0], [3.1, 0.2, 0], [-0.3, 3.6, 0.4]])
    calc = RestrainedCalculator(LennardJones(sigma=3.0, epsilon=0.01), [[0, 1], [0, 2]], [2.5, 4.0], k=5.0)
    forces = calc.get_forces(atoms)
    h, fd = 1e-5, np.zeros_like(forces)
    for i, d in np.ndindex(forces.shape):
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[i, d] += sign * h
            fd[i, d] -= sign * calc.get_potential_energy(moved) / (2 * h)
    np.testing.assert_allclose(forces, fd, atol=1e-6)


def test_windows_run_from_separated_reactants_to_separated_products():
    windows = reaction_windows("F", "Cl")
    restrained = [w for w in windows if w.restrained]
    assert len(windows) == 27 and len(restrained) == 25
    assert (restrained[0].r_cx, restrained[0].r_cy) == (10.0, 1.8)
    assert (restrained[-1].r_cx, restrained[-1].r_cy) == (1.4, 10.0)
    ts = restrained[12]
    assert (ts.r_cx, ts.r_cy, ts.progress) == pytest.approx((1.85, 2.25, 0.5))


def test_jittered_windows_stay_between_their_neighbours():
    windows = reaction_windows("Cl", "Br")
    rng = np.random.default_rng(0)
    for w in range(25):
        around = windows[max(w - 1, 0):w + 2] if w < 24 else windows[23:25]
        for _ in range(20):
            moved = sn2._jittered(windows, w, rng)
            for key in ("r_cx", "r_cy", "progress"):
                values = [getattr(win, key) for win in around]
                assert min(values) - 1e-12 <= getattr(moved, key) <= max(values) + 1e-12


@pytest.mark.parametrize(("progress", "angle_to_y"), [(0.0, 108.5), (0.5, 90.0), (1.0, 71.5)])
def test_umbrella_inverts_along_the_path(progress, angle_to_y):
    atoms = build_geometry("F", "Cl", r_cx=2.6, r_cy=1.8, progress=progress)
    assert atoms.get_chemical_symbols() == ["C", "H", "H", "H", "F", "Cl"]
    assert atoms.get_distances(0, [1, 2, 3]) == pytest.approx([1.09] * 3)
    assert atoms.get_distances(0, [4, 5]) == pytest.approx([2.6, 1.8])
    assert [atoms.get_angle(h, 0, 5) for h in (1, 2, 3)] == pytest.approx([angle_to_y] * 3)


def test_unusable_arguments_are_explained(tmp_path):
    with pytest.raises(LmlpError, match="unknown reaction 'F\\+CH3At'"):
        generate_sn2(tmp_path / "x.h5", reactions=["F+CH3At"])
    with pytest.raises(LmlpError, match="use at least 16"):
        generate_sn2(tmp_path / "x.h5", n_structures=8, reactions=["F+CH3F"])
