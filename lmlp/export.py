"""Export of a trained ensemble with ``torch.export``, for use outside lmlp (Python, C++, MD codes).

The exported program (a ``.pt2`` file, ``torch.export.save``) is a graph of the package's own
functions, traced, not copied: the terms and their analytic slopes (``lmlp.descriptors.terms``),
their assembly per element slot and the contraction of dE/dG with the slopes into pair gradients
(``lmlp.calculator_kernels``, as in the ASE calculator) and the networks' written-out backward
pass (``StackedMLP.with_input_gradient``). It holds every tensor it needs (term parameters, element
weights, standardisation, the networks of all M members, reference energies) and no autograd.

Inputs, for ONE structure, as an MD code supplies them (all sizes dynamic):

- ``numbers``: (N,) int64 atomic numbers.
- ``positions``: (N, 3) float64, Å.
- ``pairs``: (2, P) int64 directed neighbour pairs i → j, both directions listed.
- ``shifts``: (P, 3) float64 Cartesian image shifts, Å; the pair vector is R_j − R_i + shift.
- ``triples``, only for models whose angular functions are sums over triples (G4, or non-integer ζ;
  ``metadata["inputs"]`` lists the inputs): (2, Q) int64 indices into the pairs, every unordered two
  pairs (listed once) of one centre atom that are both shorter than ``angular_cutoff``. G5 functions
  with integer ζ are computed from the pairs alone, by moments (``lmlp.descriptors.moments``).

Pairs and triples beyond the cutoffs contribute exactly zero (the cutoff functions), so a host
list with a larger cutoff (a Verlet skin) is fine; a zero-length pair is not (1/r).

Outputs: ``(energies, forces, virials)``: member energies (M,) float64 eV (reference energies added
in float64), member forces (M, N, 3) eV/Å in the model dtype, member virials (M, 3, 3) float64 eV,
W_ab = Σ_p (∂E/∂v_p)_a v_pb = ∂E/∂ε_ab, the derivative with respect to a strain that maps every
pair vector v to (1 + ε) v (stress = W / volume; for periodic cells). The ensemble prediction is
the mean over members, their spread the uncertainty. The program cannot raise: an atomic number the
model does not know makes every output NaN (``load_exported``'s potential names it instead).

The program is traced by ``torch.export`` in strict mode (TorchDynamo), which keeps the atom count
symbolic where the networks take ``len`` of their input.

The file also stores ``metadata.json`` (``metadata``: format, format_version, lmlp_version, units,
elements, cutoff, angular_cutoff, cutoff_function, members, activation, dtype, inputs, outputs).

In Python with lmlp: ``load_exported(path)(numbers, positions, cell, pbc)`` builds the pairs (and
triples, if the program takes them: ``find_neighbors``, ``find_angular_items``) and runs the
program. Without lmlp, with any neighbour list within ``meta["cutoff"]``, here ASE's for an
``Atoms`` object ``atoms``::

    extra = {"metadata.json": ""}
    program = torch.export.load("model.pt2", extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    i, j, d, S = ase.neighborlist.neighbor_list("ijdS", atoms, meta["cutoff"])
    inputs = [torch.from_numpy(atoms.numbers), torch.from_numpy(atoms.positions), torch.from_numpy(np.stack([i, j])),
              torch.from_numpy(S @ atoms.cell.array)]
    if "triples" in meta["inputs"]:
        short = np.flatnonzero(d < meta["angular_cutoff"])
        triples = [(p, q) for c in np.unique(i[short]) for p, q in itertools.combinations(short[i[short] == c], 2)]
        inputs.append(torch.tensor(triples, dtype=torch.int64).reshape(-1, 2).T.contiguous())
    energies, forces, virials = program.module()(*inputs)

(``program.module()`` runs the graph eagerly, one operation after the other.)

In C++ (no Python): compile the program with AOTInductor (``lmlp export --aoti``, or
``torch._inductor.aoti_compile_and_package(program, package_path="model.aoti.pt2")``; compiled
for the CPU and the libtorch version it is built with) and run it with libtorch, on CPU tensors of
the dtypes above, contiguous (the compiled code does not check strides: a transposed ``triples``
gives wrong results)::

    torch::inductor::AOTIModelPackageLoader loader("model.aoti.pt2");
    auto out = loader.run({numbers, positions, pairs, shifts});  // energies, forces, virials (+ triples if taken)
    auto meta = loader.get_metadata()["metadata.json"];

Integrity: like every torch zip file, a ``.pt2`` stores a CRC-32 per archive member, which
``torch.export.load`` does not verify; ``zipfile.ZipFile(path).testzip()`` does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

import lmlp
from lmlp.calculator_kernels import descriptors, element_slots, pair_forces, pair_gradients, pair_virials
from lmlp.descriptors.eeacsf import find_angular_items
from lmlp.descriptors.neighbors import find_neighbors, find_triples
from lmlp.descriptors.terms import TermParameters
from lmlp.elements import MAX_Z
from lmlp.fileio import atomic_path
from lmlp.model import HDNNPEnsemble
from lmlp.modelfile import UNITS

FORMAT = "lmlp.export"
FORMAT_VERSION = 3
"""3: programs by moments (G5 with integer ζ) take no ``triples`` input."""
METADATA_FILE = "metadata.json"
"""Name of the metadata entry among the ``.pt2`` file's extra files."""
INPUTS = {
    "numbers": "(N,) int64 atomic numbers",
    "positions": "(N, 3) float64 Angstrom",
    "pairs": "(2, P) int64 directed neighbour pairs i -> j, both directions",
    "shifts": "(P, 3) float64 Angstrom image shifts; pair vector R_j - R_i + shift",
    "triples": "(2, Q) int64 pair indices p < q of one centre, both shorter than angular_cutoff",
}
"""The inputs of a program over triples; a program by moments takes all but ``triples``."""
OUTPUTS = {
    "energies": "(M,) float64 eV per member",
    "forces": "(M, N, 3) eV/Angstrom per member, model dtype",
    "virials": "(M, 3, 3) float64 eV per member, W_ab = sum_p (dE/dv_p)_a v_pb",
}
_TERM_TENSORS = [f.name for f in dataclasses.fields(TermParameters) if f.type == "Tensor"]
"""The tensor fields of ``TermParameters``, stored as buffers of the exported module."""
_DIMS = {name: torch.export.Dim(name) for name in ("n_atoms", "n_pairs", "n_triples")}
DYNAMIC_SHAPES = {
    "numbers": {0: _DIMS["n_atoms"]}, "positions": {0: _DIMS["n_atoms"]}, "pairs": {1: _DIMS["n_pairs"]},
    "shifts": {0: _DIMS["n_pairs"]}, "triples": {1: _DIMS["n_triples"]},
}
"""The dynamic sizes N, P and Q of the exported program's inputs (``inputs``)."""


