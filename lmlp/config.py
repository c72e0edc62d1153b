"""Run configuration: one YAML file, typed dataclasses, strict validation.

A config file is a YAML mapping whose sections map one-to-one onto the dataclasses below::

    name: sn2                 # run name
    descriptor: {...}         # DescriptorConfig: eeACSF parameters (Å, Å⁻²)
    model: {...}              # ModelConfig: atomic network shape
    ensemble: {...}           # EnsembleConfig: number of members, seed
    optimizer: {...}          # OptimizerConfig: CoRe or one of nine others
    selection: {...}          # SelectionConfig: lifelong adaptive data selection
    training: {...}           # TrainingConfig: epochs, loss weights, precision, device
    data: {...}               # DataConfig: structure file and subset
    output: {...}             # OutputConfig: run directory, plots, progress bars

Every key has a default, so an empty file (or an empty section) means "all defaults".
Conversion is driven by the dataclass type hints (int, float, bool, str, Literal, list[T],
dict[str, T], unions such as ``T | None``, nested dataclasses); range constraints sit in
``field(metadata=...)`` (``gt``, ``ge``, ``lt``, ``le``, ``one_of`` apply to numbers, per
element in lists; ``unique`` forbids repeated list entries), cross-field checks in a section's
``validate()``. An int is accepted where a float is expected, a bool never counts as a number.
Every rejection is a ``ConfigError`` of one line naming the file, the key path, the bad value
and what is allowed, e.g. ``x.yaml: training.epochs: got -3, expected an integer >= 1``.
In YAML files ``1e-2`` reads as a number (plain YAML 1.1 would read it as a string) and a key
repeated within one mapping is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from lmlp.descriptors import SymmetryFunctions
from lmlp.errors import ConfigError
from lmlp.model import ACTIVATION_CODES
from lmlp.optim import OPTIMIZERS

OptimizerName = Literal[OPTIMIZERS]
"""The ten optimizers of the CoRe benchmark (docs/method.md: optimizer comparison): the names of ``lmlp.optim.registry``."""

ActivationName = Literal[tuple(ACTIVATION_CODES)]
"""Hidden-layer activations: the names of ``lmlp.model.ACTIVATIONS``."""

HyperParameter = bool | int | float | list[int | float]
"""An extra optimizer hyperparameter value: a number, a bool or a list of numbers."""


class _Invalid(ConfigError):
    """A rejected value at ``path`` (relative to the section being converted or validated).

    Sections' ``validate()`` methods raise it with the field name as ``path``; the converter
    prefixes the section's key path and, at the top, the file name.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path or 'top level'}: {message}")
        self.path = path
        self.message = message


