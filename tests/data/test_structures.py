import numpy as np
import pytest
from factories import assert_sets_equal, random_molecules

from lmlp.data import StructureSet, concatenate, resplit, split_indices, stratified_split
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


def with_trajectories(s: StructureSet, per_trajectory: int = 3) -> StructureSet:
    """``s`` with consecutive structures grouped into trajectories of ``per_trajectory``."""
    s.trajectory = np.arange(len(s)) // per_trajectory
    return s


def test_trajectories_survive_ase_subset_and_concatenate():
    s = with_trajectories(random_molecules(12, seed=4))
    assert_sets_equal(s, StructureSet.from_atoms([s.atoms(i) for i in range(len(s))]))
    np.testing.assert_array_equal(s.subset(np.array([5, 0])).trajectory, [1, 0])
    joined = concatenate([s, s])
    np.testing.assert_array_equal(joined.trajectory, np.concatenate([s.trajectory, s.trajectory + 4]))
    other = s.subset(np.arange(3))
    other.trajectory = np.array([7, 7, 9])
    np.testing.assert_array_equal(concatenate([s, other]).trajectory, np.concatenate([s.trajectory, [7, 7, 9]]))
    assert concatenate([s, random_molecules(3)]).trajectory is None


def test_group_split_keeps_every_trajectory_on_one_side():
    label = np.repeat(["a", "b", "c"], [300, 240, 90])
    groups = np.arange(len(label)) // 6  # 6 frames per trajectory, trajectories inside one label
    split = split_indices(label, (0.8, 0.1, 0.1), seed=5, groups=groups)
    sides = [split[name] for name in ("train", "validation", "test")]
    np.testing.assert_array_equal(np.sort(np.concatenate(sides)), np.arange(len(label)))
    for g in np.unique(groups):
        assert sum(np.isin(np.flatnonzero(groups == g), side).any() for side in sides) == 1
    for name, fraction in (("validation", 0.1), ("test", 0.1)):
        for lab in "abc":
            n = (label == lab).sum()
            assert abs((label[split[name]] == lab).sum() - fraction * n) <= 6  # within one trajectory
    again = split_indices(label, (0.8, 0.1, 0.1), seed=5, groups=groups)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = split_indices(label, (0.8, 0.1, 0.1), seed=6, groups=groups)
    assert not np.array_equal(split["test"], other["test"])


def test_random_split_without_validation_is_the_two_way_split():
    label = np.array(["a"] * 50 + ["b"] * 30)
    three = split_indices(label, (0.9, 0.0, 0.1), seed=3)
    assert set(three) == {"train", "test"}
    two = stratified_split(label, 0.1, seed=3)
    assert all(np.array_equal(three[k], two[k]) for k in two)


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.5, 0.1, 0.1), (0.0, 0.5, 0.5), (1.1, -0.05, -0.05)])
def test_bad_split_fractions_are_refused(fractions):
    with pytest.raises(DataError, match="split fractions"):
        split_indices(np.array(["a"] * 10), fractions)


def test_resplit_by_trajectory_needs_trajectory_ids():
    s = random_molecules(20, seed=1)
    with pytest.raises(DataError, match="no trajectory ids"):
        resplit(s, "trajectory")
    s = resplit(with_trajectories(s, 2), "trajectory", (0.6, 0.2, 0.2), seed=1)
    assert set(s.split) == {"train", "validation", "test"}
    assert s.attrs["split"] == "by trajectory, train/validation/test 0.6/0.2/0.2, seed 1"
