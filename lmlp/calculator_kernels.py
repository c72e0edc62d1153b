"""TorchScript kernels of ``LMLPCalculator``: symmetry functions, their derivatives and the networks.

Small-molecule MD is bound by per-operation overhead, not arithmetic: a 6-atom step is a few
hundred tiny tensor operations. Compiled with TorchScript, each costs a fraction of a Python-level
call, and ``small_system`` runs a whole step (descriptors → dE/dG → pair gradients → forces) in one
call. The pieces are also used one by one for systems evaluated in blocks.

Pair data columns (``pair_data``): unit vector u (0:3), r (3), f_c(r) (4), f_c'(r) (5), 1/r (6); from
column 7 on, per angular η, g(r) = exp(−η r²) f_c(r) and then g'(r). Lengths Å, energies eV.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from lmlp.model import ACTIVATIONS, _scaled_tanh, _silu, _softplus, _tanh

G_ANGULAR = 7
"""First column of the angular g(r) in ``pair_data``."""
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
"""Activation name → the integer ``activate`` takes."""


@torch.jit.script
def pair_data(v: Tensor, cutoff: float, eta: Tensor) -> Tensor:
    """(P, 7 + 2E) pair data of pair vectors v (P, 3), Å (module docstring).

    f_c(r) = ½[cos(π r/R_c) + 1] inside the cutoff, else 0. The angular terms' radial part
    exp(−η (a² + b²)) f_c(a) f_c(b) is g(a) g(b): computed per pair, not per triple.
    """
    r = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    x = (math.pi / cutoff) * r
    inside = r < cutoff
    zero = torch.zeros_like(r)
    fc = torch.where(inside, 0.5 * torch.cos(x) + 0.5, zero)
    dfc = torch.where(inside, (-0.5 * math.pi / cutoff) * torch.sin(x), zero)
    inv_r = 1.0 / r
    gauss = torch.exp(-eta * r * r)
    return torch.cat([v * inv_r, r, fc, dfc, inv_r, gauss * fc, gauss * (dfc - 2.0 * eta * r * fc)], 1)


@torch.jit.script
def radial(pairs: Tensor, eta: Tensor, r_s: Tensor, slopes: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """exp(−η (r − r_s)²) f_c(r) (P, K) and, if ``slopes``, its r-derivative (P, K), per Å."""
    r, fc, dfc = pairs[:, 3:4], pairs[:, 4:5], pairs[:, 5:6]
    gauss = torch.exp(-eta * (r - r_s) ** 2)
    slope: Optional[Tensor] = None
    if slopes:
        slope = gauss * (dfc - 2.0 * eta * (r - r_s) * fc)
    return gauss * fc, slope


@torch.jit.script
def angular(
    first: Tensor, second: Tensor, eta: Tensor, lam: Tensor, zeta: Tensor, norm: Tensor, slope_norm: Tensor,
    cutoff: float, g4: bool, slopes: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Angular terms (Q, E·L, η-major) of the triples whose pairs have the pair data ``first`` and
    ``second``, and, if ``slopes``, their gradient coefficients (Q, E·L, 4), per Å.

    A term is R Θ(cos θ) with R = g(a) g(b) [h(d)], a = |v_j|, b = |v_k|, cos θ = u_j·u_k,
    Θ = norm (1 + λ cos θ)^ζ, and for G4 d = |v_k − v_j|, h(d) = exp(−η d²) f_c(d). With
    ∂a/∂v_j = u_j, ∂cos θ/∂v_j = (u_k − cos θ u_j)/a, ∂d/∂v_j = (a u_j − b u_k)/d and the mirror
    images for v_k: d/dv_j = c_0 u_j + c_1 u_k and d/dv_k = c_2 u_k + c_3 u_j.
    """
    n_eta = eta.shape[0]
    g0, dg0 = 7, 7 + n_eta  # G_ANGULAR (TorchScript takes no global ints)
    uj, uk = first[:, 0:3], second[:, 0:3]
    gj, dgj, gk, dgk = first[:, g0:dg0], first[:, dg0:], second[:, g0:dg0], second[:, dg0:]
    cos = (uj * uk).sum(1, keepdim=True)
    radial_ab = gj * gk  # (Q, E)
    rad = radial_ab
    a, b = first[:, 3:4], second[:, 3:4]
    jk: Optional[Tensor] = None
    if g4:
        jk = pair_data(b * uk - a * uj, cutoff, eta)
        rad = rad * jk[:, g0:dg0]
    base = (1.0 + lam * cos).clamp(min=0.0)
    theta = norm * base**zeta  # (Q, L)
    values = (rad[:, :, None] * theta[:, None, :]).flatten(1)
    if not slopes:
        return values, None
    inv_a, inv_b = first[:, 6:7, None], second[:, 6:7, None]
    by_a, by_b = dgj * gk, gj * dgk  # ∂R/∂a, ∂R/∂b: (Q, E)
    if jk is not None:
        by_a, by_b = by_a * jk[:, g0:dg0], by_b * jk[:, g0:dg0]
    d_theta = torch.where(base > 0, slope_norm * base ** (zeta - 1.0), torch.zeros_like(base))
    by_cos = rad[:, :, None] * d_theta[:, None, :]  # (Q, E, L)
    along_cos = by_cos * cos[:, :, None]
    c0 = by_a[:, :, None] * theta[:, None, :] - along_cos * inv_a
    c1 = by_cos * inv_a
    c2 = by_b[:, :, None] * theta[:, None, :] - along_cos * inv_b
    c3 = by_cos * inv_b
    if jk is not None:
        by_d = (radial_ab * jk[:, dg0:])[:, :, None] * theta[:, None, :] * jk[:, 6:7, None]
        a_d, b_d = by_d * a[:, :, None], by_d * b[:, :, None]
        c0, c1, c2, c3 = c0 + a_d, c1 - b_d, c2 + b_d, c3 - a_d
    return values, torch.stack([c0, c1, c2, c3], 3).flatten(1, 2)