def _field(default: Any, **constraints: Any) -> Any:
    """A dataclass field with ``default`` (lists and dicts copied per instance) and constraints."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=constraints)
    return field(default=default, metadata=constraints)


def _got(path: str, value: Any, expected: str) -> _Invalid:
    """The rejection "got <value>, expected <what is allowed>" at ``path``."""
    text = repr(value)
    return _Invalid(path, f"got {text if len(text) <= 80 else text[:77] + '...'}, expected {expected}")


@dataclass
class DescriptorConfig:
    """Element-embracing atom-centred symmetry functions (docs/method.md: element-embracing symmetry functions). Lengths in Å, η in Å⁻².

    Radial functions: one per (type, (η, r_s) pair). Angular functions: one per (type, pair
    weight, η, λ, ζ), except that type 0 has no "difference" kind (it equals "sum").
    """

    kind: Literal["eeacsf", "acsf"] = "eeacsf"
    """Element-embracing weights ("eeacsf") or plain Behler ACSFs, one set per element (pair) ("acsf")."""
    cutoff: float = _field(12.0, gt=0)
    """Cutoff radius R_c of the radial functions, Å."""
    angular_cutoff: float | None = _field(6.0, gt=0)
    """Cutoff radius of the angular functions, Å (triples stay local while radial shells keep the
    long range; docs/accuracy.md: 6 Å is as accurate as 12 Å on SN2); values above ``cutoff``
    and null mean ``cutoff``."""
    cutoff_function: Literal["cos", "poly1", "poly2"] = "cos"
    """f_c(x), x = r/R_c, inside R_c: "cos" ½[cos(πx) + 1]; "poly1" (2x − 3)x² + 1; "poly2"
    ((15 − 6x)x − 10)x³ + 1, whose curvature vanishes at R_c too."""
    radial_types: list[int] = _field([0, 1, 2], ge=0, le=6, unique=True)
    """Element weight types t (0..6) of the radial functions."""
    radial_eta: list[float] = _field([16.0] * 10 + [4.0] * 8 + [1.0] * 6, gt=0)
    """Gaussian widths η, Å⁻²; paired element by element with ``radial_rs``. Default: 10 narrow
    shells (0.18 Å wide) over the bond and transition-state range 0.9–2.7 Å, 8 of 0.35 Å to 5.7 Å,
    6 wide ones for the ion–molecule range (docs/accuracy.md: the narrow shells halve the force
    error on displaced structures)."""
    radial_rs: list[float] = _field([0.9, 1.1, 1.3, 1.5, 1.7, 1.9, 2.1, 2.3, 2.5, 2.7,
                                     0.8, 1.5, 2.2, 2.9, 3.6, 4.3, 5.0, 5.7,
                                     6.5, 7.5, 8.5, 9.5, 10.5, 11.5], ge=0)
    """Gaussian centres r_s, Å; as many as ``radial_eta``."""
    angular_types: list[int] = _field([0, 1, 2], ge=0, le=6, unique=True)
    """Element weight types t (0..6) of the angular functions."""
    angular_pair_weights: list[Literal["sum", "difference"]] = _field(["sum", "difference"], unique=True)
    """Neighbour-pair weight kinds W_t(Z_j, Z_k)."""
    angular_eta: list[float] = _field([0.0, 0.0625, 0.25], ge=0, unique=True)
    """Radial decay η of the angular functions, Å⁻² (0: cutoff function only)."""
    angular_lambda: list[float] = _field([-1.0, 1.0], one_of=(-1, 1), unique=True)
    """λ of (1 + λ cos θ)^ζ, each -1 or 1."""
    angular_zeta: list[float] = _field([1.0, 4.0], ge=1, unique=True)
    """Angular resolution ζ of (1 + λ cos θ)^ζ, dimensionless."""
    angular_form: Literal["g5", "g4"] = "g5"
    """Angular form: G5 has no j–k distance term, G4 also multiplies by exp(−η r_jk²) f_c(r_jk)."""

    def validate(self) -> None:
        """Paired radial lists, centres inside the cutoff, and symmetry functions that can be built
        (at least one; counted by ``SymmetryFunctions`` itself)."""
        if len(self.radial_rs) != len(self.radial_eta):
            raise _got("radial_rs", self.radial_rs, f"{len(self.radial_eta)} values, one per radial_eta")
        pairs = list(zip(self.radial_eta, self.radial_rs))
        if len(set(pairs)) < len(pairs):
            raise _got("radial_rs", self.radial_rs, "distinct (radial_eta, radial_rs) pairs")
        for i, rs in enumerate(self.radial_rs):
            if rs >= self.cutoff:
                raise _got(f"radial_rs[{i}]", rs, f"a centre < cutoff ({self.cutoff} Å)")
        try:
            n_functions = SymmetryFunctions.from_config(self, elements=[1]).n_functions
        except ValueError as exc:
            raise _Invalid("", f"these parameters give no valid symmetry functions: {exc}") from None
        if n_functions < 1:
            raise _Invalid("", "no symmetry functions: give radial (eta, rs) pairs or angular parameters")


@dataclass
class ModelConfig:
    """Atomic neural networks, one per element (docs/method.md: the HDNNP ensemble)."""

    hidden: list[int] = _field([25, 25], ge=1)
    """Neurons per hidden layer."""
    activation: ActivationName = "scaled_tanh"
    """Hidden-layer activation; scaled_tanh = 1.59223·tanh(x)."""


@dataclass
class EnsembleConfig:
    """Ensemble of independently initialised HDNNPs (docs/method.md: the HDNNP ensemble)."""

    members: int = _field(10, ge=1)
    """Number of HDNNPs M."""
    seed: int = _field(0, ge=0)
    """Seed of the initial weights."""


@dataclass
class OptimizerConfig:
    """Optimizer (docs/method.md: CoRe optimizer, optimizer comparison)."""

    name: OptimizerName = "core"
    """One of the ten benchmarked optimizers."""
    lr: float = _field(1e-2, gt=0)
    """Learning rate; for CoRe and RPROP the maximal step size s_max."""
    params: dict[str, HyperParameter] = _field({})
    """Further hyperparameters by name (e.g. p_frozen for CoRe); others keep their defaults."""


@dataclass
class SelectionConfig:
    """Lifelong adaptive data selection (docs/method.md: lifelong adaptive data selection). Weights are dimensionless."""

    mode: Literal["adaptive", "random"] = "adaptive"
    """Draw structures with probability ∝ selection weight ("adaptive") or uniformly ("random", baseline)."""
    fit_fraction: float = _field(0.1, gt=0, le=1)
    """Fraction f of the training structures fitted per epoch."""
    p_min: float = _field(0.1, gt=0)
    """Lowest selection weight (> 0, so every structure keeps being rehearsed)."""
    p_max: float = _field(10.0, gt=0)
    """Highest selection weight."""
    p_init: float = _field(1.0, gt=0)
    """Initial weight of the structures present at the start."""
    p_new: float = _field(10.0, gt=0)
    """Weight of structures that enter later (lifelong learning)."""
    raise_factor: float = _field(1.5, gt=1)
    """Weight factor for a fitted structure whose loss is above the threshold."""
    lower_factor: float = _field(0.8, gt=0, lt=1)
    """Weight factor for a fitted structure whose loss is at or below the threshold."""
    error_threshold: float = _field(1.0, gt=0)
    """Threshold as a multiple of the mean loss of this epoch's fitted structures."""
    outlier_epochs: int = _field(10, ge=1)
    """Consecutive fits above ``outlier_factor`` × the training loss, without the structure's loss
    falling over them, after which it is reported as a likely outlier (bad reference data); a
    falling loss (a structure still being learnt, e.g. a new one) starts the count again."""
    outlier_factor: float = _field(25.0, gt=1)
    """Loss multiple (of the mean loss of this epoch's fitted structures) that counts as an extreme error."""

    def validate(self) -> None:
        """p_min ≤ p_init ≤ p_max and p_min ≤ p_new ≤ p_max."""
        for key in ("p_init", "p_new"):
            value = getattr(self, key)
            if not self.p_min <= value <= self.p_max:
                raise _got(key, value, f"p_min <= {key} <= p_max ({self.p_min} ... {self.p_max})")


