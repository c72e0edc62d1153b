import re

import numpy as np
import pytest

from lmlp.data import validate
from lmlp.errors import DataError


def test_valid_set_passes(molecules):
    same, problems = validate(molecules, "m.h5")
    assert same is molecules and problems == []


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda s: s.energy.__setitem__(4, np.nan), "non-finite energy"),
        (lambda s: s.positions.__setitem__(s.offsets[4] + 1, np.inf), "non-finite position"),
        (lambda s: s.forces.__setitem__(s.offsets[4], np.nan), "non-finite force"),
        (lambda s: s.numbers.__setitem__(s.offsets[4] + 2, 55), "unknown element Cs"),
        (lambda s: s.numbers.__setitem__(s.offsets[4] + 2, 0), "unknown element"),
        (lambda s: s.positions.__setitem__(s.offsets[4] + 1, s.positions[s.offsets[4]] + [0.3, 0, 0]),
         r"atoms 0 and 1 are 0\.300 Å apart \(< 0\.5 Å\)"),
    ],
)
def test_each_bad_structure_is_named(molecules, spoil, message):
    spoil(molecules)
    with pytest.raises(DataError, match=rf"m\.h5: structure 4 \({re.escape(molecules.label[4])}\): {message}"):
        validate(molecules, "m.h5")


def test_mismatched_lengths_are_named(molecules):
    molecules.forces = molecules.forces[:-1]
    with pytest.raises(DataError, match="m.h5: forces has .* rows, numbers has"):
        validate(molecules, "m.h5")
    molecules.forces = np.zeros_like(molecules.positions)
    molecules.energy = molecules.energy[:-2]
    with pytest.raises(DataError, match="m.h5: energy has 18 entries, expected 20 structures"):
        validate(molecules, "m.h5")


def test_skip_drops_and_reports_and_remaps_split(molecules):
    molecules.energy[[2, 9]] = np.nan
    kept, problems = validate(molecules, "m.h5", on_invalid="skip")
    assert [p.index for p in problems] == [2, 9]
    assert len(kept) == len(molecules) - 2
    assert np.isfinite(kept.energy).all()
    total = sum(len(v) for v in kept.split.values())
    assert total == len(kept)
    old_test = set(molecules.split["test"].tolist()) - {2, 9}
    keep = [i for i in range(len(molecules)) if i not in (2, 9)]
    assert {keep[i] for i in kept.split["test"]} == old_test


def test_close_atoms_in_periodic_images_are_found(molecules):
    s = molecules.subset(np.arange(3))
    s.cell = np.tile(np.eye(3) * 10.0, (3, 1, 1))
    s.pbc = np.ones((3, 3), dtype=bool)
    a = s.offsets[1]
    s.positions[a] = [0.1, 5.0, 5.0]
    s.positions[a + 1] = [9.8, 5.0, 5.0]
    with pytest.raises(DataError, match=r"structure 1 .*0\.300 Å apart"):
        validate(s, "p.h5")
