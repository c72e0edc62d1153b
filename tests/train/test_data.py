import numpy as np
import pytest
from factories import tiny_config

from lmlp.train.data import load_training_data


@pytest.mark.parametrize("reactions", [None, ["F+CH3Cl", "Cl+CH3Br"]])
def test_max_train_keeps_the_first_training_structures_and_every_other_split(tmp_path, reactions):
    whole = load_training_data(tiny_config(tmp_path, reactions=reactions))
    cfg = tiny_config(tmp_path, reactions=reactions)
    cfg.data.max_train = 7
    s = load_training_data(cfg)
    assert len(s.split["train"]) == 7
    np.testing.assert_array_equal(s.subset(s.split["train"]).positions,
                                  whole.subset(whole.split["train"][:7]).positions)
    for split in ("validation", "test"):
        np.testing.assert_array_equal(s.subset(s.split[split]).energy, whole.subset(whole.split[split]).energy)
    assert len(s) == len(whole) - len(whole.split["train"]) + 7