@dataclass
class TrainingConfig:
    """Training loop and loss (docs/method.md: loss and error metrics, one training epoch)."""

    epochs: int = _field(2000, ge=1)
    """Number of epochs."""
    steps_per_epoch: int = _field(1, ge=1)
    """Optimizer steps per epoch on the selected structures."""
    energy_weight: float = _field(10.9, ge=0)
    """q in the loss q²·mean((ΔE/N)²) + mean(ΔF²), dimensionless (energies in eV/atom, forces in eV/Å)."""
    force_weight: float = _field(1.0, ge=0)
    """Weight of the force term of the loss, dimensionless."""
    dtype: Literal["float32", "float64"] = "float32"
    """Floating-point precision of networks and descriptors."""
    early_stopping: bool = True
    """Keep each member's epoch of minimal validation loss as the final model (files without a
    validation split: test loss, with a warning)."""
    validation_every: int = _field(1, ge=1)
    """Evaluate the validation (and per-epoch training) metrics every this many epochs, and the
    first and last; early stopping chooses among those epochs. Larger values leave more of the
    time to the optimizer steps."""
    train_metrics_sample: int | None = _field(None, ge=1)
    """Per-epoch training metrics on this many training structures (a fixed random sample drawn
    with ``seed``); null: on all of them. The final metrics always use every structure."""
    checkpoint_every: int = _field(50, ge=1)
    """Write a checkpoint every this many epochs."""
    seed: int = _field(0, ge=0)
    """Seed of data order and selection draws."""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """Torch device; "auto" uses CUDA when available."""
    threads: int = _field(0, ge=0)
    """Torch CPU threads (0: torch default)."""
    descriptor_cache: Literal["memory", "disk"] = "memory"
    """Where the descriptors and their derivatives live: "memory" (fastest), or "disk" for data
    larger than memory (HDF5 files in the run directory, read per epoch for the selected
    structures in blocks; memory stays bounded, see ``lmlp.cache``)."""
    on_divergence: Literal["lower_step", "stop"] = "lower_step"
    """A non-finite loss, gradient or training/validation metric: the epoch is undone (weights, optimizer and
    selection state of the previous epoch restored) and either retried with every step size and
    learning rate × ``divergence_factor`` ("lower_step") or the run stops with an error ("stop")."""
    divergence_factor: float = _field(0.5, gt=0, lt=1)
    """Step-size factor of a retried epoch."""
    divergence_retries: int = _field(5, ge=1)
    """Retries of one epoch before the run stops with an error."""
    refit_reference_energies: bool = False
    """A continued run (``--continue-from``) first refits the per-element reference energies E_ref
    to its training data (least squares of the energies minus the networks' sum): for labels from
    another method (e.g. GFN2-xTB → DFT), whose total energies differ by per-element constants."""

    def validate(self) -> None:
        """The loss must have a nonzero term."""
        if self.energy_weight == 0 and self.force_weight == 0:
            raise _got("force_weight", self.force_weight, "a value > 0 when energy_weight is 0")


