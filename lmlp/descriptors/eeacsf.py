"""Element-embracing atom-centred symmetry functions (eeACSFs, docs/method.md) and plain ACSFs.

Both kinds share one computation: every pair (i, j) contributes radial terms times a neighbour
weight vector w(Z_j) (T entries), every triple (i, j, k), j < k, contributes angular terms times a
pair weight vector W(Z_j, Z_k) (U entries); G5 functions with integer ζ sum the triples by moments
of the pairs (``lmlp.descriptors.moments``), in O(neighbours) per atom. Only the weight tables differ:

- eeACSF: w_t(Z) = h_t(Z) / max_t for the configured weight types t, and W either the "sum"
  (w_t(Z_j) + w_t(Z_k)) / 2 or the "difference" (|h_t(Z_j) − h_t(Z_k)| + 1) / max_t. The length
  does not depend on the elements present.
- plain ACSF: w is one-hot over the elements and W one-hot over unordered element pairs, which
  reproduces Behler's G2 and G4/G5 functions split per element (pair).

Function order: radial (T, K) then angular (U, E, L), each flattened row-major, with K the
(η, r_s) pairs, E the angular η and L the (λ, ζ) combinations.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmlp.descriptors.moments import moment_descriptors, moment_jacobian, moment_pair_jacobian, moment_tables
from lmlp.descriptors.neighbors import Neighbors, find_neighbors, find_triples
from lmlp.descriptors.terms import CUTOFF_FUNCTIONS, TermParameters, angular_gradients, angular_norms, slot_sums
from lmlp.elements import MAX_Z, WEIGHT_TYPE_MAX, weight_table

if TYPE_CHECKING:
    from lmlp.config import DescriptorConfig


TRIPLES_PER_BLOCK = 16384
"""Triples whose derivatives are computed at once (bounds temporaries to a few tens of MB)."""
MOMENT_BLOCK_FLOATS = 1 << 22
"""Largest temporary (floats) of the moment derivatives of a block of pairs (∂G/∂M gathered per pair)."""


@dataclass
class Derivatives:
    """Sparse dG/dR: ``values[m]`` is dG_{centre[m]} / dR_{atom[m]}.

    Attributes:
        centre: (M,) int64 atom whose descriptor is differentiated.
        atom: (M,) int64 atom that moves.
        values: (M, F, 3) in descriptor units per Å.

    Slots 0..N−1 are the self terms (centre = atom); the rest are one per directed pair.
    """

    centre: torch.Tensor
    atom: torch.Tensor
    values: torch.Tensor

    def forces(self, dE_dG: torch.Tensor, n_atoms: int) -> torch.Tensor:
        """F = −∂E/∂R from dE/dG (N, F) (or (M_models, N, F)); returns (N, 3) (or (M_models, N, 3))."""
        contribution = torch.einsum("...mf,mfc->...mc", dE_dG[..., self.centre, :], self.values)
        out = torch.zeros(*dE_dG.shape[:-2], n_atoms, 3, dtype=contribution.dtype, device=contribution.device)
        return -out.index_add_(-2, self.atom, contribution)


    def by_centre(self, n_atoms: int) -> CentreDerivatives:
        """The same derivatives grouped by centre atom and padded (faster force contraction)."""
        order = torch.argsort(self.centre, stable=True)
        centre, atom, values = self.centre[order], self.atom[order], self.values[order]
        counts = torch.bincount(centre, minlength=n_atoms)
        width = int(counts.max()) if len(counts) else 0
        slot = torch.arange(len(centre), device=centre.device) - (torch.cumsum(counts, 0) - counts)[centre]
        padded = values.new_zeros(n_atoms, width, values.shape[1], 3)
        padded[centre, slot] = values
        atoms = torch.arange(n_atoms, device=centre.device)[:, None].repeat(1, width)
        atoms[centre, slot] = atom
        return CentreDerivatives(padded.permute(0, 2, 1, 3).reshape(n_atoms, values.shape[1], 3 * width), atoms)


@dataclass
class CentreDerivatives:
    """dG/dR grouped by centre atom: ``values[i, :, 3k:3k+3]`` is dG_i/dR_{atom[i, k]}.

    Attributes:
        values: (N, F, 3K), K the largest number of slots of a centre; padding is zero.
        atom: (N, K) int64 moving atom of each slot (padding points at the centre itself).

    One batched matmul per atom replaces the gather of dE/dG onto every slot.
    """

    values: torch.Tensor
    atom: torch.Tensor

    def forces(self, dE_dG: torch.Tensor) -> torch.Tensor:
        """F = −∂E/∂R in eV/Å from dE/dG atom-major: (N, F) → (N, 3), or (N, B, F) → (B, N, 3)."""
        flat = dE_dG.reshape(len(dE_dG), -1, dE_dG.shape[-1])  # (N, B, F)
        n, b, width = len(flat), flat.shape[1], self.atom.shape[1]
        contribution = torch.bmm(flat, self.values).view(n, b, width, 3)  # one matmul per centre atom
        rows = contribution.transpose(1, 2).reshape(n * width, b * 3)  # (slot, member and xyz)
        out = rows.new_zeros(n, b * 3).index_add_(0, self.atom.flatten(), rows)
        out = out.view(n, b, 3).transpose(0, 1)
        return -(out[0] if dE_dG.dim() == 2 else out)

    def select(self, atoms: torch.Tensor, new_index: torch.Tensor) -> CentreDerivatives:
        """The rows of ``atoms`` (whole structures), atom indices mapped through ``new_index``."""
        return CentreDerivatives(self.values[atoms], new_index[self.atom[atoms]])

    @staticmethod
    def cat(parts: list[CentreDerivatives], atom_starts: list[int]) -> CentreDerivatives:
        """Join blocks of consecutive atoms (padding to the widest); ``atom_starts`` offsets each block."""
        width = max(p.atom.shape[1] for p in parts)
        values, atoms = [], []
        for part, start in zip(parts, atom_starts):
            extra = width - part.atom.shape[1]
            values.append(torch.nn.functional.pad(part.values, (0, 3 * extra)))
            own = part.atom + start
            atoms.append(torch.cat([own, own[:, :1].expand(-1, extra)], dim=1))
        return CentreDerivatives(torch.cat(values), torch.cat(atoms))


class SymmetryFunctions(torch.nn.Module):
    """eeACSF or plain-ACSF descriptor of every atom of a batch of structures.

    Args:
        cutoff: R_c of the radial functions, Å.
        radial_eta, radial_rs: paired (η in Å⁻², r_s in Å) of the radial functions.
        angular_eta: η of the angular functions, Å⁻².
        angular_lambda, angular_zeta: every combination (λ, ζ) is used.
        radial_types, angular_types: eeACSF weight types t (0..6).
        angular_pair_weights: "sum" and/or "difference" (the difference is skipped for t = 0,
            where it equals the sum).
        angular_form: "g5" (no r_jk factor) or "g4". G5 functions with integer ζ only are evaluated
            by moments (attribute ``moments``; set it False for the triple sums, the reference).
        kind: "eeacsf" or "acsf" (plain, per element; needs ``elements``).
        elements: atomic numbers, for ``kind="acsf"``.
        angular_cutoff: R_c of the angular functions, Å, at most ``cutoff``; None: ``cutoff``.
        cutoff_function: one of ``terms.CUTOFF_FUNCTIONS``, for both cutoffs.
    """

    def __init__(
        self,
        cutoff: float,
        radial_eta: list[float],
        radial_rs: list[float],
        angular_eta: list[float],
        angular_lambda: list[float],
        angular_zeta: list[float],
        radial_types: list[int] = (0,),
        angular_types: list[int] = (0,),
        angular_pair_weights: list[str] = ("sum",),
        angular_form: str = "g5",
        kind: str = "eeacsf",
        elements: list[int] | None = None,
        angular_cutoff: float | None = None,
        cutoff_function: str = "cos",
    ) -> None:
        super().__init__()
        angular_cutoff = float(cutoff if angular_cutoff is None else angular_cutoff)
        if not 0 < angular_cutoff <= cutoff:
            raise ValueError(f"angular cutoff {angular_cutoff} Å must lie in (0, {cutoff}] Å")
        if cutoff_function not in CUTOFF_FUNCTIONS:
            raise ValueError(f"unknown cutoff function {cutoff_function!r}; expected one of {CUTOFF_FUNCTIONS}")
        self.hyperparameters = dict(
            cutoff=float(cutoff), radial_eta=list(radial_eta), radial_rs=list(radial_rs),
            angular_eta=list(angular_eta), angular_lambda=list(angular_lambda),
            angular_zeta=list(angular_zeta), radial_types=list(radial_types),
            angular_types=list(angular_types), angular_pair_weights=list(angular_pair_weights),
            angular_form=angular_form, kind=kind, elements=None if elements is None else list(elements),
            angular_cutoff=angular_cutoff, cutoff_function=cutoff_function,
        )
        """The constructor arguments, to rebuild the descriptor from a model file."""
        self.cutoff = float(cutoff)
        self.angular_cutoff = angular_cutoff
        self.cutoff_function = cutoff_function
        self.g4 = angular_form == "g4"
        self.moments = not self.g4 and all(float(z).is_integer() for z in angular_zeta)
        """Whether the angular functions are sums over pairs by moments (G5, integer ζ) or over triples."""
        self.kind = kind
        combos = list(itertools.product(angular_lambda, angular_zeta))
        f64 = torch.float64
        self.register_buffer("radial_eta", torch.tensor(radial_eta, dtype=f64))
        self.register_buffer("radial_rs", torch.tensor(radial_rs, dtype=f64))
        self.register_buffer("angular_eta", torch.tensor(angular_eta, dtype=f64))
        self.register_buffer("angular_lambda", torch.tensor([c[0] for c in combos], dtype=f64))
        self.register_buffer("angular_zeta", torch.tensor([c[1] for c in combos], dtype=f64))
        if kind == "eeacsf":
            w, pw = eeacsf_weights(radial_types, angular_types, angular_pair_weights)
        elif kind == "acsf":
            if not elements:
                raise ValueError("plain ACSFs need the list of elements")
            w, pw = acsf_weights(elements)
        else:
            raise ValueError(f"unknown descriptor kind {kind!r}")
        self.register_buffer("neighbor_weights", torch.from_numpy(w))
        self.register_buffer("pair_weights", torch.from_numpy(pw))

    @classmethod
    def from_config(cls, cfg: DescriptorConfig, elements: list[int] | None = None) -> SymmetryFunctions:
        """The descriptor a ``descriptor:`` config section describes (``elements`` for plain ACSFs)."""
        return cls(
            cutoff=cfg.cutoff,
            radial_eta=cfg.radial_eta,
            radial_rs=cfg.radial_rs,
            angular_eta=cfg.angular_eta,
            angular_lambda=cfg.angular_lambda,
            angular_zeta=cfg.angular_zeta,
            radial_types=cfg.radial_types,
            angular_types=cfg.angular_types,
            angular_pair_weights=cfg.angular_pair_weights,
            angular_form=cfg.angular_form,
            kind=cfg.kind,
            elements=elements,
            angular_cutoff=None if cfg.angular_cutoff is None else min(cfg.angular_cutoff, cfg.cutoff),
            cutoff_function=cfg.cutoff_function,
        )

    @property
    def n_radial(self) -> int:
        return self.neighbor_weights.shape[1] * len(self.radial_eta)

    @property
    def n_functions(self) -> int:
        n_angular = self.pair_weights.shape[2] * len(self.angular_eta) * len(self.angular_zeta)
        return self.n_radial + n_angular

    def terms(self, dtype: torch.dtype) -> TermParameters:
        """The term parameters in ``dtype``, with the term functions bound to them."""
        lam, zeta = self.angular_lambda.to(dtype), self.angular_zeta.to(dtype)
        tables = (moment_tables(lam, zeta, int(self.angular_zeta.max())) if self.moments else
                  (torch.zeros(0, 3, dtype=torch.int64), lam.new_zeros(0, 3), lam.new_zeros(0, len(lam))))
        return TermParameters(
            self.radial_eta.to(dtype), self.radial_rs.to(dtype), self.angular_eta.to(dtype), lam, zeta,
            *angular_norms(lam, zeta), *tables, self.cutoff, self.angular_cutoff, self.cutoff_function, self.g4,
            self.moments)

    def forward(
        self,
        numbers: torch.Tensor,
        positions: torch.Tensor,
        offsets: torch.Tensor,
        cells: torch.Tensor | None = None,
        pbc: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Descriptors G (N, F); differentiable in ``positions`` (N, 3) Å (the autograd path)."""
        nb, terms, pairs, angular = self._geometry(positions, offsets, cells, pbc)
        n = len(numbers)
        rad, _ = terms.radial(pairs, False)
        values, _ = terms.angular_items(pairs, angular, False)
        G_radial = weighted_sum(rad, self._neighbor_weights(numbers, nb.pairs, positions.dtype), nb.pairs[0], n)
        if terms.moments:
            moments, jacobian, _ = self._moments(numbers, nb.pairs, angular, values, terms)
            G_angular = moment_descriptors(moments, jacobian)
        else:
            weights = self._triple_weights(numbers, nb.pairs, angular, positions.dtype)
            G_angular = weighted_sum(values, weights, nb.pairs[0, angular[0]], n)
        return torch.cat([G_radial, G_angular], 1)

    def with_derivatives(
        self,
        numbers: torch.Tensor,
        positions: torch.Tensor,
        offsets: torch.Tensor,
        cells: torch.Tensor | None = None,
        pbc: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Derivatives]:
        """Descriptors G (N, F) and their sparse derivatives dG/dR (the terms' analytic slopes)."""
        positions = positions.detach()
        n = len(numbers)
        nb, terms, pairs, angular = self._geometry(positions, offsets, cells, pbc)
        wn = self._neighbor_weights(numbers, nb.pairs, positions.dtype)
        rad, slope = terms.radial(pairs, True)
        G = positions.new_zeros(n, self.n_functions)
        G[:, : self.n_radial] = weighted_sum(rad, wn, nb.pairs[0], n)
        pair_values = positions.new_zeros(nb.pairs.shape[1], self.n_functions, 3)
        d_rad = slope[:, :, None] * pairs[:, None, 0:3]  # (P, K, 3)
        pair_values[:, : self.n_radial] = (wn[:, :, None, None] * d_rad[:, None]).flatten(1, 2)
        add_angular = self._add_moment_derivatives if terms.moments else self._add_triple_derivatives
        add_angular(numbers, nb.pairs, terms, pairs, angular, G[:, self.n_radial :], pair_values[:, self.n_radial :])
        # Translation invariance: dG_i/dR_i = −Σ_j dG_i/dR_j over the pair slots of centre i.
        self_values = positions.new_zeros(n, self.n_functions, 3).index_add_(0, nb.pairs[0], -pair_values)
        values = torch.cat([self_values, pair_values])
        self_slots = torch.arange(n, device=positions.device)
        derivatives = Derivatives(
            centre=torch.cat([self_slots, nb.pairs[0]]),
            atom=torch.cat([self_slots, nb.pairs[1]]),
            values=values,
        )
        return G, derivatives

    def _add_moment_derivatives(
        self, numbers: torch.Tensor, neighbours: torch.Tensor, terms: TermParameters, pairs: torch.Tensor,
        angular: torch.Tensor, G: torch.Tensor, pair_values: torch.Tensor,
    ) -> None:
        """Add the angular functions by moments (N, U·E·L) to ``G`` and their derivatives with respect
        to the pair vectors (P, U·E·L, 3) to ``pair_values``; ``angular`` (1, Q) the angular pairs."""
        values, _ = terms.angular_items(pairs, angular, False)
        moments, jacobian, slot = self._moments(numbers, neighbours, angular, values, terms)
        G += moment_descriptors(moments, jacobian)
        size = max(1, MOMENT_BLOCK_FLOATS // jacobian[0, :, :, :, 0].numel())
        for block in torch.split(torch.arange(angular.shape[1], device=pairs.device), size):
            _, slopes = terms.angular_items(pairs, angular[:, block], True)
            pair_values.index_add_(0, angular[0, block], moment_pair_jacobian(jacobian, slot[block], slopes))

    def _add_triple_derivatives(
        self, numbers: torch.Tensor, neighbours: torch.Tensor, terms: TermParameters, pairs: torch.Tensor,
        triples: torch.Tensor, G: torch.Tensor, pair_values: torch.Tensor,
    ) -> None:
        """Add the angular functions over the triples (2, Q) (N, U·E·L) to ``G`` and their derivatives
        with respect to the pair vectors (P, U·E·L, 3) to ``pair_values``, block by block."""
        wp = self._triple_weights(numbers, neighbours, triples, pairs.dtype)
        units = pairs[:, 0:3]
        for block in torch.split(torch.arange(triples.shape[1], device=pairs.device), TRIPLES_PER_BLOCK):
            t, w = triples[:, block], wp[block]
            ang, c = terms.angular_items(pairs, t, True)  # (Q, EL), (Q, 4, EL)
            d_ang_j, d_ang_k = angular_gradients(c.transpose(1, 2), units[t[0]], units[t[1]])  # (Q, EL, 3) each
            G += weighted_sum(ang, w, neighbours[0, t[0]], len(numbers))
            pair_values.index_add_(0, t[0], (w[:, :, None, None] * d_ang_j[:, None]).flatten(1, 2))
            pair_values.index_add_(0, t[1], (w[:, :, None, None] * d_ang_k[:, None]).flatten(1, 2))

    def _geometry(
        self, positions: torch.Tensor, offsets: torch.Tensor, cells: torch.Tensor | None, pbc: torch.Tensor | None
    ) -> tuple[Neighbors, TermParameters, torch.Tensor, torch.Tensor]:
        """Neighbour pairs within the cutoff, the term parameters, the ``pair_data`` rows (P, 7 + 2E)
        and the angular items (``find_angular_items``)."""
        nb = find_neighbors(positions, offsets, self.cutoff, cells, pbc)
        terms = self.terms(positions.dtype)
        pairs = terms.pair_data(nb.vectors(positions))
        angular = find_angular_items(nb.pairs, pairs[:, 3].detach(), self.angular_cutoff, len(positions), self.moments)
        return nb, terms, pairs, angular

    def _neighbor_weights(self, numbers: torch.Tensor, pairs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Neighbour weights (P, T) of the pairs (2, P)."""
        return self.neighbor_weights.to(dtype)[numbers[pairs[1]]]

    def _triple_weights(
        self, numbers: torch.Tensor, pairs: torch.Tensor, triples: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Pair weights (Q, U) of the triples (2, Q) of the pairs (2, P)."""
        z_j = numbers[pairs[1]]
        return self.pair_weights.to(dtype)[z_j[triples[0]], z_j[triples[1]]]

    def _moments(
        self, numbers: torch.Tensor, pairs: torch.Tensor, angular: torch.Tensor, values: torch.Tensor,
        terms: TermParameters,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The moments M (nz·N, E·K) of the angular pairs ``angular`` (1, Q) of the pairs (2, P) from
        their moment terms ``values`` (Q, E·K), their ``moment_jacobian`` and the angular pairs' slots
        (Q,), (element of j)·N + i over the nz elements present."""
        n = len(numbers)
        elements, element = torch.unique(numbers, return_inverse=True)
        slot = element[pairs[1, angular[0]]] * n + pairs[0, angular[0]]
        moments = slot_sums(values, slot, len(elements) * n)
        weights = self.pair_weights.to(values.dtype)[elements][:, elements].flatten(0, 1)
        return moments, moment_jacobian(moments, weights, terms.moment_coefficients, n), slot


def weighted_sum(terms: torch.Tensor, weights: torch.Tensor, centres: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Descriptor part (N, W·C), weight-major: Σ over the pairs or triples b of centre i of
    weights[b] (B, W) ⊗ terms[b] (B, C); ``centres`` (B,) the centre atom of each. TorchScript-compatible."""
    out = terms.new_zeros(n_atoms, weights.shape[1] * terms.shape[1])
    return out.index_add(0, centres, (weights[:, :, None] * terms[:, None, :]).flatten(1))


def find_angular_items(
    pairs: torch.Tensor, distances: torch.Tensor, angular_cutoff: float, n_atoms: int, moments: bool
) -> torch.Tensor:
    """The angular items: with ``moments`` (1, Q) the pairs shorter than ``angular_cutoff``, else (2, Q)
    the triples, pair indices (p, q), p < q, of every two pairs of one centre both shorter.

    Args:
        pairs: (2, P) directed pairs. distances: (P,) their lengths, Å. n_atoms: N.
    """
    inside = torch.nonzero(distances < angular_cutoff).flatten()
    return inside[None] if moments else inside[find_triples(pairs[:, inside], n_atoms)]


def eeacsf_weights(
    radial_types: list[int], angular_types: list[int], pair_kinds: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """eeACSF weight tables: (MAX_Z + 1, T) neighbour weights and (MAX_Z + 1, MAX_Z + 1, U) pair weights."""
    h = weight_table()
    w = h / WEIGHT_TYPE_MAX
    neighbor = w[:, list(radial_types)]
    columns = []
    for t in angular_types:
        for kind in pair_kinds:
            if kind == "sum":
                columns.append((w[:, None, t] + w[None, :, t]) / 2)
            elif kind == "difference" and t != 0:
                columns.append((np.abs(h[:, None, t] - h[None, :, t]) + 1) / WEIGHT_TYPE_MAX[t])
            elif kind != "difference":
                raise ValueError(f"unknown pair weight {kind!r}")
    if not columns:
        raise ValueError(f"angular pair weights {list(pair_kinds)} of types {list(angular_types)} give no angular "
                         f"functions (\"difference\" is left out for type 0, where it equals \"sum\")")
    return neighbor, np.stack(columns, axis=-1)


def acsf_weights(elements: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Plain-ACSF weight tables: one-hot per element, and per unordered element pair (a ≤ b)."""
    elements = sorted(elements)
    neighbor = np.zeros((MAX_Z + 1, len(elements)))
    neighbor[elements, np.arange(len(elements))] = 1.0
    pairs = list(itertools.combinations_with_replacement(elements, 2))
    pair = np.zeros((MAX_Z + 1, MAX_Z + 1, len(pairs)))
    for u, (a, b) in enumerate(pairs):
        pair[a, b, u] = pair[b, a, u] = 1.0
    return neighbor, pair
