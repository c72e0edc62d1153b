"""ASE calculator for lMLP ensembles: energies, forces and their ensemble uncertainties.

``LMLPCalculator`` is a standard ASE ``Calculator`` (molecules and periodic cells) usable with every
ASE optimiser and MD driver. The prediction is the ensemble mean; the spread of the M members is the
uncertainty. Units: energies eV, forces eV/Å, lengths Å.

Speed (small-molecule MD is overhead-bound): the calculator keeps a Verlet neighbour list (pairs
within cutoff + skin, rebuilt when an atom has moved more than skin/2), with the angular items
(the pairs within the angular cutoff + skin, summed by moments in time linear in the number of
neighbours, or their triples: ``_Neighbours``) and element weights of its pairs, and uses the
terms' analytic slopes (``lmlp.descriptors.terms``). Each step evaluates the symmetry functions
once, dE/dG of all members with per-atom gathered network weights (small systems) or the model's
per-element networks, and contracts dE/dG with the pair and angular item slopes for all members
at once (or only their mean, ``member_forces=False``); no autograd. The arithmetic is in
``lmlp.calculator_kernels``: a small molecule's whole step is one compiled call (``backend``).
Pairs beyond the cutoffs contribute exactly zero (the cutoff functions), so the results equal
``HDNNPEnsemble.forward``. Evaluated in blocks (larger systems), far pairs also skip the narrow radial
shells, whose terms stay below 2·10⁻³⁵ at their distances while the list holds (``_band_pairs``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from lmlp.descriptors.eeacsf import find_angular_items
from lmlp.descriptors.neighbors import find_neighbors
from lmlp.descriptors.terms import TermParameters, radial, radial_reach
from lmlp.elements import symbol
from lmlp.errors import LmlpError
from lmlp import calculator_kernels as kernels
from lmlp import memory
from lmlp.model import ACTIVATION_CODES, HDNNPEnsemble

ENERGY_FACTOR = 2.0
"""Default energy threshold: the ensemble energy standard deviation per atom above this × the mean
member validation RMSE of the energy per atom (of the model file; test RMSE for files without)."""
FORCE_FACTOR = 5.0
"""Default force threshold: the largest force-component standard deviation above this × the mean
member validation RMSE of the force components (of the model file; test RMSE for files without).

