"""High-dimensional neural network potential ensembles (docs/method.md: the HDNNP ensemble, uncertainty).

E_m(structure) = Σ_i NN_{m, Z_i}(G_i) + Σ_i E_ref(Z_i) for every ensemble member m. The M members
are stacked: each element's network holds weights of shape (M, n_in, n_out), so all members are
evaluated by one batched matmul per layer. Energies in eV, forces in eV/Å, positions in Å.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from lmlp.descriptors import CentreDerivatives, Standardizer, SymmetryFunctions

SCALED_TANH = 1.59223
"""1.59223·tanh(x) has output variance ≈ 1 for unit-normal input (docs/method.md: the HDNNP ensemble)."""



def _scaled_tanh(z: torch.Tensor, scale: float = SCALED_TANH) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tanh(z)
    return scale * t, torch.addcmul(torch.full_like(t, scale), t, t, value=-scale)


def _tanh(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tanh(z)
    return t, torch.addcmul(torch.ones_like(t), t, t, value=-1.0)


def _silu(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.sigmoid(z)
    return z * s, s * (1 + z * (1 - s))


def _softplus(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.nn.functional.softplus(z), torch.sigmoid(z)


ACTIVATIONS = {"scaled_tanh": _scaled_tanh, "tanh": _tanh, "silu": _silu, "softplus": _softplus}
"""Hidden-layer activations: z ↦ (f(z), f'(z))."""
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
"""Activation name → the integer ``activate`` takes (compiled code dispatches on integers)."""


def activate(z: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(z), f'(z)) of the activation ``ACTIVATION_CODES`` names ``code``; TorchScript-compatible."""
    if code == 0:
        return _scaled_tanh(z)
    if code == 1:
        return _tanh(z)
    if code == 2:
        return _silu(z)
    return _softplus(z)


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
                h = act(h)[0]
        return h[..., 0]

    def with_input_gradient(
        self, x: torch.Tensor, input_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs (M, n) and their gradient with respect to the input (M, n, n_in) for x (n, n_in).

        With ``input_scale`` (n_in,) the gradient is multiplied by it per input (the chain rule of
        an upstream scaling x = s·G, folded into the last product).

        The gradient is written out (backpropagation by hand), so it is an ordinary differentiable
        function of the weights: training on forces needs one backward pass, not a double one.
        The first layer is one matrix product for all members, (n, n_in) @ (n_in, M·n_out).
        """
        act = ACTIVATIONS[self.activation]
        members, n_in, _ = self.weights[0].shape
        last = len(self.weights) - 1
        h, slopes = x, []
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            if k == 0:
                z = (x @ w.permute(1, 0, 2).reshape(n_in, -1)).view(x.shape[0], members, -1).transpose(0, 1)
                z = z + b[:, None, :]
            else:
                z = torch.baddbmm(b[:, None, :], h, w)
            if k < last:
                h, slope = act(z)
                slopes.append(slope)
        grad = self.weights[-1][:, None, :, 0]  # ∂out/∂h of the last hidden layer (or of x), (M, 1, width)
        for k in range(last - 1, -1, -1):
            w = self.weights[k] if k or input_scale is None else self.weights[0] * input_scale[:, None]
            grad = torch.bmm(grad * slopes[k], w.transpose(1, 2))
        if last == 0 and input_scale is not None:
            grad = grad * input_scale
        return z[..., 0], grad.expand(members, x.shape[0], n_in)


class HDNNPEnsemble(torch.nn.Module):
    """An ensemble of M HDNNPs over a shared descriptor.

    Args:
        descriptor: the symmetry functions.
        standardizer: descriptor mean and std of the training set.
        elements: atomic numbers the model knows, in the order of its networks.
        reference_energies: (n_elements,) E_ref per element, eV.
        hidden: hidden-layer widths.
        activation: hidden activation (``ACTIVATIONS``).
        members: M.
        seed: member m of the network of element position e is initialised with seed
            ``seed + m + 1000 e``.
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
        self.register_buffer("elements", torch.tensor(list(elements), dtype=torch.int64))
        # Fixed point (µeV, int64) so that casting the model to float32 keeps E_ref exact to 1 µeV.
        micro_ev = torch.round(reference_energies.detach().to(torch.float64) * 1e6).to(torch.int64)
        self.register_buffer("reference_energies_micro_ev", micro_ev)
        self.hyperparameters = dict(hidden=list(hidden), activation=activation, members=members, seed=seed)
        """The network constructor arguments, to rebuild the model from a model file."""
        self.members = members
        self.networks = torch.nn.ModuleList(self._network(e) for e in range(len(elements)))

    def _network(self, position: int) -> StackedMLP:
        """A freshly initialised stacked network for the element at ``position``."""
        h = self.hyperparameters
        sizes = [self.descriptor.n_functions, *h["hidden"], 1]
        return StackedMLP(self.members, sizes, h["activation"],
                          [h["seed"] + m + 1000 * position for m in range(self.members)])

    def add_elements(self, elements: list[int], reference_energies: torch.Tensor) -> list[StackedMLP]:
        """Append freshly initialised networks for new ``elements`` with E_ref (eV); return them.

        Lifelong learning on data with new elements (docs/method.md: continual learning): the known networks are untouched.
        """
        if set(elements) & set(self.elements.tolist()) or len(set(elements)) != len(elements):
            raise ValueError(f"elements {elements} are already known or repeated")
        weight = next(self.parameters())
        new = [self._network(len(self.networks) + k).to(weight.device, weight.dtype) for k in range(len(elements))]
        self.networks.extend(new)
        self.elements = torch.cat([self.elements, torch.tensor(elements, dtype=torch.int64, device=self.elements.device)])
        micro_ev = torch.round(reference_energies.detach().to(torch.float64) * 1e6).to(torch.int64)
        self.reference_energies_micro_ev = torch.cat([self.reference_energies_micro_ev,
                                                      micro_ev.to(self.reference_energies_micro_ev.device)])
        return new

    def member_subset(self, part: slice) -> HDNNPEnsemble:
        """A copy holding only the members ``part`` (a process's share in distributed training;
        add elements to the whole ensemble, not to a share)."""
        subset = copy.deepcopy(self)
        with torch.no_grad():
            for param in subset.parameters():
                param.data = param.data[part].clone()
        subset.members = len(range(self.members)[part])
        subset.hyperparameters = {**self.hyperparameters, "members": subset.members}
        return subset

    @property
    def reference_energies(self) -> torch.Tensor:
        """(n_elements,) float64 E_ref per element, eV."""
        return self.reference_energies_micro_ev.to(torch.float64) * 1e-6

    def set_reference_energies(self, reference_energies: torch.Tensor) -> None:
        """Replace E_ref (n_elements,) eV, in the order of ``elements``."""
        if reference_energies.shape != self.reference_energies_micro_ev.shape:
            raise ValueError(f"{len(self.elements)} reference energies expected, got {tuple(reference_energies.shape)}")
        micro_ev = torch.round(reference_energies.detach().to(torch.float64) * 1e6).to(torch.int64)
        self.reference_energies_micro_ev = micro_ev.to(self.reference_energies_micro_ev.device)

    def element_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """(N,) position of each atom's element in ``elements``; ValueError for unknown ones."""
        size = max(int(self.elements.max()), int(numbers.max()) if len(numbers) else 0) + 1
        lookup = torch.full((size,), -1, dtype=torch.int64, device=numbers.device)
        lookup[self.elements] = torch.arange(len(self.elements), device=numbers.device)
        index = lookup[numbers.clamp(min=0)]
        known = (index >= 0) & (numbers >= 0)
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
        self, G: torch.Tensor, derivatives: CentreDerivatives, numbers: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies (M, S) eV and forces (M, N, 3) eV/Å from precomputed G (N, F) and dG/dR.

        dE/dG comes from the networks' written-out gradient, so with grad mode on the forces are
        differentiable in the weights (training) and under ``torch.no_grad`` nothing is recorded.
        """
        atomic, dE_dG = self.atomic_energies_and_gradients(G, numbers)
        return self.energies(atomic, numbers, offsets), derivatives.forces(dE_dG)

    def atomic_energies_and_gradients(self, G: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network energies (M, N) eV and their gradient dE/dG atom-major (N, M, F) for G (N, F).

        Each element's atoms go through their network at once; the standardisation is folded into
        the gradient (dE/dG = dE/dG' / std).
        """
        x = self.standardizer(G)
        element = self.element_index(numbers)
        inv_std = 1.0 / self.standardizer.std.to(G.dtype)
        atomic = x.new_zeros(self.members, len(numbers))
        dE_dG = x.new_zeros(len(numbers), self.members, x.shape[1])
        for e, network in enumerate(self.networks):
            atoms = torch.nonzero(element == e).flatten()
            if len(atoms):
                energy, grad = network.with_input_gradient(x[atoms], inv_std)
                atomic.index_copy_(1, atoms, energy)
                dE_dG.index_copy_(0, atoms, grad.transpose(0, 1))
        return atomic, dE_dG


def _structure_of_atom(offsets: torch.Tensor) -> torch.Tensor:
    """(N,) structure index of every atom from (S + 1,) atom offsets."""
    return torch.repeat_interleave(torch.arange(len(offsets) - 1, device=offsets.device), offsets[1:] - offsets[:-1])


def fit_reference_energies(
    numbers: np.ndarray,
    offsets: np.ndarray,
    energies: np.ndarray,
    elements: list[int],
    known: dict[int, float] | None = None,
) -> np.ndarray:
    """Reference energies (len(elements),) eV of ``elements`` (in that order): least squares of the
    structure energies on composition, after subtracting the ``known`` E_ref (eV) of other elements.

    Collinear compositions (e.g. every SN2 structure has one C and three H) make the fit
    rank-deficient; the minimum-norm solution is returned, which reproduces the same totals.
    """
    n_structures = len(offsets) - 1
    structure = np.repeat(np.arange(n_structures), np.diff(offsets))
    known_energy = np.zeros(len(numbers))
    for z, e_ref in (known or {}).items():
        known_energy[numbers == z] = e_ref
    residual = np.asarray(energies, dtype=np.float64) - np.bincount(structure, known_energy, n_structures)
    counts = np.zeros((n_structures, len(elements)))
    for k, z in enumerate(elements):
        counts[:, k] = np.bincount(structure, numbers == z, n_structures)
    solution, *_ = np.linalg.lstsq(counts, residual, rcond=None)
    return solution
