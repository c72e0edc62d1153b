"""High-dimensional neural network potential ensembles (spec §2, §3).

E_m(structure) = Σ_i NN_{m, Z_i}(G_i) + Σ_i E_ref(Z_i) for every ensemble member m. The M members
are stacked: each element's network holds weights of shape (M, n_in, n_out), so all members are
evaluated by one batched matmul per layer. Energies in eV, forces in eV/Å, positions in Å.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lmlp.descriptors import CentreDerivatives, Derivatives, Standardizer, SymmetryFunctions

SCALED_TANH = 1.59223
"""1.59223·tanh(x) has output variance ≈ 1 for unit-normal input (spec §2)."""

ACTIVATIONS = {
    "scaled_tanh": lambda x: SCALED_TANH * torch.tanh(x),
    "tanh": torch.tanh,
    "silu": torch.nn.functional.silu,
    "softplus": torch.nn.functional.softplus,
}


class StackedMLP(torch.nn.Module):
    """M independent feed-forward networks of one shape, stored as stacked tensors.

    Args:
        members: M.
        sizes: layer widths, input first, 1 last, e.g. [100, 25, 25, 1].
        activation: a key of ``ACTIVATIONS`` (hidden layers; the output is linear).
        seeds: (M,) one initialisation seed per member.
    """

    def __init__(self, members: int, sizes: list[int], activation: str, seeds: list[int]) -> None:
        super().__init__()
        self.activation = activation
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            self.weights.append(torch.nn.Parameter(torch.empty(members, n_in, n_out, dtype=torch.float64)))
            self.biases.append(torch.nn.Parameter(torch.zeros(members, n_out, dtype=torch.float64)))
        for m, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(int(seed))
            for w in self.weights:
                w.data[m] = torch.randn(w.shape[1:], generator=generator, dtype=torch.float64) / math.sqrt(w.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, n_in) shared by all members, or (M, n, n_in). Returns (M, n)."""
        act = ACTIVATIONS[self.activation]
        h = x
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.matmul(h, w) + b[:, None, :]
            if k < len(self.weights) - 1:
                h = act(h)
        return h[..., 0]


