import numpy as np
import pytest
from factories import assert_sets_equal, random_molecules

from lmlp.data import StructureSet, concatenate, stratified_split
from lmlp.errors import DataError


def test_subset_picks_the_atoms_of_each_structure(molecules):
    picked = molecules.subset(np.array([3, 0, 7]))
    for new, old in enumerate([3, 0, 7]):
        a, b = molecules.offsets[old], molecules.offsets[old + 1]
        c, d = picked.offsets[new], picked.offsets[new + 1]
        np.testing.assert_array_equal(picked.positions[c:d], molecules.positions[a:b])
        np.testing.assert_array_equal(picked.numbers[c:d], molecules.numbers[a:b])
        assert picked.energy[new] == molecules.energy[old]


def test_atoms_round_trip_through_ase(molecules):
    images = [molecules.atoms(i) for i in range(len(molecules))]
    back = StructureSet.from_atoms(images)
    assert_sets_equal(molecules, back)


def test_from_atoms_names_structure_without_forces(molecules):
    images = [molecules.atoms(i) for i in range(3)]
    del images[2].calc.results["forces"]
    with pytest.raises(DataError, match=r"in\.xyz: structure 2: missing forces"):
        StructureSet.from_atoms(images, source="in.xyz")


def test_concatenate_keeps_order_and_offsets():
    a, b = random_molecules(5, seed=1), random_molecules(4, seed=2)
    joined = concatenate([a, b])
    assert len(joined) == 9
    np.testing.assert_array_equal(joined.subset(np.arange(5, 9)).positions, b.positions)
    np.testing.assert_array_equal(joined.offsets[-1], len(a.numbers) + len(b.numbers))


def test_stratified_split_takes_fraction_of_every_label():
    label = np.array(["a"] * 50 + ["b"] * 30 + [f"single{i}" for i in range(10)])
    split = stratified_split(label, 0.1, seed=3)
    assert np.intersect1d(split["train"], split["test"]).size == 0
    assert len(split["train"]) + len(split["test"]) == len(label)
    assert (label[split["test"]] == "a").sum() == 5
    assert (label[split["test"]] == "b").sum() == 3
    assert np.char.startswith(label[split["test"]].astype(str), "single").sum() == 1
    np.testing.assert_array_equal(split["test"], stratified_split(label, 0.1, seed=3)["test"])


def test_concatenate_can_join_splits_by_name():
    a, b = random_molecules(10, seed=1), random_molecules(6, seed=2)
    joined = concatenate([a, b], keep_splits=True)
    for name in ("train", "test"):
        expected = np.concatenate([a.split[name], b.split[name] + 10])
        np.testing.assert_array_equal(joined.split[name], expected)
        assert_sets_equal(joined.split_subset(name), concatenate([a.split_subset(name), b.split_subset(name)]))
    assert concatenate([a, b]).split == {}
    b.split = {}
    with pytest.raises(DataError, match="needs a stored split"):
        concatenate([a, b], keep_splits=True)
