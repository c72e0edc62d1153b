"""Relabelling stored structures: chunked, resumable, time-budgeted, failures counted, split kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lmlp.data import read_structures
from lmlp.errors import LmlpError
from lmlp.reference.labellers import LabelFailure, Labeller, get_labeller
from lmlp.reference.relabel import relabel

TINY = Path(__file__).parents[2] / "data" / "sn2_tiny.h5"


class Quadratic(Labeller):
    """A stand-in method: energy −0.01 Σ|R|² + charge, forces 0.02 R (eV, eV/Å); its shift from the
    GFN2-xTB labels varies by < 0.3 eV/atom within a reaction, as another real method's would."""

    method, program, program_version = "quadratic", "test", "0"

    def label(self, atoms, charge):
        return -0.01 * float((atoms.positions**2).sum()) + charge, 0.02 * atoms.positions


@pytest.fixture(scope="module")
def tiny():
    return read_structures(TINY)[0]


def test_chosen_structures_get_new_labels_and_keep_split_and_trajectory(tiny, tmp_path):
    chosen = np.array([5, 0, 17, 160, 199, 42, 3])
    out = tmp_path / "dft.h5"
    report = relabel(TINY, out, Quadratic(), chosen, chunk_size=3, selection="test picks")
    assert report.complete and (report.n_selected, report.n_labelled, report.n_failed, report.chunks) == (7, 7, 0, 3)
    s = read_structures(out)[0]
    np.testing.assert_allclose(s.positions.reshape(7, 6, 3), tiny.positions.reshape(-1, 6, 3)[chosen])
    np.testing.assert_allclose(s.energy, [-0.01 * (tiny.atoms(i).positions ** 2).sum() - 1 for i in chosen])
    np.testing.assert_array_equal(s.trajectory, tiny.trajectory[chosen])
    np.testing.assert_array_equal(s.label, tiny.label[chosen])
    side = {i: name for name, idx in tiny.split.items() for i in idx}
    assert {name: sorted(idx) for name, idx in s.split.items() if len(idx)} == {
        name: sorted(k for k, i in enumerate(chosen) if side[i] == name) for name in set(side[i] for i in chosen)}
    assert (s.attrs["method"], s.attrs["complete"], s.attrs["selection"]) == ("quadratic", "true", "test picks")
    assert s.attrs["relabelled_from"] == "GFN2-xTB data"
    assert not out.with_name("dft.h5.parts").exists()


def test_time_budget_stops_and_next_run_continues(tiny, tmp_path):
    out = tmp_path / "dft.h5"
    first = relabel(TINY, out, Quadratic(), np.arange(10), chunk_size=4, time_budget=0.0)
    assert (first.chunks_done_now, first.chunks_done, first.complete) == (1, 1, False)
    partial = read_structures(out)[0]
    assert len(partial) == 4 and partial.attrs["complete"] == "false"
    second = relabel(TINY, out, Quadratic(), np.arange(10), chunk_size=4)
    assert (second.chunks_done_now, second.chunks_done, second.complete) == (2, 3, True)
    np.testing.assert_allclose(read_structures(out)[0].positions, tiny.subset(np.arange(10)).positions)


def test_failures_are_counted_not_stored(tiny, tmp_path, monkeypatch):
    labeller = Quadratic()
    real = labeller.label
    monkeypatch.setattr(labeller, "label", lambda atoms, charge: real(atoms.copy(), charge) if not np.isclose(
        atoms.positions, tiny.atoms(2).positions).all() else (_ for _ in ()).throw(LabelFailure("no")))
    report = relabel(TINY, tmp_path / "dft.h5", labeller, np.arange(5), chunk_size=2)
    s = read_structures(tmp_path / "dft.h5")[0]
    assert (report.n_labelled, report.n_failed, len(s), s.attrs["n_failed_labels"]) == (4, 1, 4, "1")
    np.testing.assert_array_equal(s.trajectory, tiny.trajectory[[0, 1, 3, 4]])


