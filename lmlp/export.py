"""TorchScript export of a trained ensemble, for use outside Python (C++ libtorch, MD codes).

The exported file (``torch.jit.save``) holds one scripted module with every tensor it needs: the
symmetry-function parameters and element weight tables, the standardisation, the per-element
network weights of all M members and the reference energies. No lmlp is needed to run it.

Inputs, for ONE structure:

- ``numbers``: (N,) int64 atomic numbers.
- ``positions``: (N, 3) Å, any float dtype (cast to the model dtype).
- ``pairs`` (optional): (2, P) int64 directed neighbour pairs i → j, both directions listed.
- ``shifts`` (optional, with ``pairs``): (P, 3) Å Cartesian image shifts, the pair vector being
  R_j − R_i + shift; zero when omitted.

Without ``pairs`` every pair i ≠ j within the cutoff is used (a molecule, no periodic images,
O(N²)); with them only the given pairs closer than the cutoff (periodic systems: the host code's
neighbour list, with a cutoff of at least ``cutoff`` in the metadata).

Outputs: ``(energies, forces)``, energies (M,) float64 in eV per member, forces (M, N, 3) eV/Å in
the model dtype (float32 or float64). The ensemble prediction is the mean over members; their
spread is the uncertainty estimate.

The file also stores ``metadata.json`` (format, format_version, lmlp_version, units, elements,
cutoff, members, activation, dtype). Loading:

- Python: ``module = torch.jit.load(path)``; metadata:
  ``extra = {"metadata.json": ""}; torch.jit.load(path, _extra_files=extra)``, then
  ``json.loads(extra["metadata.json"])``.
- C++: ``torch::jit::ExtraFilesMap extra{{"metadata.json", ""}};
  auto module = torch::jit::load(path, torch::kCPU, extra);
  auto out = module.forward({numbers, positions}).toTuple();`` (append ``pairs, shifts`` for
  periodic systems); ``out->elements()[0]`` are the energies, ``[1]`` the forces.

Integrity: like every torch zip file, the export stores a CRC-32 per archive member, which
``torch.jit.load`` does not verify; ``unzip -t model.ts`` or ``zipfile.ZipFile(path).testzip()``
does (a SHA-256 in ``metadata.json`` could not cover the file that contains it).

Forces come from autograd: the module switches gradients on for its own computation (so a
``torch::NoGradGuard`` or ``torch.no_grad()`` around the call is fine) and back off before it
returns, but it cannot run under ``torch::InferenceMode`` / ``torch.inference_mode()``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import torch

import lmlp
from lmlp.descriptors.neighbors import find_triples
from lmlp.descriptors.terms import angular_terms, radial_terms
from lmlp.elements import MAX_Z
from lmlp.fileio import atomic_path
from lmlp.model import SCALED_TANH, HDNNPEnsemble, StackedMLP
from lmlp.modelfile import UNITS

FORMAT = "lmlp.torchscript"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
"""Name of the metadata entry among the TorchScript file's extra files."""


class _Dense(torch.nn.Module):
    """One stacked layer of M members: weight (M, n_in, n_out), bias (M, n_out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, n_in) or (M, n, n_in) → (M, n, n_out)."""
        return torch.matmul(x, self.weight) + self.bias[:, None, :]


