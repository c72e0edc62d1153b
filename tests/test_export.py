"""torch.export export: the saved program reproduces the Python ensemble (energies eV, forces eV/Å,
virials eV) on host neighbour lists, without TorchScript."""

import itertools
import json
import subprocess
import sys
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
from lmlp.export import FORMAT, METADATA_FILE, ExportedPotential, export_model, load_exported
from lmlp.model import HDNNPEnsemble, fit_reference_energies
from lmlp.modelfile import save_model


@pytest.fixture(scope="module")
def tiny():
    s, _ = read_structures(TINY)
    return s.subset(np.arange(12))


def build(s, activation: str = "scaled_tanh", angular_form: str = "g5", kind: str = "eeacsf",
          **descriptor) -> HDNNPEnsemble:
    """A 3-member float64 ensemble with hidden=[8, 8] on the default descriptor settings of ``s``
    (``descriptor``: further DescriptorConfig keys)."""
    elements = sorted(set(s.numbers.tolist()))
    config = DescriptorConfig(angular_form=angular_form, kind=kind, **descriptor)
    sf = SymmetryFunctions.from_config(config, elements)
    numbers, positions, offsets = tensors(s)
    e_ref = torch.from_numpy(fit_reference_energies(s.numbers, s.offsets, s.energy, elements))
    return HDNNPEnsemble(sf, Standardizer.fit(sf(numbers, positions, offsets)), elements, e_ref,
                         hidden=[8, 8], activation=activation, members=3)


def tensors(s) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """numbers (N,), positions (N, 3) Å, offsets (S + 1,)."""
    return torch.from_numpy(s.numbers), torch.from_numpy(s.positions), torch.from_numpy(s.offsets)


def exported(model: HDNNPEnsemble, tmp_path) -> ExportedPotential:
    """``model`` exported to a file and loaded back."""
    export_model(model, tmp_path / "model.pt2")
    return load_exported(tmp_path / "model.pt2")


@pytest.fixture(scope="module")
def model64(tiny):
    return build(tiny)


