import pytest
import torch
from torch.func import jacfwd, vmap

from lmlp.descriptors.terms import CUTOFF_FUNCTIONS, angular, angular_norms, cutoff_function, pair_data, radial

CUTOFF, ANGULAR_CUTOFF = 6.0, 4.5
ETA = torch.tensor([0.0, 0.1, 0.6], dtype=torch.float64)
RADIAL_ETA = torch.tensor([0.5, 2.0, 16.0], dtype=torch.float64)
RADIAL_RS = torch.tensor([0.0, 1.5, 2.5], dtype=torch.float64)
LAM = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
ZETA = torch.tensor([1.0, 4.0, 1.0, 2.5], dtype=torch.float64)


def vectors(n: int, seed: int, scale: float = 2.5) -> torch.Tensor:
    """(n, 3) random pair vectors of length 0.8–5.8 Å (some beyond the angular cutoff)."""
    v = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True) * torch.linspace(0.8, CUTOFF - 0.2, n, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("kind", CUTOFF_FUNCTIONS)
def test_cutoff_functions_start_at_one_vanish_smoothly_and_have_their_slopes(kind):
    r = torch.linspace(0.0, 1.2 * CUTOFF, 241, dtype=torch.float64).requires_grad_(True)
    value, slope = cutoff_function(r, CUTOFF, kind)
    (autograd,) = torch.autograd.grad(value.sum(), r)
    torch.testing.assert_close(slope, autograd, rtol=1e-12, atol=1e-12)
    assert value[0] == 1.0 and slope[0] == 0.0
    assert (value[r >= CUTOFF] == 0).all() and (slope[r >= CUTOFF] == 0).all()
    assert (slope[(r > 0) & (r < CUTOFF)] < 0).all()
    edge, _ = cutoff_function(torch.tensor([CUTOFF - 1e-4], dtype=torch.float64), CUTOFF, kind)
    assert edge.item() < 1e-6


def test_poly2_curvature_vanishes_at_the_cutoff():
    r = torch.tensor([CUTOFF - 1e-3], dtype=torch.float64, requires_grad=True)
    _, slope = cutoff_function(r, CUTOFF, "poly2")
    (curvature,) = torch.autograd.grad(slope.sum(), r)
    assert abs(curvature.item()) < 1e-3 * 30 / CUTOFF**2
    _, slope_cos = cutoff_function(r, CUTOFF, "cos")
    assert abs(slope.item()) < 1e-2 * abs(slope_cos.item())  # slope O(ε²) against O(ε)


@pytest.mark.parametrize("kind", CUTOFF_FUNCTIONS)
def test_radial_slopes_are_the_derivatives_of_the_values(kind):
    v = vectors(40, 0)
    values, slopes = radial(pair_data(v, CUTOFF, ANGULAR_CUTOFF, kind, ETA), RADIAL_ETA, RADIAL_RS, True)

    def value(x: torch.Tensor) -> torch.Tensor:
        return radial(pair_data(x[None], CUTOFF, ANGULAR_CUTOFF, kind, ETA), RADIAL_ETA, RADIAL_RS, False)[0][0]

    jacobian = vmap(jacfwd(value))(v)  # (P, K, 3)
    units = v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(slopes[:, :, None] * units[:, None, :], jacobian, rtol=1e-10, atol=1e-12)
    assert values.shape == (40, 3)


@pytest.mark.parametrize("g4", [False, True])
@pytest.mark.parametrize("kind", CUTOFF_FUNCTIONS)
def test_angular_coefficients_give_the_derivatives_of_the_values(g4, kind):
    v_j, v_k = vectors(60, 1), vectors(60, 2).flip(0)
    norm, slope_norm = angular_norms(LAM, ZETA)

    def terms(a: torch.Tensor, b: torch.Tensor, slopes: bool):
        first = pair_data(a, CUTOFF, ANGULAR_CUTOFF, kind, ETA)
        second = pair_data(b, CUTOFF, ANGULAR_CUTOFF, kind, ETA)
        return angular(first, second, ETA, LAM, ZETA, norm, slope_norm, CUTOFF, ANGULAR_CUTOFF, kind, g4, slopes)

    values, c = terms(v_j, v_k, True)
    c = c.transpose(1, 2)  # (Q, E·L, 4)
    d_j, d_k = vmap(jacfwd(lambda a, b: terms(a[None], b[None], False)[0][0], argnums=(0, 1)))(v_j, v_k)
    u_j, u_k = (v_j / v_j.norm(dim=1, keepdim=True))[:, None], (v_k / v_k.norm(dim=1, keepdim=True))[:, None]
    torch.testing.assert_close(c[..., 0:1] * u_j + c[..., 1:2] * u_k, d_j, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c[..., 2:3] * u_k + c[..., 3:4] * u_j, d_k, rtol=1e-10, atol=1e-12)
    inside = (v_j.norm(dim=1) < ANGULAR_CUTOFF) & (v_k.norm(dim=1) < ANGULAR_CUTOFF)
    assert (values[~inside] == 0).all() and (values[inside] != 0).any()