@dataclass
class DataConfig:
    """Reference structures (lmlp HDF5 layout, see ``lmlp.data.hdf5``)."""

    path: str = "data/sn2_gfn2xtb.h5"
    """Structure file, relative to the working directory."""
    on_invalid: Literal["raise", "skip"] = "raise"
    """Invalid structures: stop with an error, or drop and report each."""
    reactions: list[str] | None = None
    """Use only structures with these labels (e.g. "F+CH3Cl"); null: all."""
    max_structures: int | None = _field(None, ge=1)
    """Use at most this many structures; null: all."""
    max_train: int | None = _field(None, ge=1)
    """Train on the first this many structures of the training split (file order; null: all);
    validation and test stay whole (learning curves over the training-set size)."""
    extra_test: list[str] = _field([], unique=True)
    """Independent test files (e.g. data/sn2_gfn2xtb_independent.h5): every structure of each
    (of the configured reactions) is evaluated once after training and reported beside the test split."""


@dataclass
class OutputConfig:
    """Where and how results are written."""

    run_dir: str = "runs/{name}"
    """Run directory; "{name}" is replaced by the run name."""
    plots: bool = True
    """Write learning-curve and error plots."""
    progress: bool = True
    """Show progress bars."""


@dataclass
class VariantConfig:
    """One optimizer setting of a comparison (docs/method.md: optimizer comparison): a name and an ``optimizer:`` section."""

    name: str = "core"
    """Label in tables and plots, e.g. "CoRe p_frozen=0.1"; also its run directory name."""
    optimizer: OptimizerName = "core"
    """Registry name of the optimizer."""
    lr: float = _field(1e-2, gt=0)
    """Learning rate; for CoRe and RPROP the maximal step size s_max."""
    params: dict[str, HyperParameter] = _field({})
    """Further hyperparameters (e.g. p_frozen, betas); the others keep their defaults."""


DEFAULT_VARIANTS: list[dict[str, Any]] = [
    {"name": "CoRe", "optimizer": "core", "lr": 1e-2},
    {"name": "CoRe p_frozen=0.1", "optimizer": "core", "lr": 1e-2, "params": {"p_frozen": 0.1}},
    {"name": "Adam", "optimizer": "adam", "lr": 1e-3},
    {"name": "AdaMax", "optimizer": "adamax", "lr": 2e-3},
    {"name": "RMSprop", "optimizer": "rmsprop", "lr": 1e-3},
    {"name": "AdaGrad", "optimizer": "adagrad", "lr": 1e-2},
    {"name": "AdaDelta", "optimizer": "adadelta", "lr": 1.0},
    {"name": "NAG", "optimizer": "nag", "lr": 1e-2},
    {"name": "Momentum", "optimizer": "momentum", "lr": 1e-2},
    {"name": "SGD", "optimizer": "sgd", "lr": 1e-1},
    {"name": "RPROP", "optimizer": "rprop", "lr": 1e-2},
]
"""The ten optimizers of the CoRe paper plus CoRe with p_frozen = 0.1, PyTorch defaults but the
learning rate (a value in the paper's grid 1e-4 … 1 that suits a 10 % fit fraction)."""


