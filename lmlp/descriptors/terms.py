"""The symmetry-function terms of one pair or triple, and their slopes: the only implementation.

Training (``SymmetryFunctions``), the ASE calculator and the export all evaluate these functions;
they are TorchScript-compatible so that the calculator's compiled kernels can call them.

Pair data (``pair_data``), one row per pair vector v = R_j − R_i (+ cell shift), lengths in Å:
columns 0:3 the unit vector u, 3 the distance r, 4 the radial cutoff function f_c(r), 5 its slope
f_c'(r), 6 1/r, then per angular η the angular radial factor g(r) = exp(−η r²) f_a(r) (f_a the
cutoff function at the angular cutoff) and then g'(r). The angular terms' radial part
exp(−η (a² + b²)) f_a(a) f_a(b) is g(a) g(b), so it is computed per pair, not per triple.

Slopes are with respect to the pair vectors: a radial term's gradient is slope · u, an angular
term's gradients are c_0 u_j + c_1 u_k (first pair) and c_2 u_k + c_3 u_j (second pair). Slopes
with several components are component-major, (Q, 3 or 4, terms): the terms are the contiguous axis
that the calculator contracts.

Angular functions are sums over angular items (``angular_items``): G5 functions with integer ζ over
pairs, by moments (``lmlp.descriptors.moments``, O(neighbours) per atom), the others (G4, non-integer
ζ) over triples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from lmlp.descriptors.moments import pair_moments

CUTOFF_FUNCTIONS = ("cos", "poly1", "poly2")
"""f_c(x), x = r / R_c, inside the cutoff: "cos" ½[cos(πx) + 1] (value and slope vanish at R_c),
"poly1" (2x − 3)x² + 1 (value and slope vanish), "poly2" ((15 − 6x)x − 10)x³ + 1 (value, slope and
curvature vanish); n2p2's CT_COS, CT_POLY1 and CT_POLY2."""
G_ANGULAR = 7
"""First column of the angular g(r) in ``pair_data``."""
FLOOR_EXPONENT = -80.0
"""The smallest Gaussian exponent evaluated (``gaussian``): exp(−80) ≈ 2·10⁻³⁵."""


def gaussian(x: Tensor) -> Tensor:
    """exp(x) of a Gaussian's exponents x ≤ 0 (any shape), with x clamped at ``FLOOR_EXPONENT``.

    exp(−80) ≈ 2e-35 is far below the resolution of any descriptor value, and exponents under about
    −87 (float32's smallest normal number) put the vectorised exp on a slow path, ten times slower:
    most of the 24 radial terms of a pair at 12 Å are such far tails (−η (r − r_s)² reaches −2,000).
    """
    return torch.exp(x.clamp(min=-80.0))  # FLOOR_EXPONENT (TorchScript reads no module constants)


def radial_reach(eta: Tensor, r_s: Tensor) -> Tensor:
    """(K,) distances, Å, from which the radial terms exp(−η (r − r_s)²) f_c(r) of the K paired
    (η, r_s) stay at the ``gaussian`` floor, at most 2·10⁻³⁵ f_c(r): r_s + √(80/η) (inf for η = 0).
    Beyond its reach a term is negligible, and so is its slope."""
    return r_s + torch.sqrt(-FLOOR_EXPONENT / eta)


def cutoff_function(r: Tensor, cutoff: float, kind: str) -> Tuple[Tensor, Tensor]:
    """(f_c(r), f_c'(r) in Å⁻¹) of distances r (any shape, Å); both 0 from R_c on (``CUTOFF_FUNCTIONS``)."""
    x = r / cutoff
    if kind == "cos":
        value = 0.5 * torch.cos(math.pi * x) + 0.5
        slope = (-0.5 * math.pi / cutoff) * torch.sin(math.pi * x)
    elif kind == "poly1":
        value = (2.0 * x - 3.0) * x * x + 1.0
        slope = (6.0 / cutoff) * (x - 1.0) * x
    elif kind == "poly2":
        value = ((15.0 - 6.0 * x) * x - 10.0) * x * x * x + 1.0
        slope = (-30.0 / cutoff) * ((x - 2.0) * x + 1.0) * x * x
    else:
        raise ValueError("unknown cutoff function " + kind)
    inside = r < cutoff
    zero = torch.zeros_like(r)
    return torch.where(inside, value, zero), torch.where(inside, slope, zero)


