import numpy as np
import pytest
import torch
from factories import TINY
from scipy.spatial.transform import Rotation

from lmlp.config import DescriptorConfig
from lmlp.data import read_structures
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.model import HDNNPEnsemble, StackedMLP, fit_reference_energies


@pytest.fixture(scope="module")
def tiny():
    s, _ = read_structures(TINY)
    return s.subset(np.arange(12))


def build(s, members=3, seed=0) -> HDNNPEnsemble:
    sf = SymmetryFunctions.from_config(DescriptorConfig())
    numbers, positions, offsets = map(torch.from_numpy, (s.numbers, s.positions, s.offsets))
    G = sf(numbers, positions, offsets)
    elements = sorted(set(s.numbers.tolist()))
    e_ref = torch.from_numpy(fit_reference_energies(s.numbers, s.offsets, s.energy, elements))
    return HDNNPEnsemble(sf, Standardizer.fit(G), elements, e_ref, hidden=[8, 8], members=members, seed=seed)


def tensors(s):
    return torch.from_numpy(s.numbers), torch.from_numpy(s.positions), torch.from_numpy(s.offsets)


def test_reference_energies_reproduce_composition_fit():
    numbers = np.array([1, 1, 8, 1, 8, 8, 6])
    offsets = np.array([0, 3, 6, 7])
    e_ref = {1: -13.6, 6: -1030.0, 8: -2040.0}
    energies = np.array([sum(e_ref[z] for z in numbers[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    np.testing.assert_allclose(fit_reference_energies(numbers, offsets, energies, [1, 6, 8]),
                               [e_ref[1], e_ref[6], e_ref[8]], rtol=1e-10)
    np.testing.assert_allclose(fit_reference_energies(numbers, offsets, energies, [8, 1], known={6: e_ref[6]}),
                               [e_ref[8], e_ref[1]], rtol=1e-10)


def test_stacked_members_equal_separate_networks():
    net = StackedMLP(4, [5, 7, 3, 1], "scaled_tanh", seeds=[10, 11, 12, 13])
    x = torch.randn(9, 5, dtype=torch.float64)
    out = net(x)
    for m in range(4):
        h = x
        for k, (w, b) in enumerate(zip(net.weights, net.biases)):
            h = h @ w[m] + b[m]
            if k < 2:
                h = 1.59223 * torch.tanh(h)
        torch.testing.assert_close(out[m], h[:, 0], rtol=1e-14, atol=1e-14)
    again = StackedMLP(4, [5, 7, 3, 1], "scaled_tanh", seeds=[10, 11, 12, 13])
    torch.testing.assert_close(again(x), out, rtol=0, atol=0)
    assert not torch.equal(net.weights[0][0], net.weights[0][1])


@pytest.mark.parametrize("activation", ["scaled_tanh", "tanh", "silu", "softplus"])
@pytest.mark.parametrize("sizes", [[5, 1], [5, 7, 1], [5, 7, 3, 4, 1]])
def test_written_out_input_gradient_equals_autograd(activation, sizes):
    net = StackedMLP(3, sizes, activation, seeds=[1, 2, 3])
    for b in net.biases:
        b.data.normal_(generator=torch.Generator().manual_seed(4))
    x = torch.randn(6, sizes[0], dtype=torch.float64, requires_grad=True)
    out, grad = net.with_input_gradient(x)
    torch.testing.assert_close(out, net(x), rtol=1e-14, atol=1e-14)
    for m in range(3):
        (expected,) = torch.autograd.grad(net(x)[m].sum(), x)
        torch.testing.assert_close(grad[m], expected, rtol=1e-13, atol=1e-13)
    scale = torch.linspace(0.5, 2.0, sizes[0], dtype=torch.float64)
    torch.testing.assert_close(net.with_input_gradient(x, scale)[1], grad * scale, rtol=1e-14, atol=1e-14)


def test_force_loss_weight_gradients_equal_double_backward(tiny):
    model = build(tiny)
    numbers, positions, offsets = tensors(tiny)
    G, derivatives = model.descriptor.with_derivatives(numbers, positions, offsets)
    _, forces = model.from_descriptors(G, derivatives.by_centre(len(numbers)), numbers, offsets)
    written_out = torch.autograd.grad((forces**2).sum(), list(model.parameters()), allow_unused=True)
    pos = positions.clone().requires_grad_(True)
    atomic = model.atomic_energies(model.descriptor(numbers, pos, offsets), numbers)
    reference = torch.stack([torch.autograd.grad(a.sum(), pos, create_graph=True)[0] for a in atomic])
    double = torch.autograd.grad((reference**2).sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(written_out, double):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_forces_are_minus_energy_gradient(tiny):
    model = build(tiny)
    numbers, positions, offsets = tensors(tiny.subset(np.arange(2)))
    energies, forces = model(numbers, positions, offsets)
    h = 1e-5
    for atom, axis in [(0, 0), (4, 2), (5, 1), (11, 0)]:
        plus, minus = positions.clone(), positions.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        numeric = -(model(numbers, plus, offsets)[0] - model(numbers, minus, offsets)[0]).sum(1) / (2 * h)
        torch.testing.assert_close(forces[:, atom, axis], numeric, rtol=1e-6, atol=1e-7)


def test_precomputed_derivatives_give_the_same_energies_and_forces(tiny):
    model = build(tiny)
    numbers, positions, offsets = tensors(tiny)
    energies, forces = model(numbers, positions, offsets)
    G, derivatives = model.descriptor.with_derivatives(numbers, positions, offsets)
    e2, f2 = model.from_descriptors(G, derivatives.by_centre(len(numbers)), numbers, offsets)
    torch.testing.assert_close(e2, energies, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(f2, forces, rtol=1e-10, atol=1e-10)


def test_training_graph_reaches_the_weights_through_the_forces(tiny):
    model = build(tiny)
    numbers, positions, offsets = tensors(tiny)
    G, derivatives = model.descriptor.with_derivatives(numbers, positions, offsets)
    _, forces = model.from_descriptors(G, derivatives.by_centre(len(numbers)), numbers, offsets)
    loss = (forces**2).sum()
    loss.backward()
    for network in model.networks:
        assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in network.weights)
        assert network.biases[-1].grad is None  # a constant energy shift exerts no force


def test_energy_is_invariant_under_rotation_translation_and_permutation(tiny):
    model = build(tiny)
    numbers, positions, offsets = tensors(tiny.subset(np.arange(1)))
    energy, forces = model(numbers, positions, offsets)
    rot = torch.tensor(Rotation.random(random_state=2).as_matrix())
    moved = positions @ rot.T + 3.0
    e2, f2 = model(numbers, moved, offsets)
    torch.testing.assert_close(e2, energy, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(f2, forces @ rot.T, rtol=1e-9, atol=1e-10)
    perm = torch.tensor([0, 3, 1, 2, 4, 5])
    e3, f3 = model(numbers[perm], positions[perm], offsets)
    torch.testing.assert_close(e3, energy, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(f3, forces[:, perm], rtol=1e-9, atol=1e-10)


def test_added_element_networks_leave_known_elements_unchanged(tiny):
    model = build(tiny)  # F + CH3F only: H, C, F
    numbers, positions, offsets = tensors(tiny)
    before, _ = model(numbers, positions, offsets)
    everything, _ = read_structures(TINY)
    bromide = everything.subset(np.flatnonzero(everything.label == "Br+CH3F")[:2])
    with pytest.raises(ValueError, match=r"Z = \[35\]"):
        model(*tensors(bromide))
    new = model.add_elements([35], torch.tensor([-100.0]))
    assert model.elements.tolist() == [1, 6, 9, 35] and model.reference_energies[-1] == -100.0
    assert len(model.networks) == 4 and model.networks[3] is new[0]
    after, _ = model(numbers, positions, offsets)
    assert torch.equal(after, before)
    energies, forces = model(*tensors(bromide))
    assert torch.isfinite(energies).all() and torch.isfinite(forces).all()
    with pytest.raises(ValueError, match="already known"):
        model.add_elements([35], torch.tensor([0.0]))


def test_unknown_element_is_named(tiny):
    model = build(tiny)
    numbers, positions, offsets = tensors(tiny.subset(np.arange(1)))
    numbers = numbers.clone()
    numbers[1] = 3
    with pytest.raises(ValueError, match=r"Z = \[3\]"):
        model(numbers, positions, offsets)


def test_model_file_round_trip_gives_identical_predictions(tiny, tmp_path):
    from lmlp.modelfile import load_model, save_model

    model = build(tiny).float()
    save_model(tmp_path / "model.pt", model, {"test_rmse": [1.0, 2.0, 3.0]})
    loaded, metadata = load_model(tmp_path / "model.pt")
    assert metadata == {"test_rmse": [1.0, 2.0, 3.0]}
    numbers, positions, offsets = tensors(tiny)
    e1, f1 = model(numbers, positions.float(), offsets)
    e2, f2 = loaded(numbers, positions.float(), offsets)
    torch.testing.assert_close(e2, e1, rtol=0, atol=0)
    torch.testing.assert_close(f2, f1, rtol=0, atol=0)


def test_broken_model_file_is_reported(tiny, tmp_path):
    from lmlp.errors import LmlpError
    from lmlp.modelfile import load_model, save_model

    save_model(tmp_path / "model.pt", build(tiny))
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(LmlpError, match=r"cut\.pt: not a readable model file"):
        load_model(tmp_path / "cut.pt")
    with pytest.raises(LmlpError, match="no such model file"):
        load_model(tmp_path / "absent.pt")
