"""Kernels of ``LMLPCalculator``: descriptor assembly by element slots, the networks and the forces.

Small-molecule MD is bound by per-operation overhead, not arithmetic: a 6-atom step is about 150
tiny tensor operations. ``small_system`` runs a whole step (descriptors → dE/dG → pair gradients →
forces) in one function, which the calculator compiles (``compiled_small_system``: TorchScript or
``torch.compile``) or runs eagerly; the pieces are also used one by one, eagerly, for systems
evaluated in blocks. The terms and their slopes are ``lmlp.descriptors.terms``', the angular ones
summed over angular items: pairs by moments (``lmlp.descriptors.moments``) or triples. All functions
are TorchScript-compatible. Lengths Å, energies eV.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, List, Tuple

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


def radial_gradient(slots: Tensor, slopes: Tensor, units: Tensor) -> Tensor:
    """dE_m/dv (P, M, 3) of pairs with slot gradients ``slots`` (P, M, K), slopes (P, K) and unit
    vectors (P, 3)."""
    return (slots * slopes[:, None, :]).sum(2, keepdim=True) * units[:, None, :]


def add_angular_gradient(
    gradient: Tensor, slots: Tensor, slopes: Tensor, items: Tensor, units: Tensor, moments: bool
) -> None:
    """Add the angular items' dE_m/dv of their pairs to ``gradient`` (P, M, 3): ``slots`` (Q, M, C) the
    slot gradients of the items, ``slopes`` their moment slopes (Q, C, 3) (moments, items (1, Q)) or
    gradient coefficients (Q, C, 4) (triples, items (2, Q)), ``units`` (P, 3) the pairs' unit vectors."""
    if moments:
        gradient.index_add_(0, items[0], torch.bmm(slots, slopes))
        return
    on_j, on_k = angular_gradients(torch.bmm(slots, slopes), units.index_select(0, items[0]),
                                   units.index_select(0, items[1]))  # (Q, M, 3) each
    gradient.index_add_(0, items[0], on_j)
    gradient.index_add_(0, items[1], on_k)


def pair_gradients(
    dE_dG: Tensor, pair_weights: Tensor, jacobian: Tensor, pair_slot: Tensor, angular_slot: Tensor,
    rad_slopes: Tensor, ang_slopes: Tensor, units: Tensor, items: Tensor, moments: bool,
) -> Tensor:
    """dE_m/dv (P, M, 3) eV/Å of every pair vector from dE/dG (N, M, F), through the element slots:
    radial slopes (P, K), the angular items' slopes (``add_angular_gradient``), the Jacobian of
    ``angular_descriptors`` and the pairs' unit vectors (P, 3)."""
    n_radial = pair_weights.shape[1] * rad_slopes.shape[1]
    radial_slots = slot_gradients(dE_dG[:, :, :n_radial], pair_weights, rad_slopes.shape[1])
    angular_slots = angular_slot_gradients(dE_dG[:, :, n_radial:], jacobian, moments)
    gradient = radial_gradient(radial_slots.index_select(0, pair_slot), rad_slopes, units)
    add_angular_gradient(gradient, angular_slots.index_select(0, angular_slot), ang_slopes, items, units, moments)
    return gradient


def pair_virials(gradient: Tensor, vectors: Tensor) -> Tensor:
    """Member virials (M, 3, 3) float64 eV, W_ab = Σ_p (dE_m/dv_p)_a v_pb, from the pair gradients
    (P, M, 3) eV/Å and pair vectors (P, 3) Å: the strain derivative of the energy."""
    return torch.einsum("pma,pb->mab", gradient.to(torch.float64), vectors.to(torch.float64))


def pair_forces(gradient: Tensor, i: Tensor, j: Tensor, n_atoms: int) -> Tensor:
    """Forces (N, M, 3) eV/Å from dE_m/dv (P, M, 3) of the pair vectors v = R_j − R_i + shift."""
    forces = gradient.new_zeros(n_atoms, gradient.shape[1], 3).index_add_(0, i, gradient)
    return forces.index_add_(0, j, -gradient)


def small_system(
    positions: Tensor, i: Tensor, j: Tensor, shifts: Tensor, pair_slot: Tensor, items: Tensor, angular_slot: Tensor,
    pair_weights: Tensor, angular_weights: Tensor, radial_eta: Tensor, radial_rs: Tensor, eta: Tensor, lam: Tensor,
    zeta: Tensor, norm: Tensor, slope_norm: Tensor, index: Tensor, exponents: Tensor, coefficients: Tensor,
    cutoff: float, angular_cutoff: float, cutoff_function: str, g4: bool, moments: bool,
    mean: Tensor, inv_std: Tensor, weights: List[Tensor], biases: List[Tensor], transposed: List[Tensor],
    activation: int, members: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One whole evaluation, all pairs and angular items in one block, per-atom network weights.

    positions (N, 3) float64 Å; the rest as in ``lmlp.calculator._Neighbours``, ``TermParameters``
    and ``gathered_networks``, in the compute dtype. Returns atomic energies (N, M) eV, forces
    (N, M, 3) eV/Å, the pair distances (P,) Å and dE_m/dv of the pair vectors (P, M, 3) eV/Å.
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
    assert rad_slopes is not None and ang_slopes is not None
    gradient = pair_gradients(dE_dG, pair_weights, jacobian, pair_slot, angular_slot, rad_slopes, ang_slopes,
                              pairs[:, 0:3], items, moments)
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
