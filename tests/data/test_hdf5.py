import h5py
import numpy as np
import pytest
from factories import assert_sets_equal, random_molecules

from lmlp.data import read_structures, summarize, write_structures
from lmlp.errors import DataError


def test_round_trip_is_exact(tmp_path, molecules):
    write_structures(tmp_path / "m.h5", molecules)
    back, problems = read_structures(tmp_path / "m.h5")
    assert problems == []
    assert_sets_equal(molecules, back)
    assert back.attrs["method"] == "random"


def test_file_records_units_provenance_and_hash(tmp_path, molecules):
    write_structures(tmp_path / "m.h5", molecules)
    with h5py.File(tmp_path / "m.h5") as f:  # strings are fixed-length UTF-8, read as bytes
        assert f.attrs["energy_unit"] == b"eV"
        assert f.attrs["length_unit"] == b"Angstrom"
        assert f.attrs["force_unit"] == b"eV/Angstrom"
        assert f.attrs["format_version"] == 1
        assert f.attrs["content_hash"].startswith(b"sha256:")
        assert f["atoms/positions"].compression == "gzip"
        assert f["atoms/positions"].shuffle


def test_periodic_cells_round_trip(tmp_path, molecules):
    molecules.cell = np.tile(np.eye(3) * 20.0, (len(molecules), 1, 1))
    molecules.pbc = np.ones((len(molecules), 3), dtype=bool)
    write_structures(tmp_path / "p.h5", molecules)
    assert_sets_equal(molecules, read_structures(tmp_path / "p.h5")[0])


def test_changed_content_is_detected(tmp_path, molecules):
    write_structures(tmp_path / "m.h5", molecules)
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        f["structures/energy"][3] += 1e-9
    with pytest.raises(DataError, match="content hash mismatch"):
        read_structures(tmp_path / "m.h5")


def test_truncated_file_is_detected(tmp_path, molecules):
    write_structures(tmp_path / "m.h5", molecules)
    data = (tmp_path / "m.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.h5: not a readable HDF5 file"):
        read_structures(tmp_path / "t.h5")


def test_missing_file_and_foreign_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_structures(tmp_path / "absent.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match="not an lmlp structure file"):
        read_structures(tmp_path / "other.h5")


def test_missing_forces_is_an_error(tmp_path, molecules):
    write_structures(tmp_path / "m.h5", molecules)
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        del f["atoms/forces"]
    with pytest.raises(DataError, match="missing forces"):
        read_structures(tmp_path / "m.h5")


def test_interrupted_write_leaves_old_file(tmp_path, molecules, monkeypatch):
    path = tmp_path / "m.h5"
    write_structures(path, molecules)
    before = path.read_bytes()
    broken = random_molecules(5, seed=9)
    broken.label = None  # fails while the temporary file is written
    with pytest.raises(TypeError):
        write_structures(path, broken)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.h5"]


def test_summary_streams_in_blocks(tmp_path, molecules, monkeypatch):
    import lmlp.data.hdf5 as hdf5

    write_structures(tmp_path / "m.h5", molecules)
    monkeypatch.setattr(hdf5, "_ROWS_PER_READ", 7)
    s = summarize(tmp_path / "m.h5")
    assert s.n_structures == len(molecules)
    assert s.n_atoms == len(molecules.numbers)
    assert s.atoms_per_structure == (molecules.n_atoms.min(), molecules.n_atoms.max())
    assert sum(s.elements.values()) == s.n_atoms
    assert s.force_component_range == (molecules.forces.min(), molecules.forces.max())
    assert s.max_force_norm == pytest.approx(np.linalg.norm(molecules.forces, axis=1).max())
    assert s.split_sizes == {k: len(v) for k, v in molecules.split.items()}
    assert sum(s.labels.values()) == len(molecules)


def test_trajectory_ids_round_trip_and_are_counted(tmp_path, molecules):
    molecules.trajectory = np.arange(len(molecules)) // 4
    write_structures(tmp_path / "m.h5", molecules)
    back, _ = read_structures(tmp_path / "m.h5")
    np.testing.assert_array_equal(back.trajectory, molecules.trajectory)
    assert summarize(tmp_path / "m.h5").n_trajectories == len(np.unique(molecules.trajectory))
    molecules.trajectory = None
    write_structures(tmp_path / "n.h5", molecules)
    assert read_structures(tmp_path / "n.h5")[0].trajectory is None
    assert summarize(tmp_path / "n.h5").n_trajectories is None
