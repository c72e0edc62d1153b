"""Continual learning: a trained model continues on a grown data set."""

import dataclasses
import json

import numpy as np
import pytest
from factories import TINY, assert_same_weights, crash_at, tiny_config

from lmlp.config import config_from_dict
from lmlp.data import read_structures, write_structures
from lmlp.errors import LmlpError
from lmlp.batch import chunks, predict_all
from lmlp.metrics import evaluate_model, model_batch
from lmlp.modelfile import load_model
from lmlp.train import train
from lmlp.train.continual import EARLIER, refit_reference_energies

F_CL = ["F+CH3F", "F+CH3Cl", "Cl+CH3F", "Cl+CH3Cl"]


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    first = train(tiny_config(root / "fcl", reactions=F_CL, epochs=40))
    second = train(tiny_config(root / "all", epochs=40), continue_from=first.run_dir / "model.pt")
    return first, second


def evaluate_on(model_path, structures):
    model, _ = load_model(model_path)
    return evaluate_model(model, structures)


def test_continual_learning_adds_reactions_without_forgetting_the_old_ones(continued):
    first, second = continued
    report = second.continual
    test_set = read_structures(TINY)[0].split_subset("test")
    assert set(report) == set(test_set.label.tolist()) | {EARLIER}
    old = test_set.subset(np.flatnonzero(np.isin(test_set.label, F_CL)))
    before = evaluate_on(first.run_dir / "model.pt", old)
    after = evaluate_on(second.run_dir / "model.pt", old)
    for label, r in report.items():
        if label in F_CL:
            assert r["before"] == pytest.approx(before[label].ensemble, rel=1e-5)
            assert r["after"] == pytest.approx(after[label].ensemble, rel=1e-5)
        elif "Br" in label or "I" in label:
            assert r["before"] is None and r["after"]["rmse_f"] > 0
    assert report[EARLIER] == {"before": pytest.approx(before["all"].ensemble, rel=1e-5),
                               "after": pytest.approx(after["all"].ensemble, rel=1e-5)}
    assert after["all"].ensemble["rmse_f"] < 1.2 * before["all"].ensemble["rmse_f"]
    assert after["all"].ensemble["rmse_e"] < 2.0 * before["all"].ensemble["rmse_e"]
    model, _ = load_model(second.run_dir / "model.pt")
    assert model.elements.tolist() == [1, 6, 9, 17, 35, 53]
    assert "continual" in json.loads((second.run_dir / "metrics.json").read_text())
    log = (second.run_dir / "train.log").read_text()
    assert "known and" in log and "before → after" in log


def test_continued_run_resumes_exactly(continued, tmp_path, monkeypatch):
    first, second = continued
    cfg = tiny_config(tmp_path / "again", epochs=40, checkpoint_every=10)
    undo = crash_at(monkeypatch, 25)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, continue_from=first.run_dir / "model.pt")
    undo()
    resumed = train(cfg, resume=True)
    assert_same_weights(second.run_dir / "model.pt", resumed.run_dir / "model.pt")


def test_continuing_with_another_architecture_is_refused(continued, tmp_path):
    first, _ = continued
    cfg = config_from_dict({"data": {"path": str(TINY)}, "ensemble": {"members": 3}, "model": {"hidden": [8]},
                            "output": {"run_dir": str(tmp_path / "x"), "progress": False}})
    with pytest.raises(LmlpError, match=r"hidden = \[16, 16\], the config asks for \[8\]"):
        train(cfg, continue_from=first.run_dir / "model.pt")


SHIFTS = {1: 0.7, 6: -3.0, 9: 11.0, 17: -5.5, 35: 2.25, 53: 40.0}
"""Per-element energy offsets (eV) of a pretend second level of theory."""


def shifted(s, model=None):
    """``s`` with energies moved by ``SHIFTS`` per atom (of the model's predictions, if given)."""
    energy = s.energy if model is None else evaluate_energies(model, s)
    per_atom = np.vectorize(SHIFTS.get)(s.numbers).astype(float)
    return dataclasses.replace(s, energy=energy + np.add.reduceat(per_atom, s.offsets[:-1]))


def evaluate_energies(model, s):
    """Ensemble-mean energies (S,) eV of ``model`` for ``s``."""
    return predict_all(model, chunks(model_batch(model, s)))[0].mean(0).numpy()


def test_refit_reference_energies_takes_up_per_element_offsets(continued):
    _, second = continued
    model, _ = load_model(second.run_dir / "model.pt")
    s = read_structures(TINY)[0]
    target = shifted(s, model)
    old = refit_reference_energies(model, target)
    np.testing.assert_allclose(evaluate_energies(model, s), target.energy, rtol=0, atol=1e-5)
    assert not np.allclose(old, model.reference_energies.numpy())


def test_continued_run_on_other_labels_refits_the_reference_energies(continued, tmp_path):
    first, _ = continued
    s, _ = read_structures(TINY)
    other = tmp_path / "other.h5"
    write_structures(other, shifted(s))
    cfg = tiny_config(tmp_path / "refit", reactions=F_CL, epochs=5, refit_reference_energies=True)
    cfg.data.path = str(other)
    result = train(cfg, continue_from=first.run_dir / "model.pt")
    first_test = json.loads((first.run_dir / "metrics.json").read_text())["test"]["ensemble"]
    before = result.continual[EARLIER]["before"]
    assert before["rmse_e"] < 3 * first_test["rmse_e"]  # the offsets are taken up before training
    assert before["rmse_f"] == pytest.approx(first_test["rmse_f"], rel=1e-6)
    assert "reference energies refitted" in (result.run_dir / "train.log").read_text()
    cfg.training.refit_reference_energies = False
    cfg.output.run_dir = str(tmp_path / "no-refit")
    unrefitted = train(cfg, continue_from=first.run_dir / "model.pt").continual[EARLIER]["before"]
    assert unrefitted["rmse_e"] > 100 * before["rmse_e"]


def test_continued_run_takes_this_configs_p_frozen(continued, tmp_path):
    first, _ = continued
    weights = []
    for p_frozen in (0.0, 0.1):
        cfg = tiny_config(tmp_path / f"p{p_frozen}", epochs=3, early_stopping=False)
        cfg.optimizer.params.update(p_frozen=p_frozen, t_hist=5)  # freezing acts from step 6 (the run has 40)
        result = train(cfg, continue_from=first.run_dir / "model.pt")
        weights.append(load_model(result.run_dir / "model.pt")[0].state_dict())
    assert any(not np.array_equal(weights[0][k].numpy(), weights[1][k].numpy()) for k in weights[0])
