"""Kernels of ``LMLPCalculator``: descriptor assembly by element slots, the networks and the forces.

Small-molecule MD is bound by per-operation overhead, not arithmetic: a 6-atom step is about 150
tiny tensor operations. ``small_system`` runs a whole step (descriptors → dE/dG → pair gradients →
forces) in one function, which the calculator compiles (``compiled_small_system``: TorchScript or
``torch.compile``) or runs eagerly; the pieces are also used one by one, eagerly, for systems
evaluated in blocks. The terms and their slopes are ``lmlp.descriptors.terms``', the angular ones
summed over angular items: pairs by moments (``lmlp.descriptors.moments``) or triples. All functions
but ``radial_bands`` (host-side planning) are TorchScript-compatible. Lengths Å, energies eV.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from lmlp.descriptors.moments import moment_descriptors, moment_gradients, moment_jacobian
from lmlp.descriptors.terms import angular_gradients, angular_items, pair_data, radial, slot_sums
from lmlp.model import activate


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


def element_slots(
    element_j: Tensor, i: Tensor, items: Tensor, n_elements: int, n_atoms: int
) -> Tuple[Tensor, Tensor]:
    """Element slots (``lmlp.calculator._Neighbours``) of the pairs (P,), (element of j)·N + i, and of
    the angular items (Q,), (element class)·N + i of their centre: for a pair (moments; items (1, Q))
    the element of j, for a triple (items (2, Q)) nz·(element of j) + element of k. ``element_j`` (P,)
    is the element position (0..nz − 1) of each pair's neighbour j, i (P,) its centre."""
    element = element_j.index_select(0, items[0])
    for row in range(1, items.shape[0]):
        element = element * n_elements + element_j.index_select(0, items[row])
    return element_j * n_atoms + i, element * n_atoms + i.index_select(0, items[0])


def descriptors(
    rad: Tensor, ang: Tensor, pair_slot: Tensor, angular_slot: Tensor, pair_weights: Tensor,
    angular_weights: Tensor, coefficients: Tensor, n_atoms: int, moments: bool,
) -> Tuple[Tensor, Tensor]:
    """Descriptors G (N, F) from radial terms (P, K) and angular item terms (Q, C) by element slots,
    and the Jacobian of the angular part (``angular_descriptors``)."""
    G_radial = weighted_slots(slot_sums(rad, pair_slot, pair_weights.shape[0] * n_atoms), pair_weights, n_atoms)
    angular_kinds = pair_weights.shape[0] if moments else angular_weights.shape[0]  # nz or nz²
    angular_sums = slot_sums(ang, angular_slot, angular_kinds * n_atoms)
    G_angular, jacobian = angular_descriptors(angular_sums, angular_weights, coefficients, n_atoms, moments)
    return torch.cat([G_radial, G_angular], 1), jacobian


def weighted_slots(sums: Tensor, element_weights: Tensor, n_atoms: int) -> Tensor:
    """Descriptors (N, T·C) from terms summed per element slot (nz^k·N, C) (``slot_sums``), the slots
    weighted by ``element_weights`` (nz^k, T) (see ``lmlp.calculator._Neighbours``)."""
    n_slot_kinds = element_weights.shape[0]
    G = (element_weights.T @ sums.view(n_slot_kinds, -1)).view(-1, n_atoms, sums.shape[1])
    return G.transpose(0, 1).reshape(n_atoms, -1)


def angular_descriptors(
    sums: Tensor, weights: Tensor, coefficients: Tensor, n_atoms: int, moments: bool
) -> Tuple[Tensor, Tensor]:
    """Angular descriptors (N, U·E·L) from the angular item terms summed per slot (``slot_sums``), and
    their Jacobian with respect to these sums: by moments the ``moment_jacobian`` (N, E, U, L, nz, K)
    (``coefficients`` (L, K)), over triples the pair weights (nz², U) themselves (G is linear in the
    sums)."""
    if moments:
        jacobian = moment_jacobian(sums, weights, coefficients, n_atoms)
        return moment_descriptors(sums, jacobian), jacobian
    return weighted_slots(sums, weights, n_atoms), weights


def slot_gradients(dE_dG: Tensor, element_weights: Tensor, n_terms: int) -> Tensor:
    """dE/d(term) per element slot (nz^k·N, M, C) from the part of dE/dG (N, M, T·C) that the
    slots feed (the transpose of ``weighted_slots``)."""
    n, m = dE_dG.shape[0], dE_dG.shape[1]
    n_types = element_weights.shape[1]
    per_type = dE_dG.reshape(n, m, n_types, n_terms).permute(2, 0, 1, 3).reshape(n_types, -1)
    return (element_weights @ per_type).view(-1, m, n_terms)


