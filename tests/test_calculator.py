import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.optimize import BFGS
from factories import TINY

import lmlp.calculator as calculator
from lmlp.calculator import LMLPCalculator, TooCloseWarning, UncertaintyThresholds, UnknownElementError
from lmlp.config import DescriptorConfig
from lmlp.data import read_structures
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.errors import LmlpError
from lmlp.metrics import evaluate_model
from lmlp.model import HDNNPEnsemble, fit_reference_energies
from lmlp.modelfile import save_model

INDICES = (0, 57, 130)
"""Structures of three different reactions of the tiny set."""


@pytest.fixture(scope="module")
def tiny():
    return read_structures(TINY)[0]


def build_model(s, descriptor: DescriptorConfig = DescriptorConfig(), hidden=(8, 8), members=3) -> HDNNPEnsemble:
    """An untrained float64 ensemble knowing every element of ``s``, with random biases."""
    elements = sorted(set(s.numbers.tolist()))
    sf = SymmetryFunctions.from_config(descriptor, elements)
    G = sf(*map(torch.from_numpy, (s.numbers, s.positions, s.offsets)))
    e_ref = torch.from_numpy(fit_reference_energies(s.numbers, s.offsets, s.energy, elements))
    model = HDNNPEnsemble(sf, Standardizer.fit(G), elements, e_ref, hidden=list(hidden), members=members)
    generator = torch.Generator().manual_seed(1)
    for network in model.networks:
        for b in network.biases:
            b.data.normal_(generator=generator)
    return model


@pytest.fixture(scope="module")
def model(tiny):
    return build_model(tiny)


@pytest.fixture(params=["moments", "triples"])
def angular_items(request, monkeypatch):
    """G5 functions by moments or over triples, whichever ``_moments_pay_off`` would pick."""
    monkeypatch.setattr(LMLPCalculator, "_moments_pay_off", lambda self, *args: request.param == "moments")
    return request.param


