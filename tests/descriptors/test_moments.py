"""G5 functions by moments (``lmlp.descriptors.moments``) against the sums over triples, the
expansion itself and finite differences."""

import copy
import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from torch.func import jacfwd, vmap

from lmlp.descriptors import SymmetryFunctions
from lmlp.descriptors.moments import monomials, moment_tables, pair_moments
from lmlp.descriptors.terms import CUTOFF_FUNCTIONS, pair_data

CUTOFF, ANGULAR_CUTOFF = 6.0, 4.5
ELEMENTS = [1, 6, 9, 17, 35]
ETA = torch.tensor([0.0, 0.1, 0.6], dtype=torch.float64)
ZETAS = [[1.0], [2.0], [1.0, 4.0], [3.0, 16.0]]


def descriptor(zeta: list[float], kind: str = "eeacsf", cutoff_function: str = "cos") -> SymmetryFunctions:
    """Several weights, η and both λ, with the angular ``zeta``; plain ACSFs over ``ELEMENTS``."""
    return SymmetryFunctions(CUTOFF, [0.5, 2.0], [0.0, 1.5], [0.0, 0.1, 0.4], [-1.0, 1.0], zeta, radial_types=[0, 1],
                             angular_types=[0, 1, 3, 5], angular_pair_weights=["sum", "difference"], kind=kind,
                             elements=ELEMENTS, angular_cutoff=ANGULAR_CUTOFF, cutoff_function=cutoff_function)


def over_triples(sf: SymmetryFunctions) -> SymmetryFunctions:
    """The same descriptor evaluated over triples (the reference)."""
    reference = copy.deepcopy(sf)
    reference.moments = False
    return reference