def test_other_settings_and_bad_indices_are_errors(tiny, tmp_path):
    out = tmp_path / "dft.h5"
    relabel(TINY, out, Quadratic(), np.arange(6), chunk_size=2, time_budget=0.0)
    with pytest.raises(LmlpError, match="another labelling run"):
        relabel(TINY, out, Quadratic(), np.arange(7), chunk_size=2)
    with pytest.raises(LmlpError, match="distinct and in 0..199"):
        relabel(TINY, tmp_path / "x.h5", Quadratic(), np.array([1, 1]))
    with pytest.raises(LmlpError, match="distinct and in 0..199"):
        relabel(TINY, tmp_path / "x.h5", Quadratic(), np.array([200]))


@pytest.mark.skipif(importlib.util.find_spec("tblite") is None, reason="needs tblite")
def test_two_workers_give_the_labels_of_one(tmp_path):
    xtb = get_labeller("gfn2-xtb")
    relabel(TINY, tmp_path / "a.h5", xtb, np.arange(8), chunk_size=2)
    relabel(TINY, tmp_path / "b.h5", xtb, np.arange(8), chunk_size=2, workers=2)
    a, b = read_structures(tmp_path / "a.h5")[0], read_structures(tmp_path / "b.h5")[0]
    np.testing.assert_allclose(a.energy, b.energy, atol=1e-8)
    np.testing.assert_allclose(a.energy, read_structures(TINY)[0].energy[:8], atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("tblite") is None, reason="needs tblite")
def test_cli_relabels_a_split_and_explains_bad_input(tmp_path):
    from typer.testing import CliRunner

    from lmlp.cli import app

    runner = CliRunner()
    out = tmp_path / "val.h5"
    result = runner.invoke(app, ["data", "relabel", str(TINY), str(out), "--method", "gfn2-xtb", "--split", "validation"])
    assert result.exit_code == 0, result.output
    assert "24 of 24 structures labelled with GFN2-xTB" in result.output
    s, tiny = read_structures(out)[0], read_structures(TINY)[0]
    np.testing.assert_allclose(s.energy, tiny.energy[tiny.split["validation"]], atol=1e-6)
    assert list(s.split["validation"]) == list(range(24)) and s.attrs["selection"] == "split validation"
    assert s.attrs["command"].startswith("lmlp")  # the command line (pytest's under CliRunner)
    (tmp_path / "idx.txt").write_text("3 1 x")
    bad = runner.invoke(app, ["data", "relabel", str(TINY), str(tmp_path / "b.h5"), "--method", "gfn2-xtb",
                              "--indices", str(tmp_path / "idx.txt")])
    assert bad.exit_code != 0 and "not a list of structure indices" in str(bad.exception)
    bad = runner.invoke(app, ["data", "relabel", str(TINY), str(tmp_path / "b.h5"), "--split", "nope"])
    assert bad.exit_code != 0 and "no split 'nope'" in str(bad.exception)


def test_choice_covers_every_cell_and_leads_with_uncertainty():
    from lmlp.reference.relabel import choose_for_labelling

    rng = np.random.default_rng(0)
    cells = np.repeat([0, 1, 2, 3], [50, 50, 50, 4])
    uncertainty = rng.random(len(cells))
    chosen = choose_for_labelling(cells, uncertainty, 40, uncertain_share=0.5, seed=1)
    assert len(chosen) == 40 and len(np.unique(chosen)) == 40 and not np.all(np.diff(chosen) > 0)
    assert list(np.bincount(cells[chosen])) == [12, 12, 12, 4]  # the small cell gives all it has
    for c in range(3):
        members = np.flatnonzero(cells == c)
        top = members[np.argsort(-uncertainty[members])][:6]
        assert set(top) <= set(chosen)
    np.testing.assert_array_equal(chosen, choose_for_labelling(cells, uncertainty, 40, 0.5, seed=1))
    assert not np.array_equal(chosen, choose_for_labelling(cells, uncertainty, 40, 0.5, seed=2))
    with pytest.raises(LmlpError, match="choose 1..154"):
        choose_for_labelling(cells, uncertainty, 155)


