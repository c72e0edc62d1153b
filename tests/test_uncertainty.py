"""Ensemble uncertainty against actual error: Spearman correlation and the flagging threshold."""

import numpy as np
import pytest
import torch
from factories import TINY
from scipy.stats import spearmanr
from test_calculator import build_model

from lmlp.calculator import LMLPCalculator
from lmlp.data import read_structures
from lmlp.metrics import model_batch
from lmlp.uncertainty import BAD_FACTOR, RECALL, calibrate, spearman, structure_errors, uncertainty_report


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)
    y = x + rng.normal(0, 2, 200)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_threshold_flags_the_recall_of_the_bad_structures():
    rng = np.random.default_rng(1)
    error = rng.exponential(1.0, 1000)
    uncertainty = error * rng.uniform(0.5, 1.5, 1000)
    c = calibrate(uncertainty, error, reference_rmse=1.0)
    bad = error > BAD_FACTOR
    assert c.n_bad == bad.sum() > 10
    assert np.mean(uncertainty[bad] >= c.threshold) >= RECALL
    assert np.mean(uncertainty[bad] > c.threshold) < RECALL  # the largest threshold that does
    assert c.flagged_fraction == pytest.approx(np.mean(uncertainty >= c.threshold))
    assert c.threshold_factor == pytest.approx(c.threshold)
    assert c.spearman > 0.8
    none_bad = calibrate(uncertainty, error, reference_rmse=100.0)
    assert none_bad.n_bad == 0 and none_bad.threshold is None


def test_structure_errors_are_the_calculators_uncertainties():
    s, _ = read_structures(TINY)
    model = build_model(s)
    e = structure_errors(model, model_batch(model, s))
    for i in (0, 57, 130):
        atoms = s.atoms(i)
        calc = LMLPCalculator(model, dtype=torch.float64)
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        r = calc.results
        assert e["energy_uncertainty"][i] == pytest.approx(r["energy_uncertainty"] / 6 * 1000, rel=1e-6)
        assert e["force_uncertainty"][i] == pytest.approx(r["forces_uncertainty"].max() * 1000, rel=1e-6)
        assert e["energy_error"][i] == pytest.approx(abs(energy - s.energy[i]) / 6 * 1000, rel=1e-6)
        df = atoms.get_forces() - s.forces[s.offsets[i]:s.offsets[i + 1]]
        assert e["force_error"][i] == pytest.approx(np.sqrt(np.mean(df**2)) * 1000, rel=1e-6)
    report = uncertainty_report(model, model_batch(model, s), 1.0, 10.0)
    assert report.n_structures == len(s)
    assert report.as_dict()["energy"]["spearman"] == report.energy.spearman