class _ElementNetwork(torch.nn.Module):
    """The M networks of one element (a copy of a ``StackedMLP``)."""

    def __init__(self, network: StackedMLP) -> None:
        super().__init__()
        layers = [_Dense(w, b) for w, b in zip(network.weights, network.biases)]
        self.hidden = torch.nn.ModuleList(layers[:-1])
        self.output = layers[-1]
        self.activation = network.activation
        self.tanh_scale = SCALED_TANH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Atomic energies (M, n) in eV from standardised descriptors x (n, F)."""
        h = x
        for layer in self.hidden:
            h = self._activate(layer(h))
        return self.output(h)[..., 0]

    def _activate(self, z: torch.Tensor) -> torch.Tensor:
        """The hidden-layer activation f(z) of ``lmlp.model.ACTIVATIONS[self.activation]``."""
        if self.activation == "scaled_tanh":
            return self.tanh_scale * torch.tanh(z)
        elif self.activation == "tanh":
            return torch.tanh(z)
        elif self.activation == "silu":
            return z * torch.sigmoid(z)
        elif self.activation == "softplus":
            return torch.nn.functional.softplus(z)
        raise ValueError("unknown activation " + self.activation)


class ScriptablePotential(torch.nn.Module):
    """A self-contained copy of an ``HDNNPEnsemble`` that ``torch.jit.script`` compiles.

    Its dtype is that of the model's parameters; see the module docstring for inputs and outputs.
    """

    def __init__(self, model: HDNNPEnsemble) -> None:
        super().__init__()
        dtype = next(model.parameters()).dtype
        sf = model.descriptor
        elements = model.elements.detach().clone()
        table = torch.full((MAX_Z + 1,), -1, dtype=torch.int64)
        table[elements] = torch.arange(len(elements))
        self.register_buffer("elements", elements)
        self.register_buffer("element_table", table)
        self.register_buffer("reference_energies", model.reference_energies.clone())
        self.register_buffer("neighbor_weights", sf.neighbor_weights[elements].to(dtype))
        self.register_buffer("pair_weights", sf.pair_weights[elements][:, elements].to(dtype))
        for name in ("radial_eta", "radial_rs", "angular_eta", "angular_lambda", "angular_zeta"):
            self.register_buffer(name, getattr(sf, name).detach().to(dtype))
        self.register_buffer("mean", model.standardizer.mean.detach().to(dtype))
        self.register_buffer("std", model.standardizer.std.detach().to(dtype))
        self.networks = torch.nn.ModuleList(_ElementNetwork(n) for n in model.networks)
        self.cutoff = sf.cutoff
        self.g4 = sf.g4
        self.n_radial = sf.n_radial
        self.n_functions = sf.n_functions
        self.members = model.members

    def forward(
        self,
        numbers: torch.Tensor,
        positions: torch.Tensor,
        pairs: Optional[torch.Tensor] = None,
        shifts: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies (M,) float64 eV and forces (M, N, 3) eV/Å of one structure."""
        element = self._element_index(numbers)
        self._check_pairs(numbers.shape[0], pairs, shifts)
        grad_was_enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(True)  # TorchScript has no `with torch.enable_grad()`
        pos = positions.detach().to(self.mean.dtype).requires_grad_(True)
        x = (self._descriptors(element, pos, pairs, shifts) - self.mean) / self.std
        network = self._atomic_energies(x, element).sum(1)
        forces = torch.stack([self._minus_gradient(network[m], pos, m < self.members - 1)
                              for m in range(self.members)])
        torch.set_grad_enabled(grad_was_enabled)
        energies = network.detach().to(torch.float64) + self.reference_energies[element].sum()
        return energies, forces

    def _element_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """(N,) position of each atom's element in ``elements``; ValueError naming unknown Z."""
        max_z = self.element_table.shape[0] - 1
        inside = (numbers >= 0) & (numbers <= max_z)
        index = torch.where(inside, self.element_table[numbers.clamp(0, max_z)], -1)
        if bool((index < 0).any()):
            unknown: list[int] = torch.unique(numbers[index < 0]).tolist()
            raise ValueError("the model does not know the elements with Z = " + str(unknown))
        return index

    def _check_pairs(self, n: int, pairs: Optional[torch.Tensor], shifts: Optional[torch.Tensor]) -> None:
        """ValueError unless pairs are (2, P) atom indices < n and shifts (P, 3) or absent."""
        if pairs is None:
            if shifts is not None:
                raise ValueError("shifts need the pairs they belong to")
            return
        if pairs.dim() != 2 or pairs.shape[0] != 2 or (pairs.numel() > 0 and (pairs.min() < 0 or pairs.max() >= n)):
            raise ValueError("pairs must be (2, P) atom indices below " + str(n))
        if shifts is not None and (shifts.dim() != 2 or shifts.shape[0] != pairs.shape[1] or shifts.shape[1] != 3):
            raise ValueError("shifts must be (P, 3) with P = " + str(pairs.shape[1]))

    def _descriptors(
        self, element: torch.Tensor, pos: torch.Tensor, pairs: Optional[torch.Tensor], shifts: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Raw symmetry functions G (N, F), differentiable in ``pos`` (N, 3) Å."""
        n = pos.shape[0]
        if pairs is None:
            pairs = _all_pairs(n, pos.device)
        vectors = pos[pairs[1]] - pos[pairs[0]]
        if shifts is not None:
            vectors = vectors + shifts.to(pos.dtype)
        keep = torch.linalg.vector_norm(vectors.detach(), dim=1) < self.cutoff
        pairs, vectors = pairs[:, keep], vectors[keep]
        triples = find_triples(pairs, n)
        e_j = element[pairs[1]]
        wn = self.neighbor_weights[e_j]
        wp = self.pair_weights[e_j[triples[0]], e_j[triples[1]]]
        rad = radial_terms(vectors, self.radial_eta, self.radial_rs, self.cutoff)
        ang = angular_terms(vectors[triples[0]], vectors[triples[1]], self.angular_eta, self.angular_lambda,
                            self.angular_zeta, self.cutoff, self.g4)
        g_rad = pos.new_zeros(n, self.n_radial).index_add(0, pairs[0], (wn[:, :, None] * rad[:, None, :]).flatten(1))
        g_ang = pos.new_zeros(n, self.n_functions - self.n_radial).index_add(
            0, pairs[0, triples[0]], (wp[:, :, None, None] * ang[:, None]).flatten(1))
        return torch.cat([g_rad, g_ang], dim=1)

    def _atomic_energies(self, x: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
        """Network energies (M, N) eV from standardised descriptors x (N, F)."""
        out = x.new_zeros(self.members, x.shape[0])
        for e, network in enumerate(self.networks):
            atoms = torch.nonzero(element == e).flatten()
            if atoms.numel() > 0:
                out = out.index_copy(1, atoms, network(x[atoms]))
        return out

    def _minus_gradient(self, energy: torch.Tensor, pos: torch.Tensor, retain_graph: bool) -> torch.Tensor:
        """−∂energy/∂pos (N, 3) eV/Å."""
        grad = torch.autograd.grad([energy], [pos], retain_graph=retain_graph, allow_unused=True)[0]
        return -grad if grad is not None else torch.zeros_like(pos)


def _all_pairs(n: int, device: torch.device) -> torch.Tensor:
    """(2, N(N−1)) int64 every directed pair (i, j), i ≠ j, of N atoms."""
    index = torch.arange(n, device=device)
    i, j = index.repeat_interleave(n), index.repeat(n)
    keep = i != j
    return torch.stack([i[keep], j[keep]])


def metadata(model: HDNNPEnsemble) -> dict[str, Any]:
    """The metadata stored with an exported ``model`` (format, units, elements, cutoff, ...)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lmlp_version": lmlp.__version__,
        "units": UNITS,
        "elements": model.elements.tolist(),
        "cutoff": model.descriptor.cutoff,
        "members": model.members,
        "activation": model.hyperparameters["activation"],
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def export_model(model: HDNNPEnsemble, path: str | os.PathLike) -> None:
    """Write ``model`` as a TorchScript file with its metadata to ``path`` atomically."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        module = torch.jit.script(ScriptablePotential(model))
        with atomic_path(path) as tmp:
            torch.jit.save(module, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata(model))})