def angular_slot_gradients(dE_dG: Tensor, jacobian: Tensor, moments: bool) -> Tensor:
    """dE/d(item term) per slot (nz^k·N, M, C) from the angular part of dE/dG (N, M, U·E·L) and the
    Jacobian of ``angular_descriptors``."""
    if moments:
        return moment_gradients(dE_dG, jacobian)
    return slot_gradients(dE_dG, jacobian, dE_dG.shape[2] // jacobian.shape[1])


Layout = Tuple[Tensor, Tensor, Tensor, int]
"""Where ``contract_slots`` puts each pair or item (``chunk_layout``): (index (B,) into the padded
chunks, source (C·W,) the pair or item of each chunk row (padding rows repeat a real one), slot (C,)
of each chunk, chunk width W)."""
CHUNK_WIDTH_MAX = 32
"""Widest chunk of ``chunk_layout``, pairs or items."""


def chunk_layout(slot: Tensor) -> Optional[Layout]:
    """The chunks of ``contract_slots`` for pairs or items with slots ``slot`` (B,): each slot's
    members fill chunks of W rows (W a power of two near a quarter of the mean members per slot, at
    most ``CHUNK_WIDTH_MAX``); None (gather instead) when W would be 1. Sorted slots keep the chunks
    of a block of pairs few."""
    if slot.shape[0] == 0:
        return None
    ids, local, counts = torch.unique(slot, sorted=True, return_inverse=True, return_counts=True)
    width = min(CHUNK_WIDTH_MAX, 2 ** round(math.log2(max(slot.shape[0] / len(ids) / 4, 1.0))))
    if width == 1:
        return None
    order = torch.argsort(local, stable=True)
    chunks = (counts + width - 1) // width
    first_chunk, start = torch.cumsum(chunks, 0) - chunks, torch.cumsum(counts, 0) - counts
    ordered = local[order]
    rank = torch.arange(slot.shape[0]) - start[ordered]
    index = torch.empty_like(slot)
    index[order] = (first_chunk[ordered] + torch.div(rank, width, rounding_mode="floor")) * width + rank % width
    source = torch.zeros(int(chunks.sum()) * width, dtype=index.dtype).index_copy_(0, index, torch.arange(len(slot)))
    return index, source, torch.repeat_interleave(ids, chunks), width


def contract_slots(slot_gradients: Tensor, slot: Tensor, values: Tensor, layout: Optional[Layout]) -> Tensor:
    """Σ_c S[slot_b, m, c] V[b, x, c]: (B, M, X) from slot gradients S (nz^k·N, M, C), the slots (B,)
    of B pairs or items and their values V (B, X, C), e.g. slopes.

    Without ``layout`` the slot gradients are gathered per pair (B·M·C floats moved). With it, the
    values of each slot are padded into chunks (``chunk_layout``) and every chunk is one matmul with
    its slot's gradients, gathered once per chunk: about ten times faster at hundreds of pairs per
    slot (condensed phases), the same numbers to round-off. The rows of a matmul are independent, so
    padding rows are filled by gathering any real row (faster than zeroing them and copying the real
    ones in); their results are never read.
    """
    if layout is None:
        return torch.bmm(slot_gradients.index_select(0, slot), values.transpose(1, 2))
    index, source, chunk_slot, width = layout
    n_chunks, n_out, n_terms = chunk_slot.shape[0], values.shape[1], values.shape[2]
    padded = values.index_select(0, source)
    out = torch.bmm(padded.view(n_chunks, width * n_out, n_terms),
                    slot_gradients.index_select(0, chunk_slot).transpose(1, 2))  # (C, W·X, M)
    return out.view(n_chunks * width, n_out, -1).index_select(0, index).transpose(1, 2)


BAND_OVERHEAD = 1 << 15
"""The cost of one more band of ``radial_bands``, in pair-terms: about the fixed cost of a block's
dozen tensor operations (~0.15 ms) over that of one radial term of one pair with its slope and
contraction (a few ns)."""


def radial_bands(first: Tensor, n_terms: int) -> Tuple[Tensor, List[int]]:
    """Bands of pairs that evaluate the same radial terms: the band of each pair (B,) and each
    band's first term.

    ``first`` (B,) holds each pair's first needed term (0..K) among ``n_terms`` = K radial terms
    ordered by ``terms.radial_reach``: the terms before it stay negligible while the pair list holds.
    A band starting at term s evaluates terms s..K − 1 of its pairs; the bands minimise the pair-terms
    evaluated plus ``BAND_OVERHEAD`` per band (exact, over the K + 1 possible starts)."""
    counts = torch.bincount(first, minlength=n_terms + 1).tolist()
    best, choice = [0.0] + [math.inf] * (n_terms + 1), [0] * (n_terms + 2)
    for end in range(1, n_terms + 2):
        pairs = 0
        for start in range(end - 1, -1, -1):
            pairs += counts[start]
            cost = best[start] + (BAND_OVERHEAD + (n_terms - start) * pairs if pairs else 0)
            if cost < best[end]:
                best[end], choice[end] = cost, start
    starts, end = [], n_terms + 1
    while end > 0:
        if sum(counts[choice[end]:end]):
            starts.append(choice[end])
        end = choice[end]
    starts.reverse()
    return torch.searchsorted(torch.tensor(starts), first, right=True) - 1, starts


def radial_gradient(slot_gradients: Tensor, slot: Tensor, slopes: Tensor, units: Tensor,
                    layout: Optional[Layout]) -> Tensor:
    """dE_m/dv (P, M, 3) of pairs with slots ``slot`` (P,) from the radial slot gradients (nz·N, M, K),
    slopes (P, K) and unit vectors (P, 3)."""
    return contract_slots(slot_gradients, slot, slopes[:, None, :], layout) * units[:, None, :]


def angular_pair_gradients(
    slot_gradients: Tensor, slot: Tensor, slopes: Tensor, items: Tensor, units: Tensor, moments: bool,
    layout: Optional[Layout],
) -> List[Tuple[Tensor, Tensor]]:
    """The angular items' dE_m/dv of their pairs, as (pair indices (Q,), gradients (Q, M, 3)): one
    such part by moments (items (1, Q)), two over triples (items (2, Q), the first and the second
    pair of each). ``slot_gradients`` (nz^k·N, M, C) of the slots ``slot`` (Q,) of the items,
    ``slopes`` their moment slopes (Q, 3, C) or gradient coefficients (Q, 4, C), ``units`` (P, 3)
    the pairs' unit vectors."""
    contracted = contract_slots(slot_gradients, slot, slopes, layout)
    if moments:
        return [(items[0], contracted)]
    on_j, on_k = angular_gradients(contracted, units.index_select(0, items[0]), units.index_select(0, items[1]))
    return [(items[0], on_j), (items[1], on_k)]


def add_angular_gradient(
    gradient: Tensor, slot_gradients: Tensor, slot: Tensor, slopes: Tensor, items: Tensor, units: Tensor,
    moments: bool, layout: Optional[Layout],
) -> None:
    """Add the ``angular_pair_gradients`` to ``gradient`` (P, M, 3) of the pairs."""
    for pair, part in angular_pair_gradients(slot_gradients, slot, slopes, items, units, moments, layout):
        gradient.index_add_(0, pair, part)


def pair_gradients(
    dE_dG: Tensor, pair_weights: Tensor, jacobian: Tensor, pair_slot: Tensor, angular_slot: Tensor,
    rad_slopes: Tensor, ang_slopes: Tensor, units: Tensor, items: Tensor, moments: bool,
    pair_layout: Optional[Layout] = None, angular_layout: Optional[Layout] = None,
) -> Tensor:
    """dE_m/dv (P, M, 3) eV/Å of every pair vector from dE/dG (N, M, F), through the element slots:
    radial slopes (P, K), the angular items' slopes (``add_angular_gradient``), the Jacobian of
    ``angular_descriptors`` and the pairs' unit vectors (P, 3); ``contract_slots`` with the layouts."""
    n_radial = pair_weights.shape[1] * rad_slopes.shape[1]
    radial_slots = slot_gradients(dE_dG[:, :, :n_radial], pair_weights, rad_slopes.shape[1])
    angular_slots = angular_slot_gradients(dE_dG[:, :, n_radial:], jacobian, moments)
    gradient = radial_gradient(radial_slots, pair_slot, rad_slopes, units, pair_layout)
    add_angular_gradient(gradient, angular_slots, angular_slot, ang_slopes, items, units, moments, angular_layout)
    return gradient


def mean_gradient(dE_dG: Tensor) -> Tensor:
    """The ensemble mean of dE_m/dG (N, M, F) as (N, 1, F): contracted with the slopes like one member, it
    gives the ensemble-mean forces and virials (the contraction is linear) at 1/M of the members' cost."""
    return dE_dG.mean(1, keepdim=True)


def pair_virials(gradient: Tensor, vectors: Tensor) -> Tensor:
    """Member virials (M, 3, 3) float64 eV, W_ab = Σ_p (dE_m/dv_p)_a v_pb, from the pair gradients
    (P, M, 3) eV/Å and pair vectors (P, 3) Å: the strain derivative of the energy."""
    n_pairs, members = gradient.shape[0], gradient.shape[1]
    by_pairs = gradient.to(torch.float64).reshape(n_pairs, members * 3)
    return torch.mm(vectors.to(torch.float64).T, by_pairs).view(3, members, 3).permute(1, 2, 0)  # one GEMM


def pair_forces(gradient: Tensor, i: Tensor, j: Tensor, n_atoms: int) -> Tensor:
    """Forces (N, M, 3) eV/Å from dE_m/dv (P, M, 3) of the pair vectors v = R_j − R_i + shift."""
    sums = gradient.new_zeros(2, n_atoms, gradient.shape[1], 3)
    add_pair_gradients(sums, gradient, i, j)
    return sums[0] - sums[1]


def add_pair_gradients(sums: Tensor, gradient: Tensor, i: Tensor, j: Tensor) -> None:
    """Add dE_m/dv (P, M, 3) of pair vectors v = R_j − R_i + shift to ``sums`` (2, N, M, 3), over the
    pairs' centres i and over their neighbours j: the forces are sums[0] − sums[1]. (``index_add_``
    with ``alpha=-1`` would take the difference directly, but runs about ten times slower.)"""
    sums[0].index_add_(0, i, gradient)
    sums[1].index_add_(0, j, gradient)


def small_system(
    positions: Tensor, i: Tensor, j: Tensor, shifts: Tensor, pair_slot: Tensor, items: Tensor, angular_slot: Tensor,
    pair_weights: Tensor, angular_weights: Tensor, radial_eta: Tensor, radial_rs: Tensor, eta: Tensor, lam: Tensor,
    zeta: Tensor, norm: Tensor, slope_norm: Tensor, index: Tensor, exponents: Tensor, coefficients: Tensor,
    cutoff: float, angular_cutoff: float, cutoff_function: str, g4: bool, moments: bool,
    mean: Tensor, inv_std: Tensor, weights: List[Tensor], biases: List[Tensor], transposed: List[Tensor],
    activation: int, members: int, pair_layout: Optional[Layout], angular_layout: Optional[Layout],
    mean_forces: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One whole evaluation, all pairs and angular items in one block, per-atom network weights.

    positions (N, 3) float64 Å; the rest as in ``lmlp.calculator._Neighbours``, ``TermParameters``,
    ``gathered_networks`` and ``contract_slots``, in the compute dtype. Returns atomic energies (N, M) eV, forces
    (N, M', 3) eV/Å, the pair distances (P,) Å and dE_m/dv of the pair vectors (P, M', 3) eV/Å: M' = M member
    forces, or with ``mean_forces`` M' = 1, the ensemble mean (``mean_gradient``).
    """
    n = positions.shape[0]
    v = (positions.index_select(0, j) - positions.index_select(0, i) + shifts).to(radial_eta.dtype)
    pairs = pair_data(v, cutoff, angular_cutoff, cutoff_function, eta)
    rad, rad_slopes = radial(pairs, radial_eta, radial_rs, True)
    ang, ang_slopes = angular_items(pairs, items, eta, lam, zeta, norm, slope_norm, index, exponents, cutoff,
                                    angular_cutoff, cutoff_function, g4, moments, True)
    G, jacobian = descriptors(rad, ang, pair_slot, angular_slot, pair_weights, angular_weights, coefficients, n,
                              moments)
    atomic, dE_dG = gathered_networks(G, mean, inv_std, weights, biases, transposed, activation, members)
    if mean_forces:
        dE_dG = mean_gradient(dE_dG)
    assert rad_slopes is not None and ang_slopes is not None
    gradient = pair_gradients(dE_dG, pair_weights, jacobian, pair_slot, angular_slot, rad_slopes, ang_slopes,
                              pairs[:, 0:3], items, moments, pair_layout, angular_layout)
    return atomic, pair_forces(gradient, i, j, n), pairs[:, 3], gradient


KERNEL_BACKENDS = ("script", "compile", "eager")
"""How ``small_system`` runs: compiled by TorchScript (``torch.jit.script``, deprecated in torch
2.13 but the fastest to start), by ``torch.compile`` (fastest per call after a one-off compilation
of tens of seconds, cached on disk by torch), or eagerly."""


@functools.cache
def compiled_small_system(backend: str) -> Callable[..., Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``small_system`` for ``backend`` (one of ``KERNEL_BACKENDS``), compiled once per process."""
    if backend == "eager":
        return small_system
    if backend == "compile":
        return torch.compile(small_system, dynamic=True)
    if backend == "script":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return torch.jit.script(small_system)
    raise ValueError(f"unknown kernel backend {backend!r}; expected one of {KERNEL_BACKENDS}")