On the test structures of the two SN2 models trained here (10 members 25-25, 4 members 16-16),
99 % have ratios below 1.8 (energy) and 3.6 (forces), 99.9 % below 2.4 and 4.4–7.3: in-distribution
structures are seldom flagged by the defaults."""
SKIN = 1.0
"""Verlet-list skin, Å."""
BLOCK_FLOATS = 1 << 22
"""Largest per-block temporary (floats) of the member contraction over pairs or angular items."""
GATHER_FLOATS = 1 << 22
"""Per-atom copies of the network weights up to this many floats (else per-element networks)."""

class UnknownElementError(LmlpError, ValueError):
    """The structure has elements the model was not trained on."""


class TooCloseWarning(UserWarning):
    """Two atoms are closer than any pair of the training data: the prediction extrapolates."""


@dataclass(frozen=True)
class UncertaintyThresholds:
    """When a structure counts as uncertain (active learning).

    Attributes:
        energy_per_atom: threshold of the ensemble energy standard deviation divided by the number
            of atoms, eV/atom (the validation RMSE it derives from is per atom too).
        forces: threshold of the largest standard deviation of a force component, eV/Å.
    """

    energy_per_atom: float
    forces: float

    @classmethod
    def from_metadata(
        cls, metadata: dict[str, Any], energy_factor: float = ENERGY_FACTOR, force_factor: float = FORCE_FACTOR
    ) -> UncertaintyThresholds | None:
        """Factors × the mean member validation RMSEs of a model file (meV/atom, meV/Å; test RMSEs
        for model files from before the validation split); None without them."""
        split = "validation" if metadata.get("validation_rmse_e") else "test"
        rmse_e, rmse_f = metadata.get(f"{split}_rmse_e"), metadata.get(f"{split}_rmse_f")
        if not rmse_e or not rmse_f:
            return None
        return cls(energy_factor * float(np.mean(rmse_e)) / 1000.0, force_factor * float(np.mean(rmse_f)) / 1000.0)

    def exceeded(self, results: dict[str, Any], n_atoms: int) -> bool:
        """Whether calculator ``results`` of a structure of ``n_atoms`` atoms exceed a threshold (the
        force threshold only where the results have ``forces_uncertainty``)."""
        return (results["energy_uncertainty"] / n_atoms > self.energy_per_atom
                or max_force_uncertainty(results) > self.forces)


def max_force_uncertainty(results: dict[str, Any]) -> float:
    """The largest force-component standard deviation of calculator ``results``, eV/Å; 0 without
    member forces (``LMLPCalculator(member_forces=False)``)."""
    return float(np.max(results.get("forces_uncertainty", 0.0), initial=0.0))


@dataclass
class _Neighbours:
    """A Verlet list: pairs within cutoff + skin and their angular items (``find_angular_items``
    within the angular cutoff + skin), grouped by element classes.

    G5 functions with integer ζ are sums over pairs by moments (``lmlp.descriptors.moments``) where
    that is cheaper than over triples (``LMLPCalculator._moments_pay_off``): in condensed phases,
    not for a few-atom molecule, whose few triples cost less than the per-atom contraction of the
    moments. G4 and non-integer ζ always take triples. Both give the same values (to round-off).

    The descriptor of atom i sums pair terms weighted by w(Z_j) and triple terms weighted by
    W(Z_j, Z_k). With the nz elements of the structure, pair terms are first summed per
    (element of j, centre) "slot"; the angular items' terms per (element of j, centre) slot too
    (moments M, ``lmlp.descriptors.moments``, which are then contracted with the nz² weight vectors)
    or, for triples, per (element of j, element of k, centre) slot (then one matmul with the nz²
    weight vectors). The same slots carry dE/dG back to the pairs and items. Slots are element-major.

    Attributes:
        key: numbers and pbc it was built for. reference: (N, 3) positions at the build, Å.
        cell: (3, 3) cell vectors (rows) at the build, Å. lattice_shifts: (P, 3) float64 image shifts
            in cell vectors (integers).
        i, j: (P,) centre and neighbour. shifts: (P, 3) float64 image shifts in the current cell, Å.
        current_cell: (3, 3) the cell of ``shifts``, Å.
        pair_slot: (P,) (element of j)·N + i. terms: the term parameters, by moments or over triples.
        items: (1, Q) angular pairs (moments) or (2, Q) the two pairs of each triple.
        angular_slot: (Q,) (element of j)·N + i, or (nz·(element of j) + element of k)·N + i.
        pair_weights: (nz, T). angular_weights: (nz², U). n_elements: nz.
        pair_blocks, angular_blocks: slices of pairs and angular items evaluated together.
        pair_layouts, angular_layouts: each block's ``kernels.chunk_layout`` (pairs are ordered by
            slot, so a block's pairs fill few chunks).
        pair_columns: each pair block's first radial term, in the calculator's reach order
            (``LMLPCalculator._band_pairs``; 0: all terms).
    """

    key: tuple
    reference: np.ndarray
    cell: np.ndarray
    lattice_shifts: torch.Tensor
    i: torch.Tensor
    j: torch.Tensor
    shifts: torch.Tensor
    current_cell: np.ndarray
    pair_slot: torch.Tensor
    terms: TermParameters
    items: torch.Tensor
    angular_slot: torch.Tensor
    pair_weights: torch.Tensor
    angular_weights: torch.Tensor
    n_elements: int
    pair_blocks: list[slice]
    angular_blocks: list[slice]
    pair_layouts: list[kernels.Layout | None]
    angular_layouts: list[kernels.Layout | None]
    pair_columns: list[int]


class _Networks:
    """Atomic energies and dE/dG of every member for a fixed list of atomic numbers.

    Small systems use per-atom copies of the weights: each layer is one batched matmul for all
    atoms and members (batched over atoms in the first layer, over atoms and members after it),
    and the backward pass is written out. Larger systems (copies above ``GATHER_FLOATS``) use the
    model's per-element networks. Per-atom copies beat padding atoms per element: a batched
    matmul costs about a microsecond per batch entry, and the first layer has only N entries.
    """

    def __init__(self, model: HDNNPEnsemble, numbers: torch.Tensor) -> None:
        self.members = model.members
        self.mean = model.standardizer.mean
        self.inv_std = 1.0 / model.standardizer.std
        self.activation = ACTIVATION_CODES[model.networks[0].activation]
        element = model.element_index(numbers)
        network = model.networks[0]
        per_member = sum(w[0].numel() + b[0].numel() for w, b in zip(network.weights, network.biases))
        self.gathered = 2 * len(numbers) * model.members * per_member <= GATHER_FLOATS
        if self.gathered:
            self._gather(model, element)
        else:
            self.groups = [(model.networks[e], torch.nonzero(element == e).flatten())
                           for e in element.unique().tolist()]

    def _gather(self, model: HDNNPEnsemble, element: torch.Tensor) -> None:
        """Per-atom weights: ``weights[0]`` (N, n_in, M·n_out), ``weights[k]`` (N·M, n_in, n_out) after
        it, biases alike; ``transposed[k]`` (N·M, n_out, n_in), the first one scaled by 1/std."""
        n, m = len(element), self.members
        layers = zip(*(zip(net.weights, net.biases) for net in model.networks))
        self.weights, self.transposed, self.biases = [], [], []
        for k, layer in enumerate(layers):
            w = torch.stack([w.detach() for w, _ in layer])[element]  # (N, M, n_in, n_out)
            b = torch.stack([b.detach() for _, b in layer])[element]  # (N, M, n_out)
            t = (w * self.inv_std[:, None] if k == 0 else w).transpose(2, 3)
            self.transposed.append(t.reshape(n * m, w.shape[3], w.shape[2]))
            if k == 0:
                self.weights.append(w.permute(0, 2, 1, 3).reshape(n, w.shape[2], m * w.shape[3]))
                self.biases.append(b.reshape(n, 1, -1))
            else:
                self.weights.append(w.reshape(n * m, w.shape[2], w.shape[3]))
                self.biases.append(b.reshape(n * m, 1, -1))

    def __call__(self, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (N, M) eV and dE/dG (N, M, F) from descriptors G (N, F)."""
        if self.gathered:
            return kernels.gathered_networks(G, self.mean, self.inv_std, self.weights, self.biases, self.transposed,
                                             self.activation, self.members)
        return self._per_element((G - self.mean) * self.inv_std)

    def _per_element(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        atomic = x.new_empty(len(x), self.members)
        dE_dG = x.new_empty(len(x), self.members, x.shape[1])
        for network, atoms in self.groups:
            energy, grad = network.with_input_gradient(x[atoms], self.inv_std)
            atomic[atoms] = energy.T
            dE_dG[atoms] = grad.transpose(0, 1)
        return atomic, dE_dG


class LMLPCalculator(Calculator):
    """ASE calculator of an lMLP ensemble: ensemble-mean energy (eV) and forces (eV/Å).

    Args:
        model: a model file (``model.pt``) or an ``HDNNPEnsemble``.
        dtype: precision of descriptors and networks (default: the model's); float64 for tight
            energy conservation. Pair vectors and energy sums are always float64.
        min_distance: closest interatomic distance (Å) of the training data; closer pairs warn
            (``TooCloseWarning``, once per calculator) and are counted in ``too_close_count``.
            Default: ``metadata["min_pair_distance"]`` of the model file; None disables the check.
        uncertainty_thresholds: when a structure counts as uncertain (see ``is_uncertain``);
            default: ``UncertaintyThresholds.from_metadata`` of the model file.
        metadata: the model-file metadata when ``model`` is an ``HDNNPEnsemble``.
        skin: Verlet-list skin, Å.
        backend: how a small system's whole step runs (``calculator_kernels.KERNEL_BACKENDS``):
            "script" (TorchScript, default), "compile" (``torch.compile``: fastest after a
            compilation of tens of seconds on first use) or "eager".
        member_forces: compute every member's forces (and stress), for ``forces_uncertainty``
            (default). False computes only the ensemble-mean forces and stress, from the members'
            mean dE/dG: the same numbers to round-off, 1.4–1.7× faster for condensed systems (the
            contraction with the slopes is done once instead of M times); energies, their
            uncertainty and the energy criterion of ``is_uncertain`` stay.

    The network weights are copied (per atom, for speed) when a composition is first seen: build a
    new calculator after changing the model's weights. Creating a calculator sets the C allocator
    to keep freed memory for reuse (``lmlp.memory``; the radial terms of a dense 100-atom system
    took up to 4× longer while its temporaries were faulted in anew each call).

    Besides ``energy``, ``free_energy`` (equal), ``forces`` and, for periodic cells, ``stress``
    (ASE's Voigt order xx, yy, zz, yz, xz, xy; eV/Å³; (1/V) ∂E/∂ε, the strain derivative at fixed
    scaled positions; computed from the first time it is asked for on, a tenth of a step for a
    dense liquid), ``results`` holds:

    - ``energies``: (M,) member energies, eV;
    - ``energy_uncertainty``: ensemble standard deviation (ddof = 1) of the energy, eV (0 for a
      single-member model);
    - with ``member_forces`` (the default): ``forces_members``: (M, N, 3) member forces, eV/Å;
      ``forces_uncertainty``: (N, 3) standard deviation (ddof = 1) of each force component, eV/Å;
      ``stress_members``: (M, 6) member stresses, eV/Å³ (with ``stress``);
    - ``closest_distance``: the smallest interatomic distance within cutoff + skin, Å (else inf).

    Raises ``UnknownElementError`` (one line) for elements the model does not know.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        model: str | os.PathLike | HDNNPEnsemble,
        dtype: torch.dtype | None = None,
        min_distance: float | None = None,
        uncertainty_thresholds: UncertaintyThresholds | None = None,
        metadata: dict[str, Any] | None = None,
        skin: float = SKIN,
        backend: str = "script",
        member_forces: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, HDNNPEnsemble):
            from lmlp.modelfile import load_model

            model, metadata = load_model(model)
        self.metadata = metadata or {}
        model_dtype = next(model.parameters()).dtype
        self.dtype = dtype or model_dtype
        self.model = copy.deepcopy(model).to(self.dtype) if self.dtype != model_dtype else model
        self.min_distance = min_distance if min_distance is not None else self.metadata.get("min_pair_distance")
        self.uncertainty_thresholds = uncertainty_thresholds or UncertaintyThresholds.from_metadata(self.metadata)
        self.skin = skin
        self.member_forces = member_forces
        memory.keep_freed_memory()
        self._small_system = kernels.compiled_small_system(backend)
        self.too_close_count = 0
        """Calculations in which two atoms were closer than ``min_distance``."""
        self.n_calculations = 0
        self._neighbours: _Neighbours | None = None
        self._networks: _Networks | None = None
        self._stress_wanted = False
        """Once stress has been asked for, every calculation computes it (NPT asks for forces first)."""
        self._baseline = 0.0
        self._terms = self.model.descriptor.terms(self.dtype)
        self._n_radial = len(self._terms.radial_eta)
        reach = radial_reach(*(p.to(torch.float64) for p in (self._terms.radial_eta, self._terms.radial_rs)))
        order = torch.argsort(reach, stable=True)
        self._radial_reach = reach[order]
        """The radial terms' ``radial_reach`` (K,), Å, ascending: the order of the blocked path's columns."""
        self._band_terms = (self._terms.radial_eta[order], self._terms.radial_rs[order])
        self._radial_order = None if torch.equal(order, torch.arange(len(order))) else order
        """The terms of the blocked path's columns (None: the descriptor's order)."""
        self._radial_inverse = torch.argsort(order)

    @property
    def members(self) -> int:
        return self.model.members

    @property
    def _contracted(self) -> int:
        """Members whose forces are computed: M, or 1 (the ensemble mean) without ``member_forces``."""
        return self.members if self.member_forces else 1

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        with torch.inference_mode():
            self._stress_wanted |= "stress" in (properties or ())
            energies, forces, closest, virials = self._evaluate(self.atoms, self._stress_wanted)
            energy_std, energy = _spread_mean(energies)
            forces_std, forces_mean = _spread_mean(forces)
        self.n_calculations += 1
        self._check_distance(closest)
        self.results = {
            "energy": energy.item(),
            "free_energy": energy.item(),
            "forces": forces_mean.numpy(),
            "energies": energies.numpy(),
            "energy_uncertainty": energy_std.item(),
            "closest_distance": closest,
        }
        if self.member_forces:
            self.results.update(forces_members=forces.numpy(), forces_uncertainty=forces_std.numpy())
        if virials is not None:
            stresses = full_3x3_to_voigt_6_stress(virials.numpy() / self.atoms.cell.volume)
            self.results["stress"] = stresses.mean(0)
            if self.member_forces:
                self.results["stress_members"] = stresses

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """What changed since the last calculation among what the lMLP depends on: positions,
        numbers, cell and pbc (charges and magnetic moments do not enter it).

        Compared exactly (any difference counts; ``tol`` is unused): ASE's ``np.allclose``
        comparison of every array cost more than a tenth of a small-molecule MD step.
        """
        if self.atoms is None:
            return list(all_changes)
        old = self.atoms
        return [name for name, a, b in (
            ("positions", old.positions, atoms.positions), ("numbers", old.numbers, atoms.numbers),
            ("cell", old.cell.array, atoms.cell.array), ("pbc", old.pbc, atoms.pbc),
        ) if a.shape != b.shape or a.tobytes() != b.tobytes()]

    def is_uncertain(self, atoms: Atoms | None = None) -> bool:
        """Whether the current results exceed ``uncertainty_thresholds`` (False without thresholds)."""
        if atoms is not None:
            self.get_property("energy", atoms)
        thresholds = self.uncertainty_thresholds
        return thresholds is not None and thresholds.exceeded(self.results, len(self.atoms))

    def summary(self) -> str:
        """One line: calculations, and how often atoms came closer than the training data."""
        if self.min_distance is None:
            close = "closest-pair check off (no training minimum distance known)"
        else:
            close = (f"{self.too_close_count} with atoms closer than the training minimum "
                     f"{self.min_distance:.3f} Å")
        return f"{self.n_calculations} calculations; {close}"

    def _check_distance(self, closest: float) -> None:
        if self.min_distance is None or closest >= self.min_distance:
            return
        self.too_close_count += 1
        if self.too_close_count == 1:
            warnings.warn(f"atoms {closest:.3f} Å apart, closer than any pair of the training data "
                          f"({self.min_distance:.3f} Å): the lMLP extrapolates (counted in too_close_count; "
                          f"further cases are not warned about)", TooCloseWarning, stacklevel=2)

    def _evaluate(self, atoms: Atoms, stress: bool) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """Member energies (M,) eV, forces (M', N, 3) eV/Å (float64; M' = M members, or 1, the ensemble
        mean, without ``member_forces``), the closest distance, Å, and if ``stress``, for periodic
        cells, the virials (M', 3, 3) eV, W_ab = Σ_p (∂E/∂v_p)_a v_pb (else None)."""
        positions = torch.from_numpy(atoms.positions)
        nb = self._update_neighbours(atoms)
        networks = self._networks
        stress = stress and bool(atoms.pbc.any()) and atoms.cell.volume > 0
        if networks.gathered and len(nb.pair_blocks) <= 1 and len(nb.angular_blocks) <= 1:
            t = nb.terms
            atomic, forces, r, gradient = self._small_system(
                positions, nb.i, nb.j, nb.shifts, nb.pair_slot, nb.items, nb.angular_slot, nb.pair_weights,
                nb.angular_weights, t.radial_eta, t.radial_rs, t.angular_eta, t.angular_lambda, t.angular_zeta,
                t.norm, t.slope_norm, t.monomial_index, t.monomial_exponents, t.moment_coefficients, t.cutoff,
                t.angular_cutoff, t.cutoff_function, t.g4, t.moments, networks.mean, networks.inv_std,
                networks.weights, networks.biases, networks.transposed, networks.activation, self.members,
                nb.pair_layouts[0] if nb.pair_layouts else None,
                nb.angular_layouts[0] if nb.angular_layouts else None, not self.member_forces)
            virials = kernels.pair_virials(gradient, positions[nb.j] - positions[nb.i] + nb.shifts) if stress else None
        else:
            atomic, forces, r, virials = self._blocked(nb, positions, stress)
        closest = float(r.min()) if r.shape[0] else math.inf
        energies = atomic.to(torch.float64).sum(0) + self._baseline
        return energies, forces.transpose(0, 1).to(torch.float64), closest, virials

    def _blocked(
        self, nb: _Neighbours, positions: torch.Tensor, stress: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``kernels.small_system`` for larger systems: pairs and angular items in blocks (slopes
        kept while all of them fit in one block's budget, else recomputed for the gradients),
        per-element networks when per-atom copies of the weights would be too large. Returns atomic
        energies (N, M), forces (N, M', 3), distances (P,) and, if ``stress``, virials (M', 3, 3)."""
        n, t = len(positions), nb.terms
        vectors = positions.index_select(0, nb.j) - positions.index_select(0, nb.i) + nb.shifts
        pairs = t.pair_data(vectors.to(self.dtype))
        nb = self._angular_now(nb, pairs[:, 3])
        columns = self._radial_columns(nb, pairs[:, 3])
        radial_sums = pairs.new_zeros(nb.n_elements * n, self._n_radial)
        evaluated = sum((b.stop - b.start) * (self._n_radial - c) for b, c in zip(nb.pair_blocks, columns))
        keep_radial = len(nb.pair_blocks) <= 1 or evaluated <= BLOCK_FLOATS
        keep_angular = len(nb.angular_blocks) <= 1 or nb.items.shape[1] * 3 * _item_width(t) <= BLOCK_FLOATS
        radial_slopes = []
        for block, first in zip(nb.pair_blocks, columns):
            if first == self._n_radial:
                radial_slopes.append(None)
                continue
            values, slopes = self._radial_block(pairs[block], first, keep_radial)
            radial_sums[:, first:].index_add_(0, nb.pair_slot[block], values)
            radial_slopes.append(slopes)
        if self._radial_order is not None:
            radial_sums = radial_sums.index_select(1, self._radial_inverse)
        angular_kinds = nb.n_elements if t.moments else nb.n_elements**2
        angular_sums = pairs.new_zeros(angular_kinds * n, _item_width(t))
        angular_slopes = []
        for block in nb.angular_blocks:
            values, slopes = t.angular_items(pairs, nb.items[:, block], keep_angular)
            angular_sums.index_add_(0, nb.angular_slot[block], values)
            angular_slopes.append(slopes)
        G_angular, jacobian = kernels.angular_descriptors(angular_sums, nb.angular_weights, t.moment_coefficients, n,
                                                          t.moments)
        G = torch.cat([kernels.weighted_slots(radial_sums, nb.pair_weights, n), G_angular], 1)
        atomic, dE_dG = self._networks(G)
        if not self.member_forces:
            dE_dG = kernels.mean_gradient(dE_dG)
        sums = pairs.new_zeros(2, n, self._contracted, 3)
        virials = torch.zeros(self._contracted, 3, 3, dtype=torch.float64) if stress else None
        for pair, gradient in self._pair_gradients(nb, pairs, dE_dG, jacobian, columns, radial_slopes,
                                                   angular_slopes):
            kernels.add_pair_gradients(sums, gradient, nb.i[pair], nb.j[pair])
            if virials is not None:
                virials += kernels.pair_virials(gradient, vectors[pair])
        return atomic, sums[0] - sums[1], pairs[:, 3], virials

    def _radial_columns(self, nb: _Neighbours, distances: torch.Tensor) -> list[int]:
        """Each pair block's first radial term now (distances (P,) Å): ``nb.pair_columns``, or, for a
        block whose closest pair has come inside the reach of a term it skips (possible only after
        the cell has grown, ``_still_valid``), the first term whose reach exceeds that distance."""
        columns = []
        for block, first in zip(nb.pair_blocks, nb.pair_columns):
            if first:
                closest = distances[block].min().to(torch.float64)
                first = min(first, int(torch.searchsorted(self._radial_reach, closest, right=True)))
            columns.append(first)
        return columns

    def _radial_block(self, pairs: torch.Tensor, first: int, slopes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``terms.radial`` values and slopes (B, K − first) of the radial terms from ``first`` on,
        in reach order, of pairs with ``pair_data`` rows ``pairs``."""
        eta, r_s = self._band_terms
        return radial(pairs, eta[first:], r_s[first:], slopes)

    def _angular_now(self, nb: _Neighbours, distances: torch.Tensor) -> _Neighbours:
        """``nb`` with only the angular items whose pairs are now inside the angular cutoff (the
        others add exactly zero; at a 6 Å angular cutoff a 1 Å skin holds about 60 % more pairs)."""
        inside = distances < nb.terms.angular_cutoff
        active = torch.nonzero(inside[nb.items].all(0)).flatten()
        if len(active) == nb.items.shape[1]:
            return nb
        slot, blocks = nb.angular_slot[active], self._angular_blocks(len(active), nb.terms)
        return dataclasses.replace(nb, items=nb.items[:, active], angular_slot=slot, angular_blocks=blocks,
                                   angular_layouts=[kernels.chunk_layout(slot[b]) for b in blocks])

    def _update_neighbours(self, atoms: Atoms) -> _Neighbours:
        """The Verlet list, rebuilt for new numbers or pbc, or when ``_still_valid`` fails."""
        key = (atoms.numbers.tobytes(), atoms.pbc.tobytes())
        nb = self._neighbours
        if nb is not None and nb.key == key:
            valid = self._still_valid(nb, atoms)
            if valid is not None:
                self._neighbours = valid
                return valid
        if nb is None or nb.key[0] != key[0]:
            self._set_composition(atoms.numbers)
        self._neighbours = self._build_neighbours(atoms, key)
        return self._neighbours

    def _still_valid(self, nb: _Neighbours, atoms: Atoms) -> _Neighbours | None:
        """``nb`` (with image shifts in the current cell) if it still holds every pair within the
        cutoffs, else None.

        In a fixed cell that is so while no atom has moved more than skin/2. A cell periodic in all
        three directions may also deform (NPT): with M = C₀⁻¹C the deformation since the build,
        a pair vector v₀ of the build becomes v₀M plus the difference of two atoms' displacements
        d = R − R₀M, and |v₀M| ≥ σ_min(M)|v₀|; so no pair beyond the list comes inside the cutoff
        R_c while 2 max|d| ≤ σ_min(M)(R_c + skin) − R_c (skin/2 again for M = 1), and none beyond
        the angular items' list inside the angular cutoff while the same holds for it (the tighter
        of the two when the cell has grown).
        """
        cell = atoms.cell.array
        if np.array_equal(cell, nb.cell):
            mapped, allowed = nb.reference, self.skin
        elif atoms.pbc.all() and atoms.cell.volume > 0:
            deformation = np.linalg.solve(nb.cell, cell)
            smallest = np.linalg.svd(deformation, compute_uv=False).min()
            mapped = nb.reference @ deformation
            descriptor = self.model.descriptor
            allowed = min(smallest * (cutoff + self.skin) - cutoff
                          for cutoff in (descriptor.cutoff, descriptor.angular_cutoff))
        else:
            return None
        moved = np.max(np.sum((atoms.positions - mapped) ** 2, axis=1), initial=0.0)
        if allowed < 0 or 4 * moved > allowed**2:
            return None
        if np.array_equal(cell, nb.current_cell):
            return nb
        return dataclasses.replace(nb, shifts=nb.lattice_shifts @ torch.from_numpy(cell), current_cell=cell.copy())

    def _set_composition(self, numbers: np.ndarray) -> None:
        """Networks and the reference-energy baseline for new atomic numbers."""
        unknown = sorted(set(numbers.tolist()) - set(self.model.elements.tolist()))
        if unknown:
            known = ", ".join(symbol(int(z)) for z in self.model.elements)
            names = ", ".join(f"{symbol(z)} (Z = {z})" for z in unknown)
            raise UnknownElementError(f"the model knows only {known}; the structure has {names}")
        z = torch.from_numpy(numbers.astype(np.int64))
        self._networks = _Networks(self.model, z)
        self._baseline = self.model.reference_baseline(z, torch.tensor([0, len(numbers)]))[0].item()

    def _build_neighbours(self, atoms: Atoms, key: tuple) -> _Neighbours:
        periodic = bool(atoms.pbc.any())
        descriptor = self.model.descriptor
        nb = find_neighbors(
            torch.from_numpy(atoms.positions), torch.tensor([0, len(atoms)]), descriptor.cutoff + self.skin,
            torch.from_numpy(atoms.cell.array)[None] if periodic else None,
            torch.from_numpy(atoms.pbc)[None] if periodic else None,
        )
        elements, element = np.unique(atoms.numbers, return_inverse=True)
        nz, element = len(elements), torch.from_numpy(element.astype(np.int64))
        n = len(atoms)
        order = torch.argsort(element[nb.pairs[1]] * n + nb.pairs[0], stable=True)  # by slot
        i, j, shifts = nb.pairs[0, order], nb.pairs[1, order], nb.shifts[order].to(torch.float64)
        distances = nb.vectors(torch.from_numpy(atoms.positions)).norm(dim=1)[order]
        angular_cutoff = descriptor.angular_cutoff + self.skin
        moments = self._terms.moments and self._moments_pay_off(i[distances < angular_cutoff], n, nz)
        terms = self._terms if moments else dataclasses.replace(self._terms, moments=False)
        items = find_angular_items(torch.stack([i, j]), distances, angular_cutoff, n, moments)
        pair_blocks = self._blocks(len(i), (self._contracted + 3) * self._n_radial)
        angular_blocks = self._angular_blocks(items.shape[1], terms)
        pair_columns = [0] * len(pair_blocks)
        if not self._networks.gathered or len(pair_blocks) > 1 or len(angular_blocks) > 1:  # the blocked path
            order, pair_blocks, pair_columns = self._band_pairs(distances)
            i, j, shifts = i[order], j[order], shifts[order]
            items = torch.argsort(order)[items]
        z = torch.from_numpy(elements.astype(np.int64))
        pair_slot, angular_slot = kernels.element_slots(element[j], i, items, nz, n)
        return _Neighbours(
            key=key, reference=atoms.positions.copy(), cell=atoms.cell.array.copy(),
            lattice_shifts=self._lattice_shifts(shifts, atoms), i=i, j=j,
            shifts=shifts, current_cell=atoms.cell.array.copy(),
            pair_slot=pair_slot, terms=terms, items=items, angular_slot=angular_slot,
            pair_weights=descriptor.neighbor_weights[z].to(self.dtype),
            angular_weights=descriptor.pair_weights[z][:, z].reshape(nz**2, -1).to(self.dtype),
            n_elements=nz,
            pair_blocks=pair_blocks, angular_blocks=angular_blocks,
            pair_layouts=[kernels.chunk_layout(pair_slot[b]) for b in pair_blocks],
            angular_layouts=[kernels.chunk_layout(angular_slot[b]) for b in angular_blocks],
            pair_columns=pair_columns,
        )

    def _band_pairs(self, distances: torch.Tensor) -> tuple[torch.Tensor, list[slice], list[int]]:
        """The pairs (distances (P,) at the build, Å, ordered by slot) regrouped by the radial terms
        they need, for the blocked path: (the new order (P,), stable within a band so still by slot,
        the blocks, each block's first term (``_Neighbours``)).

        While the list holds in a fixed cell no pair comes closer than its build distance − skin,
        and a term is negligible beyond its ``radial_reach`` (at most 2·10⁻³⁵): so a pair needs the
        terms from the first whose reach exceeds that distance on. With a 12 Å cutoff most pairs are
        far and need only the medium and wide shells (6–14 of the 24 default terms);
        ``kernels.radial_bands`` groups them.
        """
        first = torch.searchsorted(self._radial_reach, distances - self.skin, right=True)
        band, starts = kernels.radial_bands(first, self._n_radial)
        order = torch.argsort(band, stable=True)
        blocks, columns, offset = [], [], 0
        for start, count in zip(starts, torch.bincount(band, minlength=len(starts)).tolist()):
            width = (self._contracted + 3) * max(self._n_radial - start, 1)
            for block in self._blocks(count, width):
                blocks.append(slice(offset + block.start, offset + block.stop))
                columns.append(start)
            offset += count
        return order, blocks, columns

    @staticmethod
    def _lattice_shifts(shifts: torch.Tensor, atoms: Atoms) -> torch.Tensor:
        """(P, 3) image shifts in cell vectors (integers, float64) of Cartesian ``shifts`` (P, 3) Å;
        zeros unless the cell is periodic in all three directions (only such cells deform in place)."""
        if not atoms.pbc.all() or atoms.cell.volume <= 0:
            return torch.zeros_like(shifts)
        return torch.round(shifts @ torch.from_numpy(np.linalg.inv(atoms.cell.array)))

    def _moments_pay_off(self, centres: torch.Tensor, n_atoms: int, n_elements: int) -> bool:
        """Whether the angular functions cost less by moments than over triples, for the centres (Q,)
        of the pairs within the angular cutoff + skin: the moments' contraction per atom, E·U·L·nz·K
        (M + 2) multiply-adds (M members whose forces are computed, 1 for mean forces; per pair they
        cost little more than a radial term), against
        E·L (4M + 30) per triple (its terms and their member contraction). Measured on one core
        (default SN2 descriptor, 10 members), this picks the faster path from a 5-atom molecule to
        molecular clusters (moments faster from ~20 atoms) and dilute gases (triples faster)."""
        m, n_columns = self._contracted, self._terms.moment_coefficients.shape[1]
        n_weights = self.model.descriptor.pair_weights.shape[2]
        counts = torch.bincount(centres, minlength=n_atoms)
        triples = int((counts * (counts - 1)).sum()) // 2
        return n_weights * n_columns * n_elements * (m + 2) * n_atoms < (4 * m + 30) * triples

    def _angular_blocks(self, n: int, terms: TermParameters) -> list[slice]:
        """``_blocks`` of ``n`` angular items with the term parameters ``terms``."""
        return self._blocks(n, (self._contracted + 6) * _item_width(terms))

    def _blocks(self, n: int, width: int) -> list[slice]:
        """Slices of ``n`` pairs or angular items with at most ``BLOCK_FLOATS`` temporaries (``width`` per item)."""
        size = max(1, BLOCK_FLOATS // width)
        return [slice(a, min(a + size, n)) for a in range(0, n, size)]

    def _pair_gradients(
        self, nb: _Neighbours, pairs: torch.Tensor, dE_dG: torch.Tensor, jacobian: torch.Tensor, columns: list[int],
        radial_slopes: list[torch.Tensor | None], angular_slopes: list[torch.Tensor | None],
    ) -> Iterator[tuple[slice | torch.Tensor, torch.Tensor]]:
        """dE_m/dv_p of every member m (or of their mean: dE_dG (N, 1, F)) and pair vector v_p, eV/Å,
        block by block with the slopes of each block (recomputed where None) from its first radial term
        (``columns``, ``_radial_columns``): (pairs, gradients
        (B, M, 3)) for each radial block and each angular block's pairs, so that no (P, M, 3) array
        is held (large systems stay in cache).

        dE/dG is first taken to the element slots (one matmul per kind, through the angular Jacobian
        of ``kernels.angular_descriptors``), then contracted with the slopes of the pairs and angular
        items (``kernels.contract_slots``).
        """
        t = nb.terms
        n_radial = nb.pair_weights.shape[1] * self._n_radial
        radial_slots = kernels.slot_gradients(dE_dG[:, :, :n_radial], nb.pair_weights, self._n_radial)
        if self._radial_order is not None:
            radial_slots = radial_slots.index_select(2, self._radial_order)
        angular_slots = kernels.angular_slot_gradients(dE_dG[:, :, n_radial:], jacobian, t.moments)
        units = pairs[:, 0:3]
        for block, first, layout, slopes in zip(nb.pair_blocks, columns, nb.pair_layouts, radial_slopes):
            if first == self._n_radial:
                continue
            if slopes is None:
                slopes = self._radial_block(pairs[block], first, True)[1]
            yield block, kernels.radial_gradient(radial_slots[:, :, first:], nb.pair_slot[block], slopes,
                                                 units[block], layout)
        for block, layout, slopes in zip(nb.angular_blocks, nb.angular_layouts, angular_slopes):
            items = nb.items[:, block]
            if slopes is None:
                slopes = t.angular_items(pairs, items, True)[1]
            yield from kernels.angular_pair_gradients(angular_slots, nb.angular_slot[block], slopes, items, units,
                                                      t.moments, layout)


def _spread_mean(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard deviation (ddof = 1; 0 for one row) and mean over the members, dim 0."""
    return torch.std_mean(values, dim=0, correction=1 if values.shape[0] > 1 else 0)


def _item_width(terms: TermParameters) -> int:
    """Terms per angular item: the E·K moment terms of a pair or the E·L angular terms of a triple."""
    per_eta = terms.moment_coefficients.shape[1] if terms.moments else len(terms.angular_lambda)
    return len(terms.angular_eta) * per_eta