class HDNNPEnsemble(torch.nn.Module):
    """An ensemble of M HDNNPs over a shared descriptor.

    Args:
        descriptor: the symmetry functions.
        standardizer: descriptor mean and std of the training set.
        elements: atomic numbers the model knows, sorted.
        reference_energies: (n_elements,) E_ref per element, eV.
        hidden: hidden-layer widths.
        activation: hidden activation (``ACTIVATIONS``).
        members: M.
        seed: member m is initialised with seed ``seed + m``.
    """

    def __init__(
        self,
        descriptor: SymmetryFunctions,
        standardizer: Standardizer,
        elements: list[int],
        reference_energies: torch.Tensor,
        hidden: list[int],
        activation: str = "scaled_tanh",
        members: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.standardizer = standardizer
        self.register_buffer("elements", torch.tensor(sorted(elements), dtype=torch.int64))
        # Fixed point (µeV, int64) so that casting the model to float32 keeps E_ref exact to 1 µeV.
        micro_ev = torch.round(reference_energies.detach().to(torch.float64) * 1e6).to(torch.int64)
        self.register_buffer("reference_energies_micro_ev", micro_ev)
        self.hyperparameters = dict(hidden=list(hidden), activation=activation, members=members, seed=seed)
        """The network constructor arguments, to rebuild the model from a model file."""
        sizes = [descriptor.n_functions, *hidden, 1]
        self.networks = torch.nn.ModuleList(
            StackedMLP(members, sizes, activation, [seed + m + 1000 * e for m in range(members)])
            for e in range(len(elements))
        )
        self.members = members

    @property
    def reference_energies(self) -> torch.Tensor:
        """(n_elements,) float64 E_ref per element, eV."""
        return self.reference_energies_micro_ev.to(torch.float64) * 1e-6

    def element_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """(N,) position of each atom's element in ``elements``; ValueError for unknown ones."""
        index = torch.searchsorted(self.elements, numbers)
        known = (index < len(self.elements)) & (self.elements[index.clamp(max=len(self.elements) - 1)] == numbers)
        if not bool(known.all()):
            unknown = sorted(set(numbers[~known].tolist()))
            raise ValueError(f"the model does not know the elements with Z = {unknown}")
        return index

    def atomic_energies(self, G: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """Network energies (M, N) in eV, reference energies excluded.

        G: raw descriptors (N, F) shared by all members, or (M, N, F) one copy per member.
        """
        x = self.standardizer(G)
        element = self.element_index(numbers)
        out = x.new_zeros(self.members, len(numbers))
        for e, network in enumerate(self.networks):
            atoms = torch.nonzero(element == e).flatten()
            if len(atoms):
                out[:, atoms] = network(x[..., atoms, :])
        return out

    def energies(self, atomic: torch.Tensor, numbers: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Structure energies (M, S) in eV, float64, from atomic network energies (M, N).

        The network part is summed in the model's dtype; the reference energies are added in float64,
        so absolute energies keep their precision with float32 networks.
        """
        network = atomic.new_zeros(self.members, len(offsets) - 1).index_add_(1, _structure_of_atom(offsets), atomic)
        return network.to(torch.float64) + self.reference_baseline(numbers, offsets)

    def reference_baseline(self, numbers: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """(S,) float64 Σ_i E_ref(Z_i) per structure, eV."""
        e_ref = self.reference_energies[self.element_index(numbers)]
        return torch.zeros(len(offsets) - 1, dtype=torch.float64).index_add_(0, _structure_of_atom(offsets), e_ref)

    def forward(
        self,
        numbers: torch.Tensor,
        positions: torch.Tensor,
        offsets: torch.Tensor,
        cells: torch.Tensor | None = None,
        pbc: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies (M, S) eV and forces (M, N, 3) eV/Å of every member (autograd through G)."""
        with torch.enable_grad():
            pos = positions.detach().requires_grad_(True)
            G = self.descriptor(numbers, pos, offsets, cells, pbc)
            energies = self.energies(self.atomic_energies(G, numbers), numbers, offsets)
            forces = -torch.stack([
                torch.autograd.grad(energies[m].sum(), pos, retain_graph=m < self.members - 1)[0]
                for m in range(self.members)
            ])
        return energies.detach(), forces

    def from_descriptors(
        self,
        G: torch.Tensor,
        derivatives: Derivatives | CentreDerivatives,
        numbers: torch.Tensor,
        offsets: torch.Tensor,
        create_graph: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies (M, S) eV and forces (M, N, 3) eV/Å from precomputed G (N, F) and sparse dG/dR.

        G is expanded to one copy per member, so one backward pass gives every member's dE/dG.
        With ``create_graph`` the forces stay differentiable in the weights (training).
        """
        with torch.enable_grad():
            per_member = G.detach().expand(self.members, -1, -1).requires_grad_(True)
            atomic = self.atomic_energies(per_member, numbers)
            (dE_dG,) = torch.autograd.grad(atomic.sum(), per_member, create_graph=create_graph)
        return self.energies(atomic, numbers, offsets), derivatives.forces(dE_dG, len(numbers))


def _structure_of_atom(offsets: torch.Tensor) -> torch.Tensor:
    """(N,) structure index of every atom from (S + 1,) atom offsets."""
    return torch.repeat_interleave(torch.arange(len(offsets) - 1, device=offsets.device), offsets[1:] - offsets[:-1])


def fit_reference_energies(
    numbers: np.ndarray, offsets: np.ndarray, energies: np.ndarray, elements: list[int]
) -> np.ndarray:
    """Per-element reference energies (n_elements,) eV: least squares of energies on composition.

    Collinear compositions (e.g. every SN2 structure has one C and three H) make the fit
    rank-deficient; the minimum-norm solution is returned, which reproduces the same totals.
    """
    structure = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    column = np.searchsorted(np.asarray(sorted(elements)), numbers)
    counts = np.zeros((len(offsets) - 1, len(elements)))
    np.add.at(counts, (structure, column), 1.0)
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return solution