@dataclass
class CompareConfig:
    """The optimizer comparison ``lmlp compare`` runs (docs/method.md: optimizer comparison; CoRe paper §3)."""

    variants: list[VariantConfig] = field(
        default_factory=lambda: [VariantConfig(**{**v, "params": dict(v.get("params", {}))}) for v in DEFAULT_VARIANTS]
    )
    """Optimizer settings to compare; each is trained under identical conditions."""
    seeds: int = _field(3, ge=1)
    """Trainings per variant, seeds s = 0 … seeds−1: seed s starts from the initial weights of
    ensemble member s (``ensemble.seed`` + s), the same for every variant."""
    seed_mode: Literal["independent", "shared"] = "independent"
    """"independent": every seed is a training run of its own (one member, data order and
    selection drawn with ``training.seed`` + s), so the spread over seeds includes the data order;
    "shared": the seeds are the members of one ensemble trained together (one batched run; they
    share the data order and the selection weights, so their spread is a lower bound)."""
    lr_grid: list[float] | None = _field(None, gt=0, unique=True)
    """Learning rates / maximal step sizes to try per variant (null: each variant's own lr);
    the value with the lowest final validation loss is kept."""
    target_rmse_e: float = _field(5.0, gt=0)
    """Energy validation RMSE, meV/atom, for the "epochs to reach" column."""
    target_rmse_f: float = _field(150.0, gt=0)
    """Force validation RMSE, meV/Å, for the "epochs to reach" column."""
    out: str = "runs/{name}-compare"
    """Output directory; "{name}" is replaced by the run name."""

    def validate(self) -> None:
        """Variant names must be unique and usable as directory names."""
        names = [v.name for v in self.variants]
        if not names or len(set(names)) < len(names):
            raise _got("variants", names, "a non-empty list of variants with distinct names")
        for k, name in enumerate(names):
            if not name or "/" in name or "\\" in name:
                raise _got(f"variants[{k}].name", name, "a non-empty name without path separators")


@dataclass
class Config:
    """A complete run configuration."""

    name: str = "sn2"
    """Run name (used in the run directory)."""
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    @property
    def run_dir(self) -> Path:
        """``output.run_dir`` with ``{name}`` replaced by the run name."""
        return Path(self.output.run_dir.replace("{name}", self.name))

    def validate(self) -> None:
        """The name must be usable as a directory name."""
        if not self.name or "/" in self.name or "\\" in self.name:
            raise _got("name", self.name, "a non-empty name without path separators")


def _join(path: str, key: Any) -> str:
    name = key if isinstance(key, str) and key.isidentifier() else repr(key)
    return f"{path}.{name}" if path else name