def test_sn2_reaction_coordinate(tiny):
    from lmlp.reference.sn2 import build_geometry, reaction_coordinate
    from lmlp.data import StructureSet
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = build_geometry("F", "Cl", 2.6, 1.8, 0.0)
    atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((6, 3)))
    assert reaction_coordinate(StructureSet.from_atoms([atoms]))[0] == pytest.approx(0.8)
    assert reaction_coordinate(tiny).shape == (len(tiny),)


def test_cli_chooses_indices_for_relabel(tiny, tmp_path):
    import torch
    from typer.testing import CliRunner

    from lmlp.cli import app
    from lmlp.config import DescriptorConfig
    from lmlp.descriptors import SymmetryFunctions, Standardizer
    from lmlp.model import HDNNPEnsemble, fit_reference_energies
    from lmlp.modelfile import save_model

    elements = sorted(set(tiny.numbers.tolist()))
    sf = SymmetryFunctions.from_config(DescriptorConfig(cutoff=6.0, angular_cutoff=4.0), elements)
    G = sf(*map(torch.from_numpy, (tiny.numbers, tiny.positions, tiny.offsets)))
    e_ref = torch.from_numpy(fit_reference_energies(tiny.numbers, tiny.offsets, tiny.energy, elements))
    save_model(tmp_path / "model.pt", HDNNPEnsemble(sf, Standardizer.fit(G), elements, e_ref, hidden=[4], members=3))
    out = tmp_path / "chosen.txt"
    result = CliRunner().invoke(app, ["data", "choose", str(TINY), "--model", str(tmp_path / "model.pt"),
                                      "--count", "32", "--out", str(out), "--bins", "2"])
    assert result.exit_code == 0, result.output
    chosen = np.loadtxt(out, dtype=np.int64)
    assert len(chosen) == 32 and set(chosen) <= set(tiny.split["train"])
    assert len(set(tiny.label[chosen])) == len(set(tiny.label[tiny.split["train"]]))  # every reaction
    assert out.read_text().startswith("# 32 of the 160 train structures")


class Watching(Quadratic):
    """Quadratic, recording how many structures ``out`` holds whenever a structure is labelled."""

    def __init__(self, out: Path):
        self.out, self.seen = out, []

    def label(self, atoms, charge):
        self.seen.append(len(read_structures(self.out)[0]) if self.out.exists() else 0)
        return super().label(atoms, charge)


def test_out_holds_every_finished_chunk_while_the_next_is_labelled(tmp_path):
    out = tmp_path / "dft.h5"
    labeller = Watching(out)
    relabel(TINY, out, labeller, np.arange(7), chunk_size=3)
    assert labeller.seen == [0, 0, 0, 3, 3, 3, 6]
    assert len(read_structures(out)[0]) == 7


class OneWrongState(Quadratic):
    """Quadratic, but structure ``wrong`` (by its first coordinate) 300 eV too high, as an SCF
    converged to a wrong state."""

    def __init__(self, wrong_x: float):
        self.wrong_x = wrong_x

    def label(self, atoms, charge):
        energy, forces = super().label(atoms, charge)
        return energy + (300.0 if atoms.positions[0, 0] == self.wrong_x else 0.0), forces


def test_labels_inconsistent_with_the_source_are_left_out_and_counted(tiny, tmp_path):
    chosen = np.flatnonzero(tiny.label == tiny.label[0])[:8]  # one composition
    wrong = chosen[3]
    out = tmp_path / "dft.h5"
    report = relabel(TINY, out, OneWrongState(float(tiny.atoms(int(wrong)).positions[0, 0])), chosen, chunk_size=3)
    assert (report.n_labelled, report.n_inconsistent) == (7, 1)
    s = read_structures(out)[0]
    assert len(s) == 7 and s.attrs["n_inconsistent_labels"] == "1"
    assert s.attrs["inconsistent_source_indices"] == str(wrong)
    assert np.all(s.energy < 0.0)  # the 300 eV one is not among them
