"""One table of units: structure files, model files and reported metrics name the same units."""

import torch

from lmlp import units
from lmlp.data import summarize, write_structures
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.integrity import load_checked
from lmlp.metrics import evaluation_json
from lmlp.model import HDNNPEnsemble
from lmlp.modelfile import save_model


def test_files_and_reports_take_their_units_from_lmlp_units(tmp_path, molecules):
    write_structures(tmp_path / "s.h5", molecules)
    stored = {key: summarize(tmp_path / "s.h5").attrs[key] for key in units.DATA_UNITS}
    assert stored == units.DATA_UNITS == {"energy_unit": units.ENERGY, "length_unit": units.LENGTH,
                                          "force_unit": units.FORCE, "charge_unit": units.CHARGE}
    descriptor = SymmetryFunctions(4.0, [1.0], [1.0], [], [], [])
    model = HDNNPEnsemble(descriptor, Standardizer(torch.zeros(3), torch.ones(3)), [1], torch.zeros(1), [4], members=1)
    save_model(tmp_path / "model.pt", model)
    assert load_checked(tmp_path / "model.pt", "model")["units"] == {
        "energy": units.ENERGY, "length": units.LENGTH, "forces": units.FORCE}
    assert evaluation_json({})["units"] == {"energy": units.ENERGY_ERROR, "forces": units.FORCE_ERROR}


def test_no_module_keeps_a_copy_of_a_units_table():
    from lmlp import modelfile
    from lmlp.data import hdf5

    assert hdf5.UNITS is units.DATA_UNITS and modelfile.UNITS is units.MODEL_UNITS