@torch.jit.script
def activate(z: Tensor, code: int) -> Tuple[Tensor, Tensor]:
    """(f(z), f'(z)) of the activation ``ACTIVATION_CODES`` names ``code`` (``lmlp.model``'s)."""
    if code == 0:
        return _scaled_tanh(z)
    if code == 1:
        return _tanh(z)
    if code == 2:
        return _silu(z)
    return _softplus(z)


@torch.jit.script
def gathered_networks(
    G: Tensor, mean: Tensor, inv_std: Tensor, weights: List[Tensor], biases: List[Tensor],
    transposed: List[Tensor], activation: int, members: int,
) -> Tuple[Tensor, Tensor]:
    """Atomic energies (N, M) eV and dE/dG (N, M, F) from descriptors G (N, F), with per-atom
    network weights (``weights[0]`` (N, F, M·H), later ones (N·M, H, H'); ``transposed`` the
    transposed ones, the first scaled by 1/std): the backward pass is written out."""
    n = G.shape[0]
    x = (G - mean) * inv_std
    z = torch.baddbmm(biases[0], x[:, None, :], weights[0]).view(n * members, 1, -1)
    slopes: List[Tensor] = []
    for k in range(1, len(weights)):
        h, slope = activate(z, activation)
        slopes.append(slope)
        z = torch.baddbmm(biases[k], h, weights[k])
    grad = transposed[-1]
    for k in range(len(slopes) - 1, -1, -1):
        grad = torch.bmm(grad * slopes[k], transposed[k])
    return z.view(n, members), grad.view(n, members, -1)


@torch.jit.script
def slot_sums(values: Tensor, slot: Tensor, element_weights: Tensor, n_atoms: int) -> Tensor:
    """Descriptors (N, T·C) from terms (B, C) summed per element slot: the slots (nz^k·N, C) are
    weighted by ``element_weights`` (nz^k, T) (see ``lmlp.calculator._Neighbours``)."""
    n_slot_kinds = element_weights.shape[0]
    by_slot = values.new_zeros(n_atoms * n_slot_kinds, values.shape[1]).index_add_(0, slot, values)
    G = (element_weights.T @ by_slot.view(n_slot_kinds, -1)).view(-1, n_atoms, values.shape[1])
    return G.transpose(0, 1).reshape(n_atoms, -1)


@torch.jit.script
def slot_gradients(dE_dG: Tensor, element_weights: Tensor, n_terms: int) -> Tensor:
    """dE/d(term) per element slot (nz^k·N, M, C) from the part of dE/dG (N, M, T·C) that the
    slots feed (the transpose of ``slot_sums``)."""
    n, m = dE_dG.shape[0], dE_dG.shape[1]
    n_types = element_weights.shape[1]
    per_type = dE_dG.reshape(n, m, n_types, n_terms).permute(2, 0, 1, 3).reshape(n_types, -1)
    return (element_weights @ per_type).view(-1, m, n_terms)