@pytest.fixture(scope="module")
def exported64(model64, tmp_path_factory):
    return exported(model64, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def model_g4(tiny):
    return build(tiny, angular_form="g4")


@pytest.fixture(scope="module")
def exported_g4(model_g4, tmp_path_factory):
    """A program over triples (the G4 form)."""
    return exported(model_g4, tmp_path_factory.mktemp("export_g4"))


def in_cell(positions: torch.Tensor, size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions centred in a cubic cell of edge ``size`` Å, and the cell (3, 3)."""
    return positions - positions.mean(0) + size / 2, torch.eye(3, dtype=torch.float64) * size


def ase_inputs(numbers, positions, cell, cutoff: float, angular_cutoff: float, meta) -> list[torch.Tensor]:
    """The program's inputs from ASE's neighbour list, as the module docstring builds them without
    lmlp (triples if ``meta["inputs"]`` lists them)."""
    atoms = Atoms(numbers=numbers.numpy(), positions=positions.numpy(), cell=cell.numpy(), pbc=True)
    i, j, d, S = neighbor_list("ijdS", atoms, cutoff)
    inputs = [torch.from_numpy(atoms.numbers), torch.from_numpy(atoms.positions), torch.from_numpy(np.stack([i, j])),
              torch.from_numpy(S @ atoms.cell.array)]
    if "triples" in meta["inputs"]:
        short = np.flatnonzero(d < angular_cutoff)
        triples = [(p, q) for c in np.unique(i[short]) for p, q in itertools.combinations(short[i[short] == c], 2)]
        inputs.append(torch.tensor(triples, dtype=torch.int64).reshape(-1, 2).T.contiguous())
    return inputs


def test_float64_export_equals_python_model(tiny, model64, exported64):
    for k in range(4):
        numbers, positions, offsets = tensors(tiny.subset(np.array([k])))
        energies, forces = model64(numbers, positions, offsets)
        e, f, w = exported64(numbers, positions)
        assert e.dtype == torch.float64 and f.shape == (3, len(numbers), 3) and w is None
        torch.testing.assert_close(e, energies[:, 0], rtol=1e-10, atol=0)
        torch.testing.assert_close(f, forces, rtol=1e-10, atol=1e-10)


def test_float32_export_equals_python_model_at_float32_round_off(tiny, tmp_path):
    model = build(tiny).float()
    potential = exported(model, tmp_path)
    for k in range(4):
        numbers, positions, offsets = tensors(tiny.subset(np.array([k])))
        energies, forces = model(numbers, positions.float(), offsets)
        e, f, _ = potential(numbers, positions)
        assert e.dtype == torch.float64 and f.dtype == torch.float32
        # Totals ≈ −360 eV of which the float32 network part is a few eV; forces up to ≈ 8 eV/Å.
        torch.testing.assert_close(e, energies[:, 0], rtol=0, atol=2e-5)
        torch.testing.assert_close(f, forces, rtol=1e-5, atol=1e-5)


def test_forces_are_minus_the_energy_gradient(tiny, exported64):
    numbers, positions, _ = tensors(tiny.subset(np.array([1])))
    forces = exported64(numbers, positions).forces
    h = 1e-5
    for atom, axis in [(0, 0), (2, 1), (4, 2), (5, 0)]:
        plus, minus = positions.clone(), positions.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        numeric = -(exported64(numbers, plus).energies - exported64(numbers, minus).energies) / (2 * h)
        torch.testing.assert_close(forces[:, atom, axis], numeric, rtol=1e-6, atol=1e-7)


def test_virials_are_the_strain_derivative_of_the_energy(tiny, exported64):
    numbers, positions, _ = tensors(tiny.subset(np.array([3])))
    positions, cell = in_cell(positions, 7.0)
    virials = exported64(numbers, positions, cell).virials
    assert virials.shape == (3, 3, 3) and virials.dtype == torch.float64
    h = 1e-6
    for a, b in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 0), (1, 2), (2, 0)]:
        strain = torch.zeros(3, 3, dtype=torch.float64)
        strain[a, b] = h
        plus, minus = torch.eye(3, dtype=torch.float64) + strain, torch.eye(3, dtype=torch.float64) - strain
        numeric = (exported64(numbers, positions @ plus.T, cell @ plus.T).energies
                   - exported64(numbers, positions @ minus.T, cell @ minus.T).energies) / (2 * h)
        torch.testing.assert_close(virials[:, a, b], numeric, rtol=1e-6, atol=1e-6)


def test_small_periodic_cell_equals_python_model(tiny, model64, exported64):
    numbers, positions, offsets = tensors(tiny.subset(np.array([3])))
    inside, cell = in_cell(positions, 7.0)
    energies, forces = model64(numbers, inside, offsets, cell[None], torch.ones(1, 3, dtype=torch.bool))
    e, f, _ = exported64(numbers, inside, cell)
    torch.testing.assert_close(e, energies[:, 0], rtol=1e-10, atol=0)
    torch.testing.assert_close(f, forces, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["g5", "g4"])
def test_program_runs_without_lmlp_on_a_host_list_with_a_skin(tiny, form, request, tmp_path):
    """torch.export.load and ASE's lists (cutoffs + 1 Å skin: the extra pairs and triples contribute 0),
    by moments (G5, no triples) and over triples (G4)."""
    model = request.getfixturevalue("model64" if form == "g5" else "model_g4")
    potential = request.getfixturevalue("exported64" if form == "g5" else "exported_g4")
    numbers, positions, offsets = tensors(tiny.subset(np.array([3])))
    inside, cell = in_cell(positions, 7.0)
    energies, forces = model(numbers, inside, offsets, cell[None], torch.ones(1, 3, dtype=torch.bool))
    export_model(model, tmp_path / "model.pt2")
    extra = {METADATA_FILE: ""}
    program = torch.export.load(tmp_path / "model.pt2", extra_files=extra)
    meta = json.loads(extra[METADATA_FILE])
    inputs = ase_inputs(numbers, inside, cell, meta["cutoff"] + 1.0, meta["angular_cutoff"] + 1.0, meta)
    assert len(inputs) == (4 if form == "g5" else 5)
    assert (inputs[3] != 0).any(dim=1).sum() > 0  # images take part
    e, f, w = program.module()(*inputs)
    torch.testing.assert_close(e, energies[:, 0], rtol=1e-10, atol=0)
    torch.testing.assert_close(f, forces, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, potential(numbers, inside, cell).virials, rtol=1e-10, atol=1e-10)


def test_molecule_in_a_big_periodic_cell_equals_the_molecule(tiny, exported64):
    numbers, positions, _ = tensors(tiny.subset(np.array([2])))
    centred, cell = in_cell(positions, 30.0)
    e, f, w = exported64(numbers, centred, cell)
    expected = exported64(numbers, positions)
    torch.testing.assert_close(e, expected.energies, rtol=1e-12, atol=0)
    torch.testing.assert_close(f, expected.forces, rtol=1e-10, atol=1e-10)
    assert w is not None


def test_no_autograd_graph_and_inference_mode_works(tiny, exported64):
    numbers, positions, _ = tensors(tiny.subset(np.array([0])))
    expected = exported64(numbers, positions)
    assert not any(t.requires_grad for t in expected[:2])
    with torch.inference_mode():
        e, f, _ = exported64(numbers, positions)
    torch.testing.assert_close(e, expected.energies, rtol=0, atol=0)
    torch.testing.assert_close(f, expected.forces, rtol=0, atol=0)


def test_bad_pairs_and_triples_are_rejected(tiny, exported64, exported_g4):
    numbers, positions, _ = tensors(tiny.subset(np.array([0])))
    pairs, triples = torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0], [1]])
    shifts = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"pairs must be \(2, K\) int64 atom indices below 6"):
        exported64.evaluate(numbers, positions, torch.tensor([[0, 1], [1, 6]]), shifts)
    with pytest.raises(ValueError, match="pairs must be"):
        exported64.evaluate(numbers, positions, pairs.T.reshape(1, 4), shifts)
    with pytest.raises(ValueError, match=r"shifts must be \(P, 3\) with P = 2"):
        exported64.evaluate(numbers, positions, pairs, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="takes no triples"):
        exported64.evaluate(numbers, positions, pairs, shifts, triples)
    assert exported64.evaluate(numbers, positions, pairs, shifts)[0].shape == (3,)
    with pytest.raises(ValueError, match="takes triples"):
        exported_g4.evaluate(numbers, positions, pairs, shifts)
    with pytest.raises(ValueError, match="triples must be .* pair indices below 2"):
        exported_g4.evaluate(numbers, positions, pairs, shifts, torch.tensor([[0], [2]]))
    assert exported_g4.evaluate(numbers, positions, pairs, shifts, triples)[0].shape == (3,)


@pytest.mark.parametrize("z", [3, 200])
def test_unknown_element_is_named(tiny, exported64, z):
    numbers, positions, _ = tensors(tiny.subset(np.array([0])))
    numbers = numbers.clone()
    numbers[1] = z
    with pytest.raises(ValueError, match=rf"Z = \[{z}\]"):
        exported64(numbers, positions)
    no_pairs = torch.zeros(2, 0, dtype=torch.int64)
    outputs = exported64.program.module()(numbers, positions, no_pairs, torch.zeros(0, 3, dtype=torch.float64))
    assert all(t.isnan().all() for t in outputs)  # the program itself cannot raise


def test_metadata_is_stored_in_the_file(model64, exported_g4, tmp_path):
    export_model(model64, tmp_path / "model.pt2")
    extra = {METADATA_FILE: ""}
    torch.export.load(tmp_path / "model.pt2", extra_files=extra)
    meta = json.loads(extra[METADATA_FILE])
    assert meta["format"] == FORMAT == "lmlp.export" and meta["format_version"] == 3
    assert meta["units"] == {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom"}
    assert meta["elements"] == model64.elements.tolist()
    assert meta["cutoff"] == 12.0 and meta["angular_cutoff"] == 6.0 and meta["cutoff_function"] == "cos"
    assert meta["members"] == 3 and meta["dtype"] == "float64" and meta["activation"] == "scaled_tanh"
    assert list(meta["inputs"]) == ["numbers", "positions", "pairs", "shifts"]  # G5 by moments: no triples
    assert list(exported_g4.metadata["inputs"]) == ["numbers", "positions", "pairs", "shifts", "triples"]
    assert list(meta["outputs"]) == ["energies", "forces", "virials"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # no temporary file left


def test_export_uses_no_torchscript(tiny, model64, tmp_path, monkeypatch):
    for name in ("script", "trace", "save", "load"):
        monkeypatch.setattr(torch.jit, name, lambda *args, **kwargs: pytest.fail("torch.jit was used"))
    numbers, positions, _ = tensors(tiny.subset(np.array([0])))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        exported(model64, tmp_path)(numbers, positions)


@pytest.mark.parametrize(("activation", "angular_form", "kind", "descriptor"), [
    ("silu", "g5", "eeacsf", {}), ("scaled_tanh", "g4", "eeacsf", {}), ("tanh", "g5", "acsf", {}),
    ("scaled_tanh", "g4", "eeacsf", {"angular_cutoff": 3.5, "cutoff_function": "poly2"}),
])
def test_activation_and_descriptor_variants_are_exported(tiny, tmp_path, activation, angular_form, kind, descriptor):
    model = build(tiny, activation, angular_form, kind, **descriptor)
    potential = exported(model, tmp_path)
    numbers, positions, offsets = tensors(tiny.subset(np.array([0])))
    energies, forces = model(numbers, positions, offsets)
    e, f, _ = potential(numbers, positions)
    torch.testing.assert_close(e, energies[:, 0], rtol=1e-10, atol=0)
    torch.testing.assert_close(f, forces, rtol=1e-10, atol=1e-10)


def test_export_command_writes_a_loadable_program(tiny, model64, tmp_path):
    save_model(tmp_path / "model.pt", model64)
    done = subprocess.run([sys.executable, "-m", "lmlp", "export", str(tmp_path / "model.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    numbers, positions, _ = tensors(tiny.subset(np.arange(1)))
    energies, forces, _ = load_exported(tmp_path / "model.pt2")(numbers, positions)
    expected, expected_forces = model64(numbers, positions, torch.tensor([0, 6]))
    torch.testing.assert_close(energies, expected[:, 0], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(forces, expected_forces, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_aoti_package_equals_the_program(tiny, model64, tmp_path):
    """``lmlp export --aoti`` compiles a C++-loadable package (about a minute) that computes the same."""
    save_model(tmp_path / "model.pt", model64)
    done = subprocess.run([sys.executable, "-m", "lmlp", "export", str(tmp_path / "model.pt"), "--aoti"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    compiled = torch._inductor.aoti_load_package(str(tmp_path / "model.aoti.pt2"))
    assert json.loads(compiled.get_metadata()[METADATA_FILE])["format"] == FORMAT
    potential = load_exported(tmp_path / "model.pt2")
    numbers, positions, _ = tensors(tiny.subset(np.array([3])))
    inside, cell = in_cell(positions, 7.0)
    meta = potential.metadata
    for inputs in (ase_inputs(numbers, inside, cell, 12.0, 12.0, meta),
                   ase_inputs(numbers[:1], inside[:1], cell, 5.0, 5.0, meta)):
        for got, expected in zip(compiled(*inputs), potential.evaluate(*inputs)):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
