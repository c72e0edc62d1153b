"""TorchScript export: the saved module reproduces the Python ensemble (energies eV, forces eV/Å)."""

import json
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list
from factories import TINY

from lmlp.config import DescriptorConfig
from lmlp.data import read_structures
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.export import METADATA_FILE, export_model
from lmlp.model import HDNNPEnsemble, fit_reference_energies


@pytest.fixture(scope="module")
def tiny():
    s, _ = read_structures(TINY)
    return s.subset(np.arange(12))


def build(s, activation: str = "scaled_tanh", angular_form: str = "g5", kind: str = "eeacsf") -> HDNNPEnsemble:
    """A 3-member float64 ensemble with hidden=[8, 8] on the default descriptor settings of ``s``."""
    elements = sorted(set(s.numbers.tolist()))
    sf = SymmetryFunctions.from_config(DescriptorConfig(angular_form=angular_form, kind=kind), elements)
    numbers, positions, offsets = tensors(s)
    e_ref = torch.from_numpy(fit_reference_energies(s.numbers, s.offsets, s.energy, elements))
    return HDNNPEnsemble(sf, Standardizer.fit(sf(numbers, positions, offsets)), elements, e_ref,
                         hidden=[8, 8], activation=activation, members=3)


def tensors(s) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """numbers (N,), positions (N, 3) Å, offsets (S + 1,)."""
    return torch.from_numpy(s.numbers), torch.from_numpy(s.positions), torch.from_numpy(s.offsets)