@torch.jit.script
def radial_gradient(slots: Tensor, slopes: Tensor, units: Tensor) -> Tensor:
    """dE_m/dv (P, M, 3) of pairs with slot gradients ``slots`` (P, M, K), slopes (P, K) and unit
    vectors (P, 3)."""
    return (slots * slopes[:, None, :]).sum(2, keepdim=True) * units[:, None, :]


@torch.jit.script
def add_angular_gradient(
    gradient: Tensor, slots: Tensor, coefficients: Tensor, t0: Tensor, t1: Tensor, uj: Tensor, uk: Tensor
) -> None:
    """Add the triples' dE_m/dv of both pairs to ``gradient`` (P, M, 3); slots (Q, M, E·L),
    coefficients (Q, E·L, 4), unit vectors of the pairs uj, uk (Q, 3)."""
    c = torch.bmm(slots, coefficients)[:, :, :, None]  # (Q, M, 4, 1)
    uj, uk = uj[:, None], uk[:, None]
    gradient.index_add_(0, t0, c[:, :, 0] * uj + c[:, :, 1] * uk)
    gradient.index_add_(0, t1, c[:, :, 2] * uk + c[:, :, 3] * uj)


@torch.jit.script
def pair_forces(gradient: Tensor, i: Tensor, j: Tensor, n_atoms: int) -> Tensor:
    """Forces (N, M, 3) eV/Å from dE_m/dv (P, M, 3) of the pair vectors v = R_j − R_i + shift."""
    forces = gradient.new_zeros(n_atoms, gradient.shape[1], 3).index_add_(0, i, gradient)
    return forces.index_add_(0, j, -gradient)


@torch.jit.script
def small_system(
    positions: Tensor, i: Tensor, j: Tensor, shifts: Tensor, pair_slot: Tensor, t0: Tensor, t1: Tensor,
    triple_slot: Tensor, pair_weights: Tensor, triple_weights: Tensor,
    radial_eta: Tensor, radial_rs: Tensor, eta: Tensor, lam: Tensor, zeta: Tensor, norm: Tensor,
    slope_norm: Tensor, cutoff: float, g4: bool,
    mean: Tensor, inv_std: Tensor, weights: List[Tensor], biases: List[Tensor], transposed: List[Tensor],
    activation: int, members: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One whole evaluation, all pairs and triples in one block, per-atom network weights.

    positions (N, 3) float64 Å; the rest as in ``lmlp.calculator._Neighbours`` and
    ``gathered_networks``, in the compute dtype. Returns atomic energies (N, M) eV, forces
    (N, M, 3) eV/Å and the pair distances (P,) Å.
    """
    n = positions.shape[0]
    v = (positions.index_select(0, j) - positions.index_select(0, i) + shifts).to(radial_eta.dtype)
    pairs = pair_data(v, cutoff, eta)
    first, second = pairs.index_select(0, t0), pairs.index_select(0, t1)
    rad, rad_slopes = radial(pairs, radial_eta, radial_rs, True)
    ang, ang_slopes = angular(first, second, eta, lam, zeta, norm, slope_norm, cutoff, g4, True)
    G = torch.cat([slot_sums(rad, pair_slot, pair_weights, n), slot_sums(ang, triple_slot, triple_weights, n)], 1)
    atomic, dE_dG = gathered_networks(G, mean, inv_std, weights, biases, transposed, activation, members)
    n_radial = pair_weights.shape[1] * rad.shape[1]
    radial_slots = slot_gradients(dE_dG[:, :, :n_radial], pair_weights, rad.shape[1])
    angular_slots = slot_gradients(dE_dG[:, :, n_radial:], triple_weights, ang.shape[1])
    assert rad_slopes is not None and ang_slopes is not None
    gradient = radial_gradient(radial_slots.index_select(0, pair_slot), rad_slopes, pairs[:, 0:3])
    add_angular_gradient(gradient, angular_slots.index_select(0, triple_slot), ang_slopes, t0, t1,
                         first[:, 0:3], second[:, 0:3])
    return atomic, pair_forces(gradient, i, j, n), pairs[:, 3]