def _describe(tp: Any, meta: dict[str, Any]) -> str:
    """What ``tp`` with constraints ``meta`` allows, as a noun phrase."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is bool:
        return "a boolean (true/false)"
    if tp is str:
        return "a string"
    if tp in (int, float):
        if "one_of" in meta:
            return " or ".join(str(c) for c in meta["one_of"])
        limits = [f"{op} {meta[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in meta]
        return ("an integer" if tp is int else "a number") + (" " + " and ".join(limits) if limits else "")
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list (each {_describe(args[0], meta)})"
    if origin is dict:
        return f"a mapping of names to values (each {_describe(args[1], meta)})"
    if origin in (Union, types.UnionType):
        arms = ["null" if a is type(None) else _describe(a, meta) for a in args if not (a is int and float in args)]
        return " or ".join([", ".join(arms[:-1]), arms[-1]] if len(arms) > 1 else arms)
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    raise TypeError(f"unsupported config type {tp!r}")


def _check_number(value: int | float, meta: dict[str, Any], tp: type, path: str) -> None:
    ok = value in meta["one_of"] if "one_of" in meta else (
        ("gt" not in meta or value > meta["gt"]) and ("ge" not in meta or value >= meta["ge"])
        and ("lt" not in meta or value < meta["lt"]) and ("le" not in meta or value <= meta["le"])
    )
    if not ok:
        raise _got(path, value, _describe(tp, meta))


def _convert(value: Any, tp: Any, meta: dict[str, Any], path: str) -> Any:
    """``value`` (from YAML) as type ``tp``, or ``_Invalid`` naming ``path``."""
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_section(value, tp, path)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, args, meta, path)
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            close = difflib.get_close_matches(value, args, n=1) if isinstance(value, str) else []
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _got(path, value, _describe(tp, meta) + hint)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _got(path, value, _describe(tp, meta))
        items = [_convert(v, args[0], meta, f"{path}[{i}]") for i, v in enumerate(value)]
        if meta.get("unique") and len(set(items)) < len(items):
            raise _got(path, value, "a list without repeated values")
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise _got(path, value, _describe(tp, meta))
        for k in value:
            if not isinstance(k, str):
                raise _got(path, k, "string keys")
        return {k: _convert(v, args[1], meta, _join(path, k)) for k, v in value.items()}
    if tp is bool or tp is str:
        if type(value) is not tp:
            raise _got(path, value, _describe(tp, meta))
        return value
    if tp is int:
        if type(value) is not int:
            raise _got(path, value, _describe(tp, meta))
        _check_number(value, meta, tp, path)
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise _got(path, value, _describe(tp, meta))
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise _got(path, value, "a finite number")
        _check_number(number, meta, tp, path)
        return number
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _convert_union(value: Any, tp: Any, args: tuple[Any, ...], meta: dict[str, Any], path: str) -> Any:
    """First arm of the union that accepts ``value``; else the most specific rejection."""
    if value is None and type(None) in args:
        return None
    deepest: _Invalid | None = None
    for arm in args:
        if arm is type(None):
            continue
        try:
            return _convert(value, arm, meta, path)
        except _Invalid as exc:
            if exc.path != path and deepest is None:
                deepest = exc
    raise deepest or _got(path, value, _describe(tp, meta))


def _convert_section(value: Any, cls: type, path: str) -> Any:
    """A dataclass from a mapping (None: all defaults); unknown keys are rejected."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _got(path, value, _describe(cls, {}))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _Invalid(_join(path, key), f"unknown key; allowed keys: {', '.join(fields)}{hint}")
    hints = get_type_hints(cls)
    section = cls(**{
        key: _convert(v, hints[key], dict(fields[key].metadata), _join(path, key)) for key, v in value.items()
    })
    validate = getattr(section, "validate", None)
    if validate is not None:
        try:
            validate()
        except _Invalid as exc:
            raise _Invalid(_join(path, exc.path) if exc.path else path, exc.message) from None
        except ConfigError as exc:
            raise _Invalid(path, str(exc)) from None
    return section


def config_from_dict(d: Any, source: str = "<dict>") -> Config:
    """A validated ``Config`` from nested YAML-like data; ``source`` names the origin in errors.

    ``None`` gives all defaults. Raises ``ConfigError`` (one line: source, key path, value,
    what is allowed) for anything else that is not a valid config.
    """
    try:
        return _convert_section(d, Config, "")
    except _Invalid as exc:
        raise ConfigError(f"{source}: {exc}") from None


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that reads ``1e-2`` as a number and rejects repeated keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def with_overrides(data: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the config mapping ``data`` (None: empty) with the dotted-key ``overrides``
    (e.g. ``{"data.max_train": 100}``) set; the result is validated as any config."""
    config = copy.deepcopy(data) if data is not None else {}
    if not isinstance(config, dict):
        return config  # rejected by the validation
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = config
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {section} is not a section")
        node[key] = value
    return config


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (dotted keys, YAML values) as a mapping for ``with_overrides``."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. data.max_train=100")
        try:
            overrides[key.strip()] = yaml.load(value, Loader=_Loader)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
    return overrides


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config file, with the dotted-key ``overrides`` (``with_overrides``)
    set; an empty file gives all defaults."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{source}: {where}invalid YAML: {problem}") from None
    if overrides:
        data = with_overrides(data, overrides)
        source += " with --set " + ", ".join(overrides)
    return config_from_dict(data, source)


class _Dumper(yaml.SafeDumper):
    """Safe YAML dumper that writes lists of numbers or strings on one line."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        flat = all(isinstance(v, (int, float, str, bool)) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _Dumper.represent_list)


def dump_config(cfg: Config) -> str:
    """``cfg`` as YAML with every key; ``config_from_dict`` reads it back to an equal Config."""
    return yaml.dump(dataclasses.asdict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