def load(path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(path)


def exported(model: HDNNPEnsemble, tmp_path) -> torch.jit.ScriptModule:
    """``model`` exported to a file and loaded back."""
    export_model(model, tmp_path / "model.ts")
    return load(tmp_path / "model.ts")


@pytest.fixture(scope="module")
def model64(tiny):
    return build(tiny)


@pytest.fixture(scope="module")
def exported64(model64, tmp_path_factory):
    return exported(model64, tmp_path_factory.mktemp("export"))


def periodic_pairs(numbers, positions, cell, pbc) -> tuple[torch.Tensor, torch.Tensor]:
    """ASE neighbour list within 6 Å: pairs (2, P) int64 and Cartesian shifts (P, 3) Å."""
    atoms = Atoms(numbers=numbers.numpy(), positions=positions.numpy(), cell=cell, pbc=pbc)
    i, j, S = neighbor_list("ijS", atoms, DescriptorConfig().cutoff)
    return torch.from_numpy(np.stack([i, j]).astype(np.int64)), torch.from_numpy(S @ atoms.cell.array)


def test_float64_export_equals_python_model(tiny, model64, exported64):
    for k in range(4):
        numbers, positions, offsets = tensors(tiny.subset(np.array([k])))
        energies, forces = model64(numbers, positions, offsets)
        e, f = exported64(numbers, positions)
        assert e.dtype == torch.float64 and f.shape == (3, len(numbers), 3)
        torch.testing.assert_close(e, energies[:, 0], rtol=1e-10, atol=0)
        torch.testing.assert_close(f, forces, rtol=1e-10, atol=1e-10)


def test_float32_export_equals_python_model_at_float32_round_off(tiny, tmp_path):
    model = build(tiny).float()
    module = exported(model, tmp_path)
    for k in range(4):
        numbers, positions, offsets = tensors(tiny.subset(np.array([k])))
        energies, forces = model(numbers, positions.float(), offsets)
        e, f = module(numbers, positions)
        assert e.dtype == torch.float64 and f.dtype == torch.float32
        # Totals ≈ −360 eV of which the float32 network part is a few eV; forces up to ≈ 8 eV/Å.
        torch.testing.assert_close(e, energies[:, 0], rtol=0, atol=2e-5)
        torch.testing.assert_close(f, forces, rtol=1e-5, atol=1e-5)


def test_forces_are_minus_the_energy_gradient(tiny, exported64):
    numbers, positions, _ = tensors(tiny.subset(np.array([1])))
    _, forces = exported64(numbers, positions)
    h = 1e-5
    for atom, axis in [(0, 0), (2, 1), (4, 2), (5, 0)]:
        plus, minus = positions.clone(), positions.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        numeric = -(exported64(numbers, plus)[0] - exported64(numbers, minus)[0]) / (2 * h)
        torch.testing.assert_close(forces[:, atom, axis], numeric, rtol=1e-6, atol=1e-7)


def test_works_with_gradients_disabled_and_restores_the_grad_mode(tiny, exported64):
    numbers, positions, _ = tensors(tiny.subset(np.array([0])))
    expected = exported64(numbers, positions)
    with torch.no_grad():
        e, f = exported64(numbers, positions)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(e, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(f, expected[1], rtol=0, atol=0)


def test_neighbour_list_of_a_molecule_in_a_big_cell_equals_the_molecule_path(tiny, exported64):
    numbers, positions, _ = tensors(tiny.subset(np.array([2])))
    centred = positions - positions.mean(0) + 15.0
    pairs, shifts = periodic_pairs(numbers, centred, np.eye(3) * 30.0, True)
    e, f = exported64(numbers, centred, pairs, shifts)
    expected = exported64(numbers, positions)
    torch.testing.assert_close(e, expected[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(f, expected[1], rtol=1e-10, atol=1e-10)


def test_small_periodic_cell_equals_python_model(tiny, model64, exported64):
    numbers, positions, offsets = tensors(tiny.subset(np.array([3])))
    cell = torch.eye(3, dtype=torch.float64) * 7.0
    inside = positions - positions.mean(0) + 3.5
    energies, forces = model64(numbers, inside, offsets, cell[None], torch.ones(1, 3, dtype=torch.bool))
    pairs, shifts = periodic_pairs(numbers, inside, cell.numpy(), True)
    assert (shifts != 0).any(dim=1).sum() > 0  # images take part
    e, f = exported64(numbers, inside, pairs, shifts)
    torch.testing.assert_close(e, energies[:, 0], rtol=1e-10, atol=0)
    torch.testing.assert_close(f, forces, rtol=1e-10, atol=1e-10)


def test_bad_pairs_are_rejected(tiny, exported64):
    numbers, positions, _ = tensors(tiny.subset(np.array([0])))
    pairs = torch.tensor([[0, 1], [1, 6]])
    with pytest.raises(torch.jit.Error, match="atom indices below 6"):
        exported64(numbers, positions, pairs)
    with pytest.raises(torch.jit.Error, match="shifts must be"):
        exported64(numbers, positions, pairs[:, :1], torch.zeros(2, 3))
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("z", [3, 200])
def test_unknown_element_is_named(tiny, exported64, z):
    numbers, positions, _ = tensors(tiny.subset(np.array([0])))
    numbers = numbers.clone()
    numbers[1] = z
    with pytest.raises(torch.jit.Error, match=rf"Z = \[{z}\]"):
        exported64(numbers, positions)


def test_metadata_is_stored_in_the_file(model64, tmp_path):
    export_model(model64, tmp_path / "model.ts")
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(tmp_path / "model.ts", _extra_files=extra)
    meta = json.loads(extra[METADATA_FILE])
    assert meta["format"] == "lmlp.torchscript" and meta["format_version"] == 1
    assert meta["units"] == {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom"}
    assert meta["elements"] == model64.elements.tolist()
    assert meta["cutoff"] == 12.0 and meta["members"] == 3 and meta["dtype"] == "float64"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ts"]  # no temporary file left


@pytest.mark.parametrize(("activation", "angular_form", "kind"),
                         [("silu", "g5", "eeacsf"), ("scaled_tanh", "g4", "eeacsf"), ("tanh", "g5", "acsf")])
def test_activation_and_descriptor_variants_are_exported(tiny, tmp_path, activation, angular_form, kind):
    model = build(tiny, activation, angular_form, kind)
    module = exported(model, tmp_path)
    numbers, positions, offsets = tensors(tiny.subset(np.array([0])))
    energies, forces = model(numbers, positions, offsets)
    e, f = module(numbers, positions)
    torch.testing.assert_close(e, energies[:, 0], rtol=1e-10, atol=0)
    torch.testing.assert_close(f, forces, rtol=1e-10, atol=1e-10)


def test_export_command_writes_a_loadable_module(tiny, model64, tmp_path):
    import subprocess
    import sys

    from lmlp.modelfile import save_model

    save_model(tmp_path / "model.pt", model64)
    done = subprocess.run([sys.executable, "-m", "lmlp", "export", str(tmp_path / "model.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    numbers, positions, _ = tensors(tiny.subset(np.arange(1)))
    energies, forces = load(tmp_path / "model.ts")(numbers, positions)
    expected, expected_forces = model64(numbers, positions, torch.tensor([0, 6]))
    torch.testing.assert_close(energies, expected[:, 0], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(forces, expected_forces, rtol=1e-10, atol=1e-10)
