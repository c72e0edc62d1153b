import ase.db
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from factories import assert_sets_equal

from lmlp.data import convert, read_structures, write_extxyz, write_structures
from lmlp.errors import DataError


def test_h5_extxyz_h5_round_trip_is_lossless(tmp_path, molecules):
    write_structures(tmp_path / "a.h5", molecules)
    convert(tmp_path / "a.h5", tmp_path / "a.extxyz")
    convert(tmp_path / "a.extxyz", tmp_path / "b.h5")
    assert_sets_equal(molecules, read_structures(tmp_path / "b.h5")[0])


def test_extxyz_is_readable_by_ase(tmp_path, molecules):
    write_extxyz(tmp_path / "a.xyz", molecules)
    images = ase.io.read(tmp_path / "a.xyz", ":")
    assert len(images) == len(molecules)
    assert images[1].get_potential_energy() == molecules.energy[1]
    assert images[1].info["label"] == molecules.label[1]


def test_periodic_round_trip(tmp_path, molecules):
    molecules.cell = np.tile(np.diag([12.0, 13.0, 14.5]), (len(molecules), 1, 1))
    molecules.pbc = np.tile([True, True, False], (len(molecules), 1))
    write_structures(tmp_path / "a.h5", molecules)
    convert(tmp_path / "a.h5", tmp_path / "a.extxyz")
    convert(tmp_path / "a.extxyz", tmp_path / "b.h5")
    assert_sets_equal(molecules, read_structures(tmp_path / "b.h5")[0])


def test_from_ase_db_with_new_split(tmp_path, molecules):
    with ase.db.connect(tmp_path / "m.db") as db:
        for i in range(len(molecules)):
            db.write(molecules.atoms(i))
    written, _ = convert(tmp_path / "m.db", tmp_path / "m.h5", default_charge=-1, test_fraction=0.25,
                         attrs={"method": "PBE"})
    back = read_structures(tmp_path / "m.h5")[0]
    np.testing.assert_array_equal(back.energy, molecules.energy)
    np.testing.assert_array_equal(back.forces, molecules.forces)
    assert (back.charge == -1).all()
    assert back.attrs["method"] == "PBE"
    assert len(back.split["test"]) > 0 and len(back.split["train"]) + len(back.split["test"]) == len(back)


def test_missing_forces_in_extxyz_names_structure(tmp_path, molecules):
    images = [molecules.atoms(i) for i in range(4)]
    images[3].calc = SinglePointCalculator(images[3], energy=1.0)
    ase.io.write(tmp_path / "x.extxyz", images)
    with pytest.raises(DataError, match=r"x\.extxyz: structure 3: missing forces"):
        convert(tmp_path / "x.extxyz", tmp_path / "x.h5")


def test_unreadable_input_and_unknown_output(tmp_path, molecules):
    (tmp_path / "bad.extxyz").write_text("3\nnot a comment line\nC 0 0\n")
    with pytest.raises(DataError, match=r"bad\.extxyz: ASE cannot read it"):
        convert(tmp_path / "bad.extxyz", tmp_path / "x.h5")
    write_structures(tmp_path / "a.h5", molecules)
    with pytest.raises(DataError, match="unknown output format"):
        convert(tmp_path / "a.h5", tmp_path / "a.csv")
