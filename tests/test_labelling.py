"""lmlp data label: reference labels for a file of structures, as an lmlp HDF5 data set."""

import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase import Atoms
from factories import TINY

from lmlp.data import read_structures
from lmlp.errors import LmlpError
from lmlp.labelling import label_file


def test_cli_data_label_with_gfn2_xtb(tmp_path):
    s, _ = read_structures(TINY)
    images = [s.atoms(i) for i in (0, 100)]
    for atoms in images:
        atoms.calc = None  # as flagged by lmlp md: positions, charge and label
        del atoms.info["split"]
    ase.io.write(tmp_path / "flagged.xyz", images, format="extxyz")
    result = subprocess.run(
        [sys.executable, "-m", "lmlp", "data", "label", str(tmp_path / "flagged.xyz"),
         "--out", str(tmp_path / "new.h5"), "--test-fraction", "0.5"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 structures labelled with GFN2-xTB" in result.stdout
    labelled, _ = read_structures(tmp_path / "new.h5")
    assert labelled.attrs["method"] == "GFN2-xTB" and labelled.attrs["program"] == "tblite"
    assert "lmlp data label" in labelled.attrs["command"]
    assert sorted(len(v) for v in labelled.split.values()) == [1, 1]
    assert labelled.label.tolist() == [s.label[0], s.label[100]]
    np.testing.assert_allclose(labelled.energy, s.energy[[0, 100]], atol=1e-4)
    np.testing.assert_allclose(labelled.forces, s.forces[np.r_[0:6, 600:606]], atol=1e-3)


def test_label_needs_a_charge_for_structures_without_one(tmp_path):
    ase.io.write(tmp_path / "plain.xyz", Atoms("CH3Cl", positions=np.random.default_rng(0).normal(size=(5, 3))))
    with pytest.raises(LmlpError, match=r"structure 0 has no charge in its info; give the total charge"):
        label_file(tmp_path / "plain.xyz", tmp_path / "new.h5")
    assert not (tmp_path / "new.h5").exists()