def reference(model: HDNNPEnsemble, atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
    """Member energies (M,) and forces (M, N, 3) from the model's autograd path."""
    periodic = bool(atoms.pbc.any())
    energies, forces = model(
        torch.from_numpy(atoms.numbers), torch.from_numpy(atoms.positions), torch.tensor([0, len(atoms)]),
        torch.from_numpy(atoms.cell.array)[None] if periodic else None,
        torch.from_numpy(atoms.pbc)[None] if periodic else None,
    )
    return energies[:, 0].numpy(), forces.numpy()


def assert_matches_model(calc: LMLPCalculator, model: HDNNPEnsemble, atoms: Atoms) -> None:
    atoms.calc = calc
    forces = atoms.get_forces()
    energies, member_forces = reference(model, atoms)
    r = calc.results
    np.testing.assert_allclose(r["energies"], energies, rtol=0, atol=1e-9)
    np.testing.assert_allclose(r["forces_members"], member_forces, rtol=0, atol=1e-10)
    assert atoms.get_potential_energy() == pytest.approx(energies.mean(), abs=1e-9)
    assert r["free_energy"] == r["energy"]
    np.testing.assert_allclose(forces, member_forces.mean(0), rtol=0, atol=1e-10)
    assert r["energy_uncertainty"] == pytest.approx(np.std(energies, ddof=1), abs=1e-9)
    np.testing.assert_allclose(r["forces_uncertainty"], np.std(member_forces, axis=0, ddof=1), atol=1e-10)


@pytest.mark.parametrize(("descriptor", "hidden"), [
    (DescriptorConfig(), (8, 8)),
    (DescriptorConfig(angular_form="g4"), (8,)),
    (DescriptorConfig(kind="acsf"), ()),
    (DescriptorConfig(), (6, 5, 4)),
    (DescriptorConfig(angular_cutoff=3.0, cutoff_function="poly2"), (8,)),
    (DescriptorConfig(angular_form="g4", angular_cutoff=4.0, cutoff_function="poly1"), (8,)),
])
def test_members_equal_the_model_forward(tiny, descriptor, hidden, angular_items):
    model = build_model(tiny, descriptor, hidden)
    calc = LMLPCalculator(model)
    for i in INDICES:
        assert_matches_model(calc, model, tiny.atoms(i))
    assert calc._neighbours.terms.moments == (angular_items == "moments" and descriptor.angular_form == "g5")


@pytest.mark.parametrize("backend", ["eager", pytest.param("compile", marks=pytest.mark.slow)])
@pytest.mark.parametrize("form", ["g4", "g5"])
def test_kernel_backends_equal_the_model_forward(tiny, backend, form, monkeypatch):
    monkeypatch.setattr(LMLPCalculator, "_moments_pay_off", lambda self, *args: True)  # G5 by moments
    model = build_model(tiny, DescriptorConfig(angular_form=form, angular_cutoff=4.0, cutoff_function="poly2"))
    calc = LMLPCalculator(model, backend=backend)
    for i in INDICES:
        assert_matches_model(calc, model, tiny.atoms(i))


def test_unknown_backend_is_named(model):
    with pytest.raises(ValueError, match="unknown kernel backend 'jit'"):
        LMLPCalculator(model, backend="jit")


def test_blocked_and_per_element_paths_equal_the_model_forward(tiny, model, monkeypatch, angular_items):
    monkeypatch.setattr(calculator, "BLOCK_FLOATS", 400)
    monkeypatch.setattr(calculator, "GATHER_FLOATS", 0)
    calc = LMLPCalculator(model)
    for i in INDICES:
        assert_matches_model(calc, model, tiny.atoms(i))
    assert not calc._networks.gathered


@pytest.mark.parametrize("pbc", [(True, True, True), (True, False, True)])
def test_periodic_cells_equal_the_model_forward(tiny, pbc, angular_items):
    model = build_model(tiny, DescriptorConfig(cutoff=5.0))
    atoms = tiny.atoms(3)
    atoms.calc = None
    atoms.set_cell(np.diag([6.0, 7.0, 6.5]))
    atoms.pbc = pbc
    assert_matches_model(LMLPCalculator(model), model, atoms)


@pytest.mark.parametrize("blocked", [False, True])
def test_stress_equals_the_strain_derivative_of_the_energy(tiny, monkeypatch, blocked, angular_items):
    if blocked:
        monkeypatch.setattr(calculator, "BLOCK_FLOATS", 400)
        monkeypatch.setattr(calculator, "GATHER_FLOATS", 0)
    model = build_model(tiny, DescriptorConfig(cutoff=5.0, angular_cutoff=3.5))
    atoms = tiny.atoms(3)
    atoms.set_cell([[6.0, 0.3, 0.0], [-0.4, 5.5, 0.2], [0.1, 0.0, 6.2]])  # triclinic, images within the cutoff
    atoms.pbc = True
    atoms.calc = LMLPCalculator(model)
    stress = atoms.get_stress(voigt=False)
    numerical = np.zeros((3, 3))
    h = 1e-5
    for a, b in np.ndindex(3, 3):  # (1/V) ∂E/∂ε_ab, strained cell (I + ε) h, atoms moved along
        energies = []
        for step in (h, -h):
            strain = np.eye(3)
            strain[a, b] += step
            strained = atoms.copy()
            strained.calc = LMLPCalculator(model)
            strained.set_cell(atoms.cell.array @ strain.T, scale_atoms=True)
            energies.append(strained.get_potential_energy())
        numerical[a, b] = (energies[0] - energies[1]) / (2 * h * atoms.get_volume())
    np.testing.assert_allclose(stress, numerical, rtol=0, atol=1e-7)
    assert np.abs(stress).max() > 1e-2
    stress = atoms.get_stress()
    assert atoms.calc.results["stress_members"].shape == (3, 6)
    np.testing.assert_allclose(atoms.calc.results["stress_members"].mean(0), stress, rtol=1e-12)


def test_stress_is_computed_once_asked_for(tiny, model):
    atoms = tiny.atoms(3)
    atoms.calc = None
    atoms.set_cell(np.diag([6.0, 7.0, 6.5]))
    atoms.pbc = True
    atoms.calc = LMLPCalculator(model)
    atoms.get_forces()
    assert "stress" not in atoms.calc.results
    stress = atoms.get_stress()
    atoms.positions[0] += 0.01
    atoms.get_forces()  # as NPT drivers do: forces, then stress of the same positions
    assert "stress" in atoms.calc.results and not np.array_equal(atoms.calc.results["stress"], stress)
    calculations = atoms.calc.n_calculations
    atoms.get_stress()
    assert atoms.calc.n_calculations == calculations


def test_molecules_have_no_stress(tiny, model):
    atoms = tiny.atoms(0)
    atoms.calc = LMLPCalculator(model)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_verlet_list_follows_atoms_across_the_cutoff(tiny, angular_items):
    model = build_model(tiny, DescriptorConfig(cutoff=4.0))
    calc = LMLPCalculator(model, skin=0.5)
    atoms = tiny.atoms(0)
    atoms.calc = None
    direction = atoms.positions[4] - atoms.positions[0]
    direction /= np.linalg.norm(direction)
    for distance in np.arange(3.3, 4.8, 0.15):  # the halide leaves the carbon's cutoff sphere
        atoms.positions[4] = atoms.positions[0] + distance * direction
        assert_matches_model(calc, model, atoms)


def test_verlet_list_follows_a_deforming_cell(tiny, angular_items):
    """NPT: the list is kept through cell changes that bring no pair from beyond it inside the cutoff
    (its image shifts follow the cell), rebuilt otherwise, and matches the model's forward pass."""
    model = build_model(tiny, DescriptorConfig(cutoff=4.0, angular_cutoff=3.0))
    calc = LMLPCalculator(model, skin=1.0)
    atoms = tiny.atoms(3)
    atoms.calc = None
    atoms.set_cell([[5.0, 0.2, 0.0], [-0.3, 4.6, 0.1], [0.0, 0.2, 4.8]])  # triclinic, images within the cutoff
    atoms.pbc = True
    assert_matches_model(calc, model, atoms)
    built = calc._neighbours
    rng = np.random.default_rng(0)
    for _ in range(4):  # small strains and moves: same list, image shifts in the new cell
        strain = np.eye(3) + rng.uniform(-0.01, 0.01, (3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.01, atoms.positions.shape)
        assert_matches_model(calc, model, atoms)
        assert calc._neighbours.reference is built.reference
    atoms.set_cell(atoms.cell.array * 1.2, scale_atoms=True)  # expanded: pairs only leave the cutoff
    assert_matches_model(calc, model, atoms)
    assert calc._neighbours.reference is built.reference
    atoms.set_cell(atoms.cell.array * 0.6, scale_atoms=True)  # 0.72 × the build: pairs beyond the list come in
    assert_matches_model(calc, model, atoms)
    assert calc._neighbours.reference is not built.reference
    atoms.positions[0] += 0.6  # an atom moves more than skin/2 in the new cell: rebuild
    built = calc._neighbours
    assert_matches_model(calc, model, atoms)
    assert calc._neighbours.reference is not built.reference


def test_forces_are_minus_the_energy_gradient(tiny, model):
    atoms = tiny.atoms(57)
    atoms.calc = LMLPCalculator(model)
    forces = atoms.get_forces().copy()
    h = 1e-5
    for atom, axis in [(0, 0), (2, 1), (4, 2), (5, 0)]:
        energies = []
        for step in (h, -h):
            moved = atoms.copy()
            moved.calc = atoms.calc
            moved.positions[atom, axis] += step
            energies.append(moved.get_potential_energy())
        assert forces[atom, axis] == pytest.approx(-(energies[0] - energies[1]) / (2 * h), abs=1e-6)


def test_member_rmses_equal_evaluate_model(tiny, model):
    test = tiny.subset(tiny.split["test"][:8])
    calc = LMLPCalculator(model)
    energies, forces = [], []
    for i in range(len(test)):
        atoms = test.atoms(i)
        atoms.calc = calc
        atoms.get_forces()
        energies.append(calc.results["energies"])
        forces.append(calc.results["forces_members"])
    de = (np.stack(energies, 1) - test.energy) / test.n_atoms * 1000  # (M, S) meV/atom
    df = (np.concatenate(forces, 1) - test.forces) * 1000  # (M, N, 3) meV/Å
    expected = evaluate_model(model, test)["all"]
    np.testing.assert_allclose(np.sqrt((de**2).mean(1)), expected.rmse_e, rtol=1e-9)
    np.testing.assert_allclose(np.sqrt((df**2).mean((1, 2))), expected.rmse_f, rtol=1e-9)
    assert np.sqrt((de.mean(0) ** 2).mean()) == pytest.approx(expected.ensemble["rmse_e"], rel=1e-9)


def test_float32_calculation_leaves_the_model_alone(tiny, model, angular_items):
    atoms = tiny.atoms(130)
    atoms.calc = LMLPCalculator(model, dtype=torch.float32)
    energies, forces = reference(model, atoms)
    assert atoms.get_potential_energy() == pytest.approx(energies.mean(), abs=1e-4)
    np.testing.assert_allclose(atoms.get_forces(), forces.mean(0), atol=1e-4)
    assert next(model.parameters()).dtype == torch.float64


def test_model_file_gives_thresholds_and_minimum_distance(tmp_path, tiny, model):
    metadata = {"test_rmse_e": [2.0, 4.0], "test_rmse_f": [100.0, 300.0], "min_pair_distance": 0.7}
    save_model(tmp_path / "model.pt", model, metadata)
    calc = LMLPCalculator(tmp_path / "model.pt")
    assert calc.uncertainty_thresholds == UncertaintyThresholds(
        energy_per_atom=calculator.ENERGY_FACTOR * 3.0e-3, forces=calculator.FORCE_FACTOR * 0.2)
    assert calc.min_distance == 0.7
    validated = {**metadata, "validation_rmse_e": [1.0, 1.0], "validation_rmse_f": [50.0, 50.0]}
    assert UncertaintyThresholds.from_metadata(validated) == UncertaintyThresholds(
        energy_per_atom=calculator.ENERGY_FACTOR * 1.0e-3, forces=calculator.FORCE_FACTOR * 0.05)
    atoms = tiny.atoms(0)
    atoms.calc = calc
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_matches_model(calc, model, atoms)
    assert calc.too_close_count == 0
    r = calc.results
    uncertain = (r["energy_uncertainty"] / 6 > calc.uncertainty_thresholds.energy_per_atom
                 or r["forces_uncertainty"].max() > calc.uncertainty_thresholds.forces)
    assert calc.is_uncertain() == uncertain
    calc.uncertainty_thresholds = UncertaintyThresholds(np.inf, 0.0)
    assert calc.is_uncertain(atoms)
    calc.uncertainty_thresholds = UncertaintyThresholds(np.inf, np.inf)
    assert not calc.is_uncertain(atoms)


def test_unknown_element_is_a_one_line_error(model):
    atoms = Atoms("NaCl", positions=[[0, 0, 0], [0, 0, 2.4]])
    atoms.calc = LMLPCalculator(model)
    with pytest.raises(UnknownElementError, match=r"has Na \(Z = 11\)$") as error:
        atoms.get_potential_energy()
    assert isinstance(error.value, LmlpError) and isinstance(error.value, ValueError)
    assert "\n" not in str(error.value) and "H, C, F, Cl, Br, I" in str(error.value)


def test_too_close_atoms_warn_once_and_are_counted(tiny, model):
    calc = LMLPCalculator(model, min_distance=1.2)  # C–H bonds are 1.1 Å
    atoms = tiny.atoms(0)
    atoms.calc = calc
    with pytest.warns(TooCloseWarning, match="closer than any pair of the training data"):
        atoms.get_potential_energy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atoms.positions[0, 0] += 0.01
        atoms.get_potential_energy()
        atoms.positions[1] = atoms.positions[0] + [2.0, 0.0, 0.0]
        atoms.positions[2] = atoms.positions[0] + [0.0, 2.0, 0.0]
        atoms.positions[3] = atoms.positions[0] + [0.0, 0.0, -2.0]
        atoms.get_potential_energy()
    assert calc.too_close_count == 2
    assert "3 calculations; 2 with atoms closer than the training minimum 1.200 Å" in calc.summary()


def test_bfgs_lowers_the_energy(tiny, model):
    atoms = tiny.atoms(130)
    atoms.calc = LMLPCalculator(model)
    before = atoms.get_potential_energy()
    optimizer = BFGS(atoms, logfile=None)
    optimizer.run(fmax=0.01, steps=8)
    assert atoms.get_potential_energy() < before - 0.01
    assert optimizer.nsteps == 8


def test_angular_items_are_triples_for_a_molecule_and_moments_in_a_dense_cell(tiny, model):
    calc = LMLPCalculator(model)
    atoms = tiny.atoms(0)
    atoms.calc = calc
    atoms.get_potential_energy()
    assert not calc._neighbours.terms.moments and calc._neighbours.items.shape[0] == 2
    atoms.set_cell(np.diag([5.0, 5.0, 5.0]))  # periodic images: ~70 neighbours per atom within 7 Å
    atoms.pbc = True
    assert_matches_model(calc, model, atoms)
    assert calc._neighbours.terms.moments and calc._neighbours.items.shape[0] == 1


def force_blocks(monkeypatch) -> None:
    """The blocked path with per-element networks even for a few atoms, and free radial bands
    (``BAND_OVERHEAD`` 0: even these few pairs are split by their first needed term)."""
    monkeypatch.setattr(calculator, "BLOCK_FLOATS", 20_000)
    monkeypatch.setattr(calculator, "GATHER_FLOATS", 0)
    monkeypatch.setattr(calculator.kernels, "BAND_OVERHEAD", 0)


def dense_cell(tiny) -> Atoms:
    """A tiny-set structure in a small periodic cell: hundreds of pairs per slot within 9 Å."""
    atoms = tiny.atoms(5)
    atoms.calc = None
    atoms.set_cell(np.diag([4.5, 5.0, 4.8]))
    atoms.pbc = True
    return atoms


@pytest.mark.parametrize("blocked", [False, True])
def test_dense_cells_contract_by_chunks(tiny, monkeypatch, blocked):
    """Hundreds of pairs per slot: the slot contraction runs in chunks (``kernels.chunk_layout``),
    through the whole-step kernel and block by block."""
    if blocked:
        force_blocks(monkeypatch)
    model = build_model(tiny, DescriptorConfig(cutoff=9.0, angular_cutoff=6.0))
    atoms = dense_cell(tiny)
    calc = LMLPCalculator(model)
    assert_matches_model(calc, model, atoms)
    nb = calc._neighbours
    assert len(nb.pair_blocks) > 1 if blocked else len(nb.pair_blocks) == 1
    assert (max(nb.pair_columns) > 0) == blocked  # far pairs skip the narrow shells in blocks
    bands = len(set(nb.pair_columns))  # a short last block (of each band of pairs) may gather instead
    for layouts, short in ((nb.pair_layouts, bands), (nb.angular_layouts, 1)):
        assert sum(layout is not None for layout in layouts) >= max(1, len(layouts) - short)
    atoms.positions += np.random.default_rng(0).normal(0.0, 0.1, atoms.positions.shape)
    assert_matches_model(calc, model, atoms)
    assert calc._neighbours is nb  # the same list and layouts


def test_radial_shells_in_any_order_skip_by_their_reach(tiny, monkeypatch):
    """Blocked, the radial terms are evaluated in the order of their reach (``_band_pairs``); shells
    listed in another order give the model's descriptors all the same."""
    force_blocks(monkeypatch)
    default = DescriptorConfig()
    rotated = {key: getattr(default, key)[5:] + getattr(default, key)[:5] for key in ("radial_eta", "radial_rs")}
    model = build_model(tiny, DescriptorConfig(cutoff=9.0, angular_cutoff=6.0, **rotated))
    atoms = dense_cell(tiny)
    calc = LMLPCalculator(model)
    assert_matches_model(calc, model, atoms)
    assert not torch.equal(calc._radial_order, calc._radial_inverse)  # a permutation that is not its own inverse
    assert max(calc._neighbours.pair_columns) > 0


def pair_between(nb, atoms: Atoms, low: float, high: float) -> tuple[int, torch.Tensor]:
    """A listed pair of two different atoms now between ``low`` and ``high`` Å apart: its index and
    its unit vector (3,)."""
    vectors = torch.from_numpy(atoms.positions)[nb.j] - torch.from_numpy(atoms.positions)[nb.i] + nb.shifts
    distances = vectors.norm(dim=1)
    p = int(torch.nonzero((distances > low) & (distances < high) & (nb.i != nb.j))[0])
    return p, vectors[p] / distances[p]


def approach(atoms: Atoms, nb, p: int, unit: torch.Tensor, scale: float, step: float) -> None:
    """Grow the cell by ``scale`` (atoms scaled with it) and move the two atoms of pair ``p`` ``step`` Å
    each towards one another."""
    atoms.set_cell(atoms.cell.array * scale, scale_atoms=True)
    atoms.positions[int(nb.i[p])] += step * unit.numpy()
    atoms.positions[int(nb.j[p])] -= step * unit.numpy()


def test_far_pairs_take_the_radial_terms_they_need_once_they_come_close(tiny, monkeypatch):
    """Blocked, the pairs evaluate only the radial terms not negligible at their build distance −
    skin (``_band_pairs``). A grown cell lets atoms move further (``_still_valid``): a block with a
    pair closer than its reach evaluates the terms from that pair's distance on, and the forces stay
    exact."""
    force_blocks(monkeypatch)
    first_terms = []
    columns = LMLPCalculator._radial_columns
    monkeypatch.setattr(LMLPCalculator, "_radial_columns",
                        lambda self, nb, r: first_terms.append(columns(self, nb, r)) or first_terms[-1])
    model = build_model(tiny, DescriptorConfig(cutoff=9.0, angular_cutoff=6.0))
    atoms = dense_cell(tiny)
    calc = LMLPCalculator(model)
    assert_matches_model(calc, model, atoms)
    built = calc._neighbours
    assert first_terms[-1] == built.pair_columns and max(built.pair_columns) > 0
    # a pair ~4.5 Å apart skips the shells centred at 0.9 and 1.1 Å (reach 3.1, 3.3 Å); in a cell
    # grown 2× its atoms may approach by 2 × 3.8 Å (the angular list allows 2 × 4 Å), to ~1.4 Å
    p, unit = pair_between(built, atoms, 4.4, 4.6)
    approach(atoms, built, p, unit, 2.0, 3.8)
    assert_matches_model(calc, model, atoms)
    assert calc._neighbours.reference is built.reference
    reset = [b for b, (now, then) in enumerate(zip(first_terms[-1], built.pair_columns)) if now != then]
    assert reset and all(first_terms[-1][b] < built.pair_columns[b] for b in reset)


def test_grown_cells_keep_the_angular_items_complete(tiny, angular_items):
    """A grown cell allows the atoms to move less for the angular items' list (angular cutoff + skin)
    than for the pairs' (``_still_valid``): a pair from beyond the angular list that comes inside
    the angular cutoff makes the list rebuild."""
    model = build_model(tiny, DescriptorConfig(cutoff=9.0, angular_cutoff=6.0))
    atoms = dense_cell(tiny)
    calc = LMLPCalculator(model)
    assert_matches_model(calc, model, atoms)
    built = calc._neighbours
    p, unit = pair_between(built, atoms, 7.1, 7.4)  # beyond the 7 Å angular list
    approach(atoms, built, p, unit, 1.5, 2.9)  # to ~5.1 Å: the pairs' list allows 2 × 3 Å, the angular 2 × 2.25
    assert_matches_model(calc, model, atoms)
    assert calc._neighbours.reference is not built.reference


def test_an_atom_without_neighbours_matches_the_model(model):
    """No pairs: the whole-step kernel has no blocks and no layouts."""
    assert_matches_model(LMLPCalculator(model), model, Atoms("C", positions=[[0.0, 0.0, 0.0]]))


def test_one_calculator_serves_several_compositions(tiny, model):
    calc = LMLPCalculator(model)
    for i in (*INDICES, 0):
        assert_matches_model(calc, model, tiny.atoms(i))
    fragment = Atoms("HCH", positions=[[0, 0, 0], [0, 0, 1.1], [1.0, 0, 1.5]])
    assert_matches_model(calc, model, fragment)


def test_calculator_keeps_freed_memory(model, monkeypatch):
    import lmlp.memory

    calls = []
    monkeypatch.setattr(lmlp.memory, "keep_freed_memory", lambda: calls.append(True))
    LMLPCalculator(model)
    assert calls == [True]


@pytest.mark.parametrize("blocked", [False, True])
def test_mean_forces_equal_the_members_mean(tiny, monkeypatch, blocked, angular_items):
    """``member_forces=False`` contracts the members' mean dE/dG once: the same ensemble forces and
    stress, the energies and their uncertainty kept, no member forces."""
    if blocked:
        monkeypatch.setattr(calculator, "BLOCK_FLOATS", 400)
        monkeypatch.setattr(calculator, "GATHER_FLOATS", 0)
    model = build_model(tiny, DescriptorConfig(cutoff=5.0, angular_cutoff=3.5))
    atoms = tiny.atoms(3)
    atoms.set_cell([[6.0, 0.3, 0.0], [-0.4, 5.5, 0.2], [0.1, 0.0, 6.2]])
    atoms.pbc = True
    for i in range(2):
        atoms.calc = LMLPCalculator(model)
        stress, members = atoms.get_stress(), atoms.calc.results
        atoms.calc = LMLPCalculator(model, member_forces=False)
        np.testing.assert_allclose(atoms.get_stress(), stress, rtol=0, atol=1e-12)
        mean = atoms.calc.results
        np.testing.assert_allclose(mean["forces"], members["forces"], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(mean["energies"], members["energies"])
        assert mean["energy_uncertainty"] == members["energy_uncertainty"] > 0
        assert not {"forces_members", "forces_uncertainty", "stress_members"} & set(mean)
        atoms.positions[0] += 0.2


def test_mean_forces_flag_by_energy_alone(tiny, model):
    atoms = tiny.atoms(0)
    atoms.calc = LMLPCalculator(model, member_forces=False)
    atoms.get_forces()
    sigma = atoms.calc.results["energy_uncertainty"] / len(atoms)
    assert UncertaintyThresholds(sigma * 1.01, 0.0).exceeded(atoms.calc.results, len(atoms)) is False
    assert UncertaintyThresholds(sigma * 0.99, 0.0).exceeded(atoms.calc.results, len(atoms)) is True