def pair_data(v: Tensor, cutoff: float, angular_cutoff: float, kind: str, eta: Tensor) -> Tensor:
    """(P, 7 + 2E) pair data (module docstring) of pair vectors v (P, 3), Å; E = len(eta), Å⁻²."""
    r = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    fc, dfc = cutoff_function(r, cutoff, kind)
    if angular_cutoff == cutoff:
        fa, dfa = fc, dfc
    else:
        fa, dfa = cutoff_function(r, angular_cutoff, kind)
    inv_r = 1.0 / r
    gauss = gaussian(-eta * r * r)
    return torch.cat([v * inv_r, r, fc, dfc, inv_r, gauss * fa, gauss * (dfa - 2.0 * eta * r * fa)], 1)


def radial(pairs: Tensor, eta: Tensor, r_s: Tensor, slopes: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Radial terms exp(−η (r − r_s)²) f_c(r) (P, K) of pairs with ``pair_data`` rows ``pairs``,
    for the K paired (η, r_s), and, if ``slopes``, their r-derivatives (P, K) in Å⁻¹."""
    r, fc, dfc = pairs[:, 3:4], pairs[:, 4:5], pairs[:, 5:6]
    gauss = gaussian(-eta * (r - r_s) ** 2)
    slope: Optional[Tensor] = None
    if slopes:
        slope = gauss * (dfc - 2.0 * eta * (r - r_s) * fc)
    return gauss * fc, slope


def angular_norms(lam: Tensor, zeta: Tensor) -> Tuple[Tensor, Tensor]:
    """(2^{1−ζ}, ζ λ 2^{1−ζ}) per (λ, ζ) combination: the prefactors of Θ and of dΘ/d cos θ."""
    norm = 2.0 ** (1.0 - zeta)
    return norm, zeta * lam * norm


def angular(
    first: Tensor, second: Tensor, eta: Tensor, lam: Tensor, zeta: Tensor, norm: Tensor, slope_norm: Tensor,
    cutoff: float, angular_cutoff: float, kind: str, g4: bool, slopes: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Angular terms (Q, E·L, η-major) of the triples whose two pairs have the ``pair_data`` rows
    ``first`` and ``second``, and, if ``slopes``, their gradient coefficients (Q, 4, E·L) in Å⁻¹.

    A term is R Θ(cos θ) with R = g(a) g(b) [h(d)], a = |v_j|, b = |v_k|, cos θ = u_j·u_k,
    Θ = 2^{1−ζ} (1 + λ cos θ)^ζ (``norm``, ``slope_norm`` from ``angular_norms``), and for G4
    d = |v_k − v_j|, h(d) = exp(−η d²) f_a(d). With ∂a/∂v_j = u_j, ∂cos θ/∂v_j = (u_k − cos θ u_j)/a,
    ∂d/∂v_j = (a u_j − b u_k)/d and the mirror images for v_k: d/dv_j = c_0 u_j + c_1 u_k and
    d/dv_k = c_2 u_k + c_3 u_j.
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
        jk = pair_data(b * uk - a * uj, cutoff, angular_cutoff, kind, eta)
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
    return values, torch.stack([c0, c1, c2, c3], 1).flatten(2)


def angular_gradients(c: Tensor, u_j: Tensor, u_k: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients (Q, X, 3) of angular terms, or of weighted sums of them, with respect to the first
    and the second pair vector of each triple: c_0 u_j + c_1 u_k and c_2 u_k + c_3 u_j, from the
    coefficients c (Q, X, 4) (``angular``, or contracted) and the pairs' unit vectors u_j, u_k (Q, 3)."""
    c = c[:, :, :, None]
    u_j, u_k = u_j[:, None], u_k[:, None]
    return c[:, :, 0] * u_j + c[:, :, 1] * u_k, c[:, :, 2] * u_k + c[:, :, 3] * u_j


def slot_sums(values: Tensor, slot: Tensor, n_slots: int) -> Tensor:
    """Terms (B, C) of pairs or triples summed per slot: (n_slots, C); ``slot`` (B,) the slot of each."""
    return values.new_zeros(n_slots, values.shape[1]).index_add(0, slot, values)


def angular_items(
    pairs: Tensor, items: Tensor, eta: Tensor, lam: Tensor, zeta: Tensor, norm: Tensor, slope_norm: Tensor,
    index: Tensor, exponents: Tensor, cutoff: float, angular_cutoff: float, kind: str, g4: bool, moments: bool,
    slopes: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The terms of the angular items ``items`` of pairs with ``pair_data`` rows ``pairs``, and their
    slopes if ``slopes``: with ``moments``, items (1, Q) are pairs and the terms their moment terms
    (Q, E·K) with gradients (Q, 3, E·K) (``moments.pair_moments``; ``index``, ``exponents`` from
    ``moments.moment_tables``); otherwise items (2, Q) are the two pairs of triples and the terms
    ``angular`` (Q, E·L) with gradient coefficients (Q, 4, E·L)."""
    if moments:
        return pair_moments(pairs.index_select(0, items[0]), index, exponents, slopes)
    return angular(pairs.index_select(0, items[0]), pairs.index_select(0, items[1]), eta, lam, zeta, norm,
                   slope_norm, cutoff, angular_cutoff, kind, g4, slopes)


@dataclass(frozen=True)
class TermParameters:
    """The parameters of a descriptor's terms in one dtype, and the term functions bound to them.

    Attributes:
        radial_eta, radial_rs: (K,) paired Å⁻², Å. angular_eta: (E,) Å⁻².
        angular_lambda, angular_zeta: (L,) the (λ, ζ) combinations; norm, slope_norm: (L,) from
            ``angular_norms``.
        monomial_index (A, D + 3) int64, monomial_exponents (A, 3), moment_coefficients (L, K): the
            ``moments.moment_tables`` (A = 0 without moments).
        cutoff, angular_cutoff: Å. cutoff_function: one of ``CUTOFF_FUNCTIONS``. g4: the G4 form.
        moments: the angular functions by moments over pairs (G5, integer ζ), else over triples.
    """

    radial_eta: Tensor
    radial_rs: Tensor
    angular_eta: Tensor
    angular_lambda: Tensor
    angular_zeta: Tensor
    norm: Tensor
    slope_norm: Tensor
    monomial_index: Tensor
    monomial_exponents: Tensor
    moment_coefficients: Tensor
    cutoff: float
    angular_cutoff: float
    cutoff_function: str
    g4: bool
    moments: bool

    def pair_data(self, v: Tensor) -> Tensor:
        """``pair_data`` (P, 7 + 2E) of pair vectors v (P, 3), Å."""
        return pair_data(v, self.cutoff, self.angular_cutoff, self.cutoff_function, self.angular_eta)

    def radial(self, pairs: Tensor, slopes: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """``radial`` terms (P, K) and slopes of pairs with ``pair_data`` rows ``pairs``."""
        return radial(pairs, self.radial_eta, self.radial_rs, slopes)

    def angular_items(self, pairs: Tensor, items: Tensor, slopes: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """``angular_items`` terms and slopes of the angular items ``items`` of pairs with rows ``pairs``."""
        return angular_items(pairs, items, self.angular_eta, self.angular_lambda, self.angular_zeta, self.norm,
                             self.slope_norm, self.monomial_index, self.monomial_exponents, self.cutoff,
                             self.angular_cutoff, self.cutoff_function, self.g4, self.moments, slopes)
