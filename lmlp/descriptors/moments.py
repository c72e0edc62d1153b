"""G5 angular functions by moments: O(neighbours) per atom instead of O(neighbours²), exact for integer ζ.

For integer ζ, (1 + λ cos θ)^ζ = Σ_n C(ζ, n) λⁿ cosⁿθ and cosⁿθ = (u_j·u_k)ⁿ = Σ_{|α|=n} n!/(a! b! c!)
m_α(u_j) m_α(u_k), with the monomials m_α(u) = u_x^a u_y^b u_z^c, α = (a, b, c), of the unit vectors.
A pair weight W_u(Z_j, Z_k) takes one value per element pair, so with the moments of centre i

    M[e, i, η, α] = Σ_{j of element e} g_η(r_ij) m_α(u_ij),   g_η(r) = exp(−η r²) f_a(r) (``terms.pair_data``),

the G5 function of weight u, η and (λ, ζ) combination l is

    G = ½ Σ_{e,e'} W_u(e, e') Σ_α Q[α, l] M[e, i, η, α] M[e', i, η, α]
        − ½ 2^{1−ζ} (1 + λ)^ζ Σ_e W_u(e, e) M[e, i, η, □],
    Q[α, l] = 2^{1−ζ} C(ζ, |α|) λ^{|α|} |α|!/(a! b! c!):

the double sum runs over ordered (j, k) including j = k, which the last term removes through one
more moment column, M[e, i, η, □] = Σ_{j of element e} g_η(r_ij)², and ½ turns ordered pairs into
j < k (every weight table is symmetric). ``terms.angular`` clamps 1 + λ cos θ at 0, which never acts
for |λ| = 1: the expansion is exact. Per atom this costs O(neighbours · A), A = (D + 1)(D + 2)(D + 3)/6
monomials of degree ≤ D = max ζ (35 for D = 4), instead of O(neighbours²) triples. Non-integer ζ and
the G4 form (whose factor exp(−η r_jk²) f_a(r_jk) does not factorise) are evaluated over triples
(``terms.angular``).

G is quadratic in M: with X = ∂G/∂M (``moment_jacobian``), G = Σ ½ X M over the monomial columns
plus X M of the □ column (``moment_descriptors``), and dE/dM = Σ_G dE/dG X (``moment_gradients``, one
matmul per atom and η, O(U L nz K) per energy). A pair's moment terms g m_α have the slopes (m_α is
homogeneous of degree |α|; ∇ acts on the components of u)

    d(g m_α)/dv = (g' − |α| g / r) m_α u + (g / r) ∇m_α,   d(g²)/dv = 2 g g' u,

with respect to its pair vector v = R_j − R_i (+ cell shift), r = |v|, u = v / r.

Shapes: P pairs; E angular η; A monomials and K = A + 1 moment columns (the monomials, then □); nz
elements and N atoms, the moments' slots (element of j)·N + i; U pair weights; L (λ, ζ) combinations.
Lengths Å, g and the moments are dimensionless (f_a), slopes in Å⁻¹. All functions but
``moment_tables`` are TorchScript-compatible (the calculator's kernels call them).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def monomial_exponents(degree: int) -> list[tuple[int, int, int]]:
    """The exponents α = (a, b, c) of every monomial of degree ≤ ``degree``, by degree."""
    return [(a, b, n - a - b) for n in range(degree + 1) for a in range(n, -1, -1) for b in range(n - a, -1, -1)]


def moment_tables(lam: Tensor, zeta: Tensor, degree: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The tables of the moments of the monomials of degree ≤ ``degree`` (≥ max ζ, ≥ 1) for the (λ, ζ)
    combinations ``lam``, ``zeta`` (L,), ζ integer.

    Returns:
        index: (A, D + 3) int64; columns 0..D − 1 the factors of m_α among (1, u_x, u_y, u_z) (0..3),
            the last 3 the position of α − e_c among the monomials (0 where a_c = 0), so that
            ∂m_α/∂u_c = a_c m_{α−e_c}.
        exponents: (A, 3) α, in the dtype of ``lam``.
        coefficients: (L, K) Q[α, l] (module docstring) in the monomial columns, −½ 2^{1−ζ} (1 + λ)^ζ in
            the □ column.
    """
    exponents = monomial_exponents(degree)
    position = {alpha: k for k, alpha in enumerate(exponents)}
    factors = [[1] * a + [2] * b + [3] * c + [0] * (degree - a - b - c) for a, b, c in exponents]
    lower = [[position[tuple(x - (d == c) for d, x in enumerate(alpha))] if alpha[c] else 0 for c in range(3)]
             for alpha in exponents]
    combos = [(float(l), int(z)) for l, z in zip(lam.tolist(), zeta.tolist())]
    rows = [[2.0 ** (1 - z) * math.comb(z, sum(alpha)) * l ** sum(alpha) * multinomial(alpha) for l, z in combos]
            for alpha in exponents]
    rows.append([-0.5 * 2.0 ** (1 - z) * (1.0 + l) ** z for l, z in combos])
    index = torch.tensor([f + w for f, w in zip(factors, lower)], dtype=torch.int64)
    return index, torch.tensor(exponents, dtype=lam.dtype), torch.tensor(rows, dtype=lam.dtype).T.contiguous()