def cluster(n: int, seed: int, spread: float = 1.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random atoms of ``ELEMENTS`` at least 0.9 Å apart, float64 positions in Å."""
    rng = np.random.default_rng(seed)
    positions: list[np.ndarray] = []
    while len(positions) < n:
        p = rng.uniform(-1, 1, 3) * spread * n ** (1 / 3)
        if all(np.linalg.norm(p - q) > 0.9 for q in positions):
            positions.append(p)
    return torch.tensor(rng.choice(ELEMENTS, n)), torch.tensor(np.array(positions))


def unit_vectors(n: int, seed: int) -> torch.Tensor:
    """(n, 3) random unit vectors, the first three along the axes (zero components)."""
    v = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v[:3] = torch.eye(3, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def scaled_error(value: torch.Tensor, reference: torch.Tensor, sf: SymmetryFunctions) -> float:
    """Largest |value − reference| of the angular functions (last axis), relative to the round-off
    scale of the expansion: the largest Σ_λ |reference| over λ = ±1 of each (weight, η, ζ) (since
    (1 + cos θ)^ζ + (1 − cos θ)^ζ ≥ 2), at least 10⁻⁶ of the largest of all."""
    n_lambda, n_zeta = len(sf.hyperparameters["angular_lambda"]), len(sf.hyperparameters["angular_zeta"])
    value, reference = value[..., sf.n_radial :], reference[..., sf.n_radial :]
    grouped = reference.abs().unflatten(-1, (-1, n_lambda, n_zeta)).sum(-2, keepdim=True)
    scale = grouped.flatten(0, -4).amax(0).expand(-1, n_lambda, n_zeta).flatten()
    return ((value - reference).abs() / scale.clamp(min=1e-6 * scale.max().item())).max().item()


@pytest.mark.parametrize("zeta", [1, 2, 3, 4, 16])
def test_moment_tables_expand_the_angular_factor(zeta):
    lam = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    index, exponents, coefficients = moment_tables(lam, torch.full((2,), float(zeta), dtype=torch.float64), zeta)
    u, v = unit_vectors(50, 0), unit_vectors(50, 1)
    m_u, _ = monomials(u, index, exponents, False)
    m_v, _ = monomials(v, index, exponents, False)
    expanded = (m_u[:, None, :] * m_v[:, None, :] * coefficients[None, :, :-1]).sum(2)  # (P, L)
    norm = 2.0 ** (1 - zeta)
    exact = norm * (1 + lam * (u * v).sum(1, keepdim=True)) ** zeta
    torch.testing.assert_close(expanded, exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(coefficients[:, -1], -0.5 * norm * (1 + lam) ** zeta)
    assert exponents.shape == ((zeta + 1) * (zeta + 2) * (zeta + 3) // 6, 3)


@pytest.mark.parametrize("kind", CUTOFF_FUNCTIONS)
def test_pair_moment_slopes_are_the_derivatives_of_the_values(kind):
    lam, zeta = torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.tensor([4.0, 2.0], dtype=torch.float64)
    index, exponents, _ = moment_tables(lam, zeta, 4)
    v = unit_vectors(40, 2) * torch.linspace(0.8, ANGULAR_CUTOFF + 0.5, 40, dtype=torch.float64)[:, None]

    def values(x: torch.Tensor) -> torch.Tensor:
        return pair_moments(pair_data(x[None], CUTOFF, ANGULAR_CUTOFF, kind, ETA), index, exponents, False)[0][0]

    terms, slopes = pair_moments(pair_data(v, CUTOFF, ANGULAR_CUTOFF, kind, ETA), index, exponents, True)
    torch.testing.assert_close(slopes, vmap(jacfwd(values))(v).transpose(1, 2), rtol=1e-10, atol=1e-12)
    outside = v.norm(dim=1) >= ANGULAR_CUTOFF
    assert (terms[outside] == 0).all() and (slopes[outside] == 0).all() and (terms[~outside] != 0).any()


@pytest.mark.parametrize("kind", ["eeacsf", "acsf"])
@pytest.mark.parametrize("zeta", ZETAS)
def test_moments_equal_the_triple_sums_for_molecules(kind, zeta):
    molecules = [cluster(n, seed) for n, seed in [(9, 0), (14, 1), (3, 2)]]
    numbers, positions = torch.cat([m[0] for m in molecules]), torch.cat([m[1] for m in molecules])
    offsets = torch.tensor([0, 9, 23, 26])
    sf = descriptor(zeta, kind)
    assert sf.moments and not over_triples(sf).moments
    G, derivatives = sf.with_derivatives(numbers, positions, offsets)
    G_ref, reference = over_triples(sf).with_derivatives(numbers, positions, offsets)
    assert scaled_error(G, G_ref, sf) < 1e-10
    torch.testing.assert_close(sf(numbers, positions, offsets), G, rtol=0, atol=0)
    torch.testing.assert_close(derivatives.centre, reference.centre)
    torch.testing.assert_close(derivatives.atom, reference.atom)
    assert scaled_error(derivatives.values.transpose(1, 2), reference.values.transpose(1, 2), sf) < 1e-10


@pytest.mark.parametrize("kind", ["eeacsf", "acsf"])
@pytest.mark.parametrize("zeta", ZETAS)
def test_moments_equal_the_triple_sums_in_a_periodic_cell(kind, zeta):
    numbers, positions = cluster(8, 3, spread=1.0)
    cell, pbc = torch.eye(3, dtype=torch.float64)[None] * 5.5, torch.ones(1, 3, dtype=torch.bool)
    inside = torch.remainder(positions, 5.5)
    sf = descriptor(zeta, kind)
    G, derivatives = sf.with_derivatives(numbers, inside, torch.tensor([0, 8]), cell, pbc)
    G_ref, reference = over_triples(sf).with_derivatives(numbers, inside, torch.tensor([0, 8]), cell, pbc)
    assert scaled_error(G, G_ref, sf) < 1e-10
    assert scaled_error(derivatives.values.transpose(1, 2), reference.values.transpose(1, 2), sf) < 1e-10


@pytest.mark.parametrize(("zeta", "tolerance"), [([1.0, 4.0], 2e-6), ([3.0, 16.0], 2e-5)])
def test_float32_moments_agree_with_float64_triples(zeta, tolerance):
    """Float32 round-off (eeACSF): the expansion adds and subtracts terms up to 2^{1−ζ} 2^ζ g g, so
    its error follows the scale of ``scaled_error``, not G itself (measured: 8·10⁻⁷ for ζ ≤ 4 and
    4·10⁻⁶ with ζ = 16, against 5·10⁻⁷ and 1·10⁻⁶ of the triple sums in float32)."""
    numbers, positions = cluster(20, 4)
    offsets = torch.tensor([0, 20])
    sf = descriptor(zeta)
    G32, derivatives32 = sf.with_derivatives(numbers, positions.float(), offsets)
    G64, derivatives64 = over_triples(sf).with_derivatives(numbers, positions, offsets)
    assert G32.dtype == torch.float32
    assert scaled_error(G32.double(), G64, sf) < tolerance
    values32, values64 = derivatives32.values.double().transpose(1, 2), derivatives64.values.transpose(1, 2)
    assert scaled_error(values32, values64, sf) < tolerance


def test_moment_derivatives_equal_finite_differences_including_near_cutoff():
    numbers, positions = cluster(8, 5, spread=2.0)
    positions[1] = positions[0] + torch.tensor([ANGULAR_CUTOFF - 0.01, 0.0, 0.0], dtype=torch.float64)
    positions[2] = positions[0] + torch.tensor([0.0, 1.3, 0.0], dtype=torch.float64)  # axis-aligned pairs
    offsets = torch.tensor([0, 8])
    sf = descriptor([1.0, 4.0], cutoff_function="poly2")
    G, derivatives = sf.with_derivatives(numbers, positions, offsets)
    analytic = torch.zeros(8, 8, sf.n_functions, 3, dtype=torch.float64)
    analytic.index_put_((derivatives.centre, derivatives.atom), derivatives.values, accumulate=True)
    analytic = analytic.transpose(1, 2)  # (centre, function, atom, xyz)
    numeric = torch.zeros_like(analytic)
    h = 1e-5
    for atom, axis in itertools.product(range(8), range(3)):
        step = torch.zeros_like(positions)
        step[atom, axis] = h
        plus, minus = sf(numbers, positions + step, offsets), sf(numbers, positions - step, offsets)
        numeric[:, :, atom, axis] = (plus - minus) / (2 * h)
    scale = numeric.abs().amax(dim=(0, 2, 3), keepdim=True).clamp(min=1e-3)
    assert ((analytic - numeric).abs() / scale).max() < 1e-6


def test_sparse_and_autograd_forces_agree_by_moments():
    numbers, positions = cluster(12, 6)
    offsets = torch.tensor([0, 12])
    sf = descriptor([1.0, 4.0])
    weights = torch.randn(sf.n_functions, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G, derivatives = sf.with_derivatives(numbers, positions, offsets)
    sparse = derivatives.forces((1 - torch.tanh(G) ** 2) * weights, len(numbers))
    p = positions.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((torch.tanh(sf(numbers, p, offsets)) * weights).sum(), p)
    torch.testing.assert_close(sparse, -grad, rtol=1e-12, atol=1e-12)


def test_moments_are_invariant_under_rotation_and_permutation():
    numbers, positions = cluster(12, 7)
    offsets = torch.tensor([0, 12])
    sf = descriptor([1.0, 4.0])
    G = sf(numbers, positions, offsets)
    rotation = torch.tensor(Rotation.random(random_state=2).as_matrix())
    torch.testing.assert_close(sf(numbers, positions @ rotation.T + 3.0, offsets), G, rtol=1e-12, atol=1e-12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sf(numbers[perm], positions[perm], offsets), G[perm], rtol=1e-12, atol=1e-12)


def test_only_g5_with_integer_zeta_is_evaluated_by_moments():
    assert descriptor([1.0, 4.0]).moments and descriptor([16.0], "acsf").moments
    assert not descriptor([1.0, 2.5]).moments
    assert not SymmetryFunctions(CUTOFF, [0.5], [0.0], [0.1], [1.0], [2.0], angular_form="g4").moments