class ExportablePotential(torch.nn.Module):
    """An ``HDNNPEnsemble`` on host neighbour lists, with analytic forces: what ``torch.export`` traces.

    Holds the model's standardizer and a copy of its networks (constants: no gradients are recorded
    when the program runs eagerly); the dtype is the model's. Inputs and outputs: module docstring.
    """

    def __init__(self, model: HDNNPEnsemble) -> None:
        super().__init__()
        dtype = next(model.parameters()).dtype
        sf, elements = model.descriptor, model.elements
        table = torch.full((MAX_Z + 1,), -1, dtype=torch.int64)
        table[elements] = torch.arange(len(elements))
        self.register_buffer("element_table", table)
        self.register_buffer("reference_energies", model.reference_energies.clone())
        self.register_buffer("pair_weights", sf.neighbor_weights[elements].to(dtype))
        self.register_buffer("angular_weights", sf.pair_weights[elements][:, elements].flatten(0, 1).to(dtype))
        terms = sf.terms(dtype)
        for name in _TERM_TENSORS:
            self.register_buffer(name, getattr(terms, name).clone())
        self.options = (terms.cutoff, terms.angular_cutoff, terms.cutoff_function, terms.g4, terms.moments)
        self.standardizer = model.standardizer
        self.networks = copy.deepcopy(model.networks).requires_grad_(False)
        self.members = model.members

    def forward(
        self, numbers: Tensor, positions: Tensor, pairs: Tensor, shifts: Tensor, triples: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Energies (M,) float64 eV, forces (M, N, 3) eV/Å, virials (M, 3, 3) float64 eV; ``triples``
        only for a model over triples (by moments the angular pairs are selected here)."""
        n = positions.shape[0]
        element, invalid = self._element_index(numbers)
        vectors = positions[pairs[1]] - positions[pairs[0]] + shifts
        terms = TermParameters(*(getattr(self, name) for name in _TERM_TENSORS), *self.options)
        data = terms.pair_data(vectors.to(self.pair_weights.dtype))
        items = torch.nonzero(data[:, 3] < terms.angular_cutoff).flatten()[None] if triples is None else triples
        rad, rad_slopes = terms.radial(data, True)
        ang, ang_slopes = terms.angular_items(data, items, True)
        pair_slot, angular_slot = element_slots(element[pairs[1]], pairs[0], items, self.pair_weights.shape[0], n)
        G, jacobian = descriptors(rad, ang, pair_slot, angular_slot, self.pair_weights, self.angular_weights,
                                  terms.moment_coefficients, n, terms.moments)
        atomic, dE_dG = self._networks(G, element)
        assert rad_slopes is not None and ang_slopes is not None
        gradient = pair_gradients(dE_dG, self.pair_weights, jacobian, pair_slot, angular_slot, rad_slopes,
                                  ang_slopes, data[:, 0:3], items, terms.moments)
        energies = atomic.to(torch.float64).sum(0) + self.reference_energies[element].sum()
        forces = pair_forces(gradient, pairs[0], pairs[1], n).transpose(0, 1)
        virials = pair_virials(gradient, vectors)
        return energies + invalid, forces + invalid.to(forces.dtype), virials + invalid

    def _element_index(self, numbers: Tensor) -> tuple[Tensor, Tensor]:
        """(N,) each atom's position in the model's elements, and a scalar: 0, or NaN if the model
        does not know an atomic number (the program cannot raise)."""
        z = numbers.clamp(0, MAX_Z)
        element = self.element_table[z]
        known = (element >= 0) & (z == numbers)
        invalid = torch.where(known.all(), 0.0, math.nan).to(torch.float64)
        return element.clamp(min=0), invalid

    def _networks(self, G: Tensor, element: Tensor) -> tuple[Tensor, Tensor]:
        """Atomic network energies (N, M) eV and dE/dG (N, M, F) from descriptors G (N, F), each
        element's atoms through its networks (``HDNNPEnsemble.atomic_energies_and_gradients``).

        Two zero rows are appended to every element's batch, whose size is known only at run time:
        ``with_input_gradient`` infers a size with −1, which an empty batch (an element absent from
        the structure) leaves undetermined, and AOTInductor's batched matmul asks whether a batch
        has one row.
        """
        x = self.standardizer(G)
        inv_std = 1.0 / self.standardizer.std.to(G.dtype)
        pad = x.new_zeros(2, x.shape[1])
        atomic = x.new_zeros(x.shape[0], self.members)
        dE_dG = x.new_zeros(x.shape[0], self.members, x.shape[1])
        for e, network in enumerate(self.networks):
            atoms = torch.nonzero(element == e).flatten()
            energy, grad = network.with_input_gradient(torch.cat([x[atoms], pad]), inv_std)
            atomic = atomic.index_copy(0, atoms, energy[:, :-2].T)
            dE_dG = dE_dG.index_copy(0, atoms, grad[:, :-2].transpose(0, 1))
        return atomic, dE_dG


def inputs(model: HDNNPEnsemble) -> dict[str, str]:
    """The names and descriptions of the inputs of ``model``'s program: ``INPUTS``, without
    ``triples`` for a model by moments."""
    return {name: text for name, text in INPUTS.items() if name != "triples" or not model.descriptor.moments}


def example_inputs(model: HDNNPEnsemble) -> tuple[Tensor, ...]:
    """Tracing inputs: a 5-atom cluster of the model's first element with every pair and triple
    (N = 5, P = 20, Q = 30: distinct sizes above 1, so that ``torch.export`` specialises none);
    the triples only if the program takes them."""
    positions = torch.tensor([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [0.0, 1.3, 0.0], [0.0, 0.0, 1.4],
                              [1.1, 1.0, 0.9]], dtype=torch.float64)
    i, j = torch.arange(5).repeat_interleave(5), torch.arange(5).repeat(5)
    pairs = torch.stack([i[i != j], j[i != j]])
    shifts = torch.zeros(pairs.shape[1], 3, dtype=torch.float64)
    return (model.elements[:1].repeat(5), positions, pairs, shifts, find_triples(pairs, 5))[: len(inputs(model))]


def export_program(model: HDNNPEnsemble) -> torch.export.ExportedProgram:
    """``model`` as an exported program with dynamic N, P and Q (``torch.export.export``)."""
    return torch.export.export(ExportablePotential(model).eval(), example_inputs(model),
                               dynamic_shapes={name: DYNAMIC_SHAPES[name] for name in inputs(model)}, strict=True)


def metadata(model: HDNNPEnsemble) -> dict[str, Any]:
    """The metadata stored with an exported ``model`` (format, units, elements, cutoffs, ...)."""
    sf = model.descriptor
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lmlp_version": lmlp.__version__,
        "units": UNITS,
        "elements": model.elements.tolist(),
        "cutoff": sf.cutoff,
        "angular_cutoff": sf.angular_cutoff,
        "cutoff_function": sf.cutoff_function,
        "members": model.members,
        "activation": model.hyperparameters["activation"],
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "inputs": inputs(model),
        "outputs": OUTPUTS,
    }


def export_model(model: HDNNPEnsemble, path: str | os.PathLike, aoti_path: str | os.PathLike | None = None) -> None:
    """Write ``model`` as an exported program with its metadata to ``path`` (``.pt2``) atomically,
    and with ``aoti_path`` (ending in ``.pt2``) also an AOTInductor package compiled for this machine."""
    program = export_program(model)
    meta = json.dumps(metadata(model))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.export.save(program, fh, extra_files={METADATA_FILE: meta})
    if aoti_path is not None:
        with atomic_path(aoti_path) as tmp, open(tmp, "wb") as fh:
            torch._inductor.aoti_compile_and_package(
                program, package_path=fh, inductor_configs={"aot_inductor.metadata": {METADATA_FILE: meta}})


class Prediction(NamedTuple):
    """Member energies (M,) float64 eV, forces (M, N, 3) eV/Å and, for periodic cells, virials
    (M, 3, 3) float64 eV (else None)."""

    energies: Tensor
    forces: Tensor
    virials: Optional[Tensor]


class ExportedPotential:
    """An exported program loaded back (``load_exported``), evaluated on structures.

    Attributes:
        program: the ``torch.export.ExportedProgram``. metadata: its ``metadata.json``.
    """

    def __init__(self, program: torch.export.ExportedProgram, meta: dict[str, Any]) -> None:
        self.program = program
        self.metadata = meta
        self._module = program.module()

    def __call__(
        self, numbers: Tensor, positions: Tensor, cell: Optional[Tensor] = None, pbc: Optional[Tensor] = None
    ) -> Prediction:
        """Predict one structure: numbers (N,), positions (N, 3) Å, cell (3, 3) Å (rows the cell
        vectors) and pbc (3,) bool (default: periodic along all three when a cell is given)."""
        numbers = torch.as_tensor(numbers, dtype=torch.int64)
        positions = torch.as_tensor(positions, dtype=torch.float64)
        periodic = cell is not None and (pbc is None or bool(torch.as_tensor(pbc).any()))
        cells = pbcs = None
        if periodic:
            cells = torch.as_tensor(cell, dtype=torch.float64).reshape(1, 3, 3)
            pbcs = torch.as_tensor(True if pbc is None else pbc, dtype=torch.bool).expand(3).reshape(1, 3)
        nb = find_neighbors(positions, torch.tensor([0, len(numbers)]), self.metadata["cutoff"], cells, pbcs)
        triples = None
        if "triples" in self.metadata["inputs"]:
            triples = find_angular_items(nb.pairs, nb.vectors(positions).norm(dim=1), self.metadata["angular_cutoff"],
                                         len(numbers), False)
        energies, forces, virials = self.evaluate(numbers, positions, nb.pairs, nb.shifts, triples)
        return Prediction(energies, forces, virials if periodic else None)

    def evaluate(
        self, numbers: Tensor, positions: Tensor, pairs: Tensor, shifts: Tensor, triples: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The program on given pairs (and triples, if it takes them; module docstring) after checking
        them: ValueError naming unknown elements, or describing malformed or missing inputs."""
        self._check_elements(numbers)
        _check_indices("pairs", pairs, len(numbers), "atom")
        if tuple(shifts.shape) != (pairs.shape[1], 3):
            raise ValueError(f"shifts must be (P, 3) with P = {pairs.shape[1]}, not {tuple(shifts.shape)}")
        tensors = [numbers.to(torch.int64), positions.to(torch.float64), pairs, shifts.to(torch.float64)]
        if ("triples" in self.metadata["inputs"]) != (triples is not None):
            raise ValueError("this program takes triples (angular functions over triples)" if triples is None else
                             "this program takes no triples (angular functions by moments of the pairs)")
        if triples is not None:
            _check_indices("triples", triples, pairs.shape[1], "pair")
            tensors.append(triples)
        return self._module(*tensors)

    def _check_elements(self, numbers: Tensor) -> None:
        """ValueError naming the atomic numbers the model does not know."""
        unknown = sorted(set(numbers.tolist()) - set(self.metadata["elements"]))
        if unknown:
            raise ValueError(f"the model does not know the elements with Z = {unknown}")


def _check_indices(name: str, index: Tensor, bound: int, kind: str) -> None:
    """ValueError unless ``index`` is (2, K) int64 with entries in [0, bound)."""
    if index.dim() != 2 or index.shape[0] != 2 or index.dtype != torch.int64 or (
            index.numel() > 0 and (int(index.min()) < 0 or int(index.max()) >= bound)):
        raise ValueError(f"{name} must be (2, K) int64 {kind} indices below {bound}, "
                         f"not {tuple(index.shape)} {index.dtype}")


def load_exported(path: str | os.PathLike) -> ExportedPotential:
    """The exported program in ``path`` (``export_model``) with its metadata; ValueError if it is
    not an lmlp export."""
    extra = {METADATA_FILE: ""}
    serde_log = logging.getLogger("torch._export.serde.serialize")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)  # it warns about sizes of the trace that the graph no longer uses
    try:
        with open(path, "rb") as fh:
            program = torch.export.load(fh, extra_files=extra)
    finally:
        serde_log.setLevel(level)
    meta = json.loads(extra[METADATA_FILE] or "{}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an lmlp export (format {meta.get('format')!r})")
    return ExportedPotential(program, meta)