def multinomial(alpha: tuple[int, int, int]) -> int:
    """|α|! / (a! b! c!)."""
    return math.factorial(sum(alpha)) // math.prod(math.factorial(x) for x in alpha)


def monomials(u: Tensor, index: Tensor, exponents: Tensor, gradients: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The monomials m_α (P, A) of unit vectors u (P, 3) and, if ``gradients``, ∂m_α/∂u_c (P, 3, A)
    (``moment_tables``' ``index`` and ``exponents``)."""
    n_pairs, n_monomials, degree = u.shape[0], index.shape[0], index.shape[1] - 3
    factors = torch.cat([torch.ones_like(u[:, :1]), u], 1)  # (P, 4)
    m = factors.index_select(1, index[:, :degree].reshape(-1)).view(n_pairs, n_monomials, degree).prod(2)
    if not gradients:
        return m, None
    lower = index[:, degree:].T.reshape(-1)  # (3·A,) component-major
    return m, m.index_select(1, lower).view(n_pairs, 3, n_monomials) * exponents.T


def pair_moments(pairs: Tensor, index: Tensor, exponents: Tensor, slopes: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """The moment terms (P, E·K), η-major, of pairs with ``terms.pair_data`` rows ``pairs``: g_η m_α for
    the A monomials, then g_η², and, if ``slopes``, their gradients (P, 3, E·K) with respect to the
    pair vectors, Å⁻¹, component-major (module docstring; ``index``, ``exponents`` from
    ``moment_tables``)."""
    n_pairs, n_eta = pairs.shape[0], (pairs.shape[1] - 7) // 2
    u, inv_r = pairs[:, 0:3], pairs[:, 6:7]
    g, dg = pairs[:, 7 : 7 + n_eta, None], pairs[:, 7 + n_eta :, None]  # (P, E, 1)
    m, dm = monomials(u, index, exponents, slopes)
    per_eta = m[:, None, :].expand(n_pairs, n_eta, m.shape[1])
    values = g * torch.cat([per_eta, g], 2)
    if dm is None:
        return values.flatten(1), None
    along = dg * torch.cat([per_eta, 2.0 * g], 2)  # (P, E, K): d/dr at fixed u
    across = (dm - exponents.sum(1) * m[:, None, :] * u[:, :, None]) * inv_r[:, :, None]  # (P, 3, A)
    across = torch.cat([across, across.new_zeros(n_pairs, 3, 1)], 2)  # at fixed r; g² has none
    gradient = (along[:, None] * u[:, :, None, None]).addcmul_(g[:, None], across[:, :, None])  # (P, 3, E, K)
    return values.flatten(1), gradient.flatten(2)


def moment_jacobian(moments: Tensor, weights: Tensor, coefficients: Tensor, n_atoms: int) -> Tensor:
    """X = ∂G/∂M (N, E, U, L, nz, K): X[i, η, u, l, e, k] = ∂G[i, u, η, l]/∂M[e, i, η, k], of the G5
    functions G with respect to the moments M (nz·N, E·K) (the ``pair_moments`` terms summed per slot,
    ``terms.slot_sums``), with the pair weights (nz², U) of the element pairs (symmetric) and the
    ``moment_tables`` ``coefficients`` C (L, K): Σ_e' W_u(e, e') M[e', i, η, α] C[l, α] in the monomial
    columns, W_u(e, e) C[l, □] in the □ column."""
    n_combos, n_columns = coefficients.shape
    n_elements, n_weights = moments.shape[0] // n_atoms, weights.shape[1]
    n_eta = moments.shape[1] // n_columns
    W = weights.view(n_elements, n_elements, n_weights).permute(2, 0, 1)  # (U, nz, nz)
    M = moments.view(n_elements, n_atoms * n_eta, n_columns).transpose(0, 1)  # (N·E, nz, K)
    paired = torch.matmul(W.reshape(n_weights * n_elements, n_elements), M[:, :, : n_columns - 1])  # (N·E, U·nz, A)
    diagonal = torch.diagonal(W, 0, 1, 2).reshape(1, n_weights * n_elements, 1).expand(n_atoms * n_eta, -1, 1)
    Y = torch.cat([paired, diagonal], 2).view(-1, n_weights, 1, n_elements, n_columns)
    return (Y * coefficients[:, None, :]).view(n_atoms, n_eta, n_weights, n_combos, n_elements, n_columns)


def moment_descriptors(moments: Tensor, jacobian: Tensor) -> Tensor:
    """The G5 functions (N, U·E·L) from the moments (nz·N, E·K) and their ``moment_jacobian`` X:
    ½ X·M over the monomial columns (G is quadratic in them) plus X·M of the □ column (linear)."""
    n_atoms, n_eta, n_weights, n_combos, n_elements, n_columns = jacobian.shape
    half = torch.cat([moments.new_full([n_columns - 1], 0.5), moments.new_ones(1)])
    M = moments.view(n_elements, n_atoms * n_eta, n_columns).transpose(0, 1) * half  # (N·E, nz, K)
    X = jacobian.view(n_atoms * n_eta, n_weights * n_combos, n_elements * n_columns)
    G = torch.bmm(M.reshape(n_atoms * n_eta, 1, n_elements * n_columns), X.transpose(1, 2))  # Mᵀ Xᵀ: faster than X M
    return G.view(n_atoms, n_eta, n_weights, n_combos).transpose(1, 2).reshape(n_atoms, -1)


def moment_gradients(dE_dG: Tensor, jacobian: Tensor) -> Tensor:
    """dE/dM (nz·N, B, E·K) from dE/dG (N, B, U·E·L) of B energies (ensemble members) and the
    ``moment_jacobian`` X (N, E, U, L, nz, K): one matmul per atom and η."""
    n_atoms, n_eta, n_weights, n_combos, n_elements, n_columns = jacobian.shape
    d = dE_dG.view(n_atoms, -1, n_weights, n_eta, n_combos).permute(0, 3, 1, 2, 4)
    X = jacobian.view(n_atoms * n_eta, n_weights * n_combos, n_elements * n_columns)
    dE_dM = torch.bmm(d.reshape(n_atoms * n_eta, -1, n_weights * n_combos), X)  # (N·E, B, nz·K)
    dE_dM = dE_dM.view(n_atoms, n_eta, -1, n_elements, n_columns).permute(3, 0, 2, 1, 4)
    return dE_dM.reshape(n_elements * n_atoms, -1, n_eta * n_columns)


def moment_pair_jacobian(jacobian: Tensor, slot: Tensor, slopes: Tensor) -> Tensor:
    """dG/dv (P, U·E·L, 3), Å⁻¹, of every G5 function of each pair's centre with respect to the pair
    vector, from the ``moment_jacobian`` X (N, E, U, L, nz, K), the pairs' slots (P,), (element of
    j)·N + i, and their ``pair_moments`` slopes (P, 3, E·K)."""
    n_atoms, n_eta, n_weights, n_combos, n_elements, n_columns = jacobian.shape
    n_pairs = slot.shape[0]
    X = jacobian[slot % n_atoms, :, :, :, torch.div(slot, n_atoms, rounding_mode="floor")]  # (P, E, U, L, K)
    by_eta = slopes.view(n_pairs, 3, n_eta, n_columns).permute(0, 2, 3, 1).reshape(n_pairs * n_eta, n_columns, 3)
    dG = torch.bmm(X.view(n_pairs * n_eta, n_weights * n_combos, n_columns), by_eta)  # (P·E, U·L, 3)
    return dG.view(n_pairs, n_eta, n_weights, n_combos, 3).transpose(1, 2).flatten(1, 3)
