"""The ``lmlp`` command line: a thin layer over the Python API.

Every user error (``LmlpError``) is printed as one line on stderr with exit status 1.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmlp.errors import LmlpError

app = typer.Typer(
    help="lmlp: lifelong machine learning potentials (eeACSF HDNNP ensembles, CoRe, lifelong "
    "adaptive data selection).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Structure data: generate, convert, inspect.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration files: check and show resolved.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

SkipInvalid = Annotated[
    bool, typer.Option("--skip-invalid", help="Drop invalid structures (and report them) instead of failing.")
]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a config key: KEY=VALUE with a dotted key and a YAML value, e.g. --set data.max_train=100 "
                  "(repeatable).")]


def _command_line() -> str:
    return shlex.join(["lmlp", *sys.argv[1:]])


@data_app.command("info")
def data_info(
    path: Annotated[Path, typer.Argument(help="An lmlp HDF5 structure file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Counts, elements, reactions, energy and force ranges, split sizes, method and units."""
    from lmlp.data import summarize

    summary = summarize(path)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(summary), indent=2))
    else:
        typer.echo(format_summary(summary))


def format_summary(s) -> str:
    """``lmlp data info`` text for a ``lmlp.data.Summary``."""
    a = s.attrs
    lo, hi = s.atoms_per_structure
    rows = [
        ("structures", f"{s.n_structures} ({s.n_atoms} atoms, {lo}–{hi} per structure)"
         + (", periodic" if s.periodic else "")),
        ("elements", ", ".join(f"{el} {n}" for el, n in s.elements.items())),
        ("method", f"{a.get('method', '?')} ({a.get('program', '?')} {a.get('program_version', '')})".strip()),
        ("units", f"energy {a.get('energy_unit')}, length {a.get('length_unit')}, "
                  f"forces {a.get('force_unit')}, charge {a.get('charge_unit')}"),
        ("energy", f"{s.energy_range[0]:.4f} … {s.energy_range[1]:.4f} eV "
                   f"({s.energy_per_atom_range[0]:.4f} … {s.energy_per_atom_range[1]:.4f} eV/atom)"),
        ("forces", f"components {s.force_component_range[0]:.3f} … {s.force_component_range[1]:.3f} eV/Å, "
                   f"max |F| {s.max_force_norm:.3f} eV/Å"),
        ("split", ", ".join(f"{k} {v}" for k, v in s.split_sizes.items()) or "none"),
        ("trajectories", "not recorded" if s.n_trajectories is None else str(s.n_trajectories)),
        ("created", a.get("created", "?")),
        ("command", a.get("command", "?")),
        ("format", f"{a.get('format')} v{a.get('format_version')}, {a.get('content_hash', '')[:23]}…"),
    ]
    if "sampling" in a:
        rows.insert(3, ("sampling", a["sampling"]))
    width = max(len(k) for k, _ in rows)
    lines = [s.path] + [f"  {k:<{width}}  {v}" for k, v in rows]
    lines.append(f"  {'labels':<{width}}  {len(s.labels)}")
    label_width = max((len(k) for k in s.labels), default=0)
    lines += [f"    {k:<{label_width}}  {n:>7}" for k, n in s.labels.items()]
    return "\n".join(lines)


@data_app.command("convert")
def data_convert(
    source: Annotated[Path, typer.Argument(help="Input: .h5, or any file ASE reads with energies and forces (extxyz, ASE db, ...).")],
    target: Annotated[Path, typer.Argument(help="Output: .h5 (lmlp layout) or .extxyz/.xyz.")],
    charge: Annotated[int, typer.Option(help="Total charge (e) where the input does not give one.")] = 0,
    method: Annotated[Optional[str], typer.Option(help="Reference method to record in the HDF5 file.")] = None,
    test_fraction: Annotated[float, typer.Option(help="Test fraction of a new split (stratified by label).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of a new split.")] = 0,
    skip_invalid: SkipInvalid = False,
) -> None:
    """Convert structures between HDF5 and extxyz (or from anything ASE reads)."""
    from lmlp.data import convert

    attrs = {"command": _command_line(), **({"method": method} if method else {})}
    written, problems = convert(source, target, on_invalid="skip" if skip_invalid else "raise",
                                default_charge=charge, test_fraction=test_fraction, seed=seed, attrs=attrs)
    _report_skipped(source, problems)
    typer.echo(f"wrote {len(written)} structures to {target}")


@data_app.command("generate")
def data_generate(
    out: Annotated[Path, typer.Argument(help="Output HDF5 file.")],
    n_structures: Annotated[int, typer.Option(help="Number of structures to sample (all 16 reactions).")] = 9000,
    method: Annotated[str, typer.Option(help="Reference method: gfn2-xtb (tblite) or pyscf (B3LYP/def2-SVPD).")] = "gfn2-xtb",
    seed: Annotated[int, typer.Option(help="Seed of the MD sampling and the split.")] = 0,
    workers: Annotated[int, typer.Option(help="Worker processes (one reaction each at a time).")] = 1,
    reactions: Annotated[Optional[str], typer.Option(help="Comma-separated subset, e.g. 'F+CH3Cl,Cl+CH3F'.")] = None,
    protocol: Annotated[str, typer.Option(
        help="md: the training set (restrained MD windows along the path, split by trajectory into "
             "train/validation/test); independent: a test set made differently (relaxed C-X scans, "
             "displaced copies, hot MD from the transition state), all test.")] = "md",
) -> None:
    """Generate the SN2 reference data set X⁻ + CH3Y → XCH3 + Y⁻ (resumable: re-run to continue)."""
    from lmlp.reference.sn2 import generate_sn2

    report = generate_sn2(
        out, n_structures=n_structures, seed=seed, method=method, workers=workers,
        reactions=reactions.split(",") if reactions else None, command=_command_line(), progress=True,
        sampling=protocol,
    )
    typer.echo(
        f"wrote {report.n_written} structures to {report.path}; "
        f"{report.n_failed_sampling} sampling and {report.n_failed_labels} labelling failures (not stored)"
    )


@data_app.command("split")
def data_split(
    path: Annotated[Path, typer.Argument(help="An lmlp HDF5 structure file.")],
    by: Annotated[str, typer.Option(help="trajectory: whole MD trajectories to one side (needs stored trajectory "
                                         "ids); random: structure by structure.")] = "trajectory",
    fractions: Annotated[str, typer.Option(help="Train, validation and test fractions.")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Output file (default: rewrite PATH in place, atomically).")] = None,
) -> None:
    """Store a new train/validation/test split, stratified by label (reaction)."""
    from lmlp.data import read_structures, resplit, write_structures

    try:
        parts = tuple(float(v) for v in fractions.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise LmlpError(f"--fractions: got {fractions!r}, expected three numbers, e.g. 0.8,0.1,0.1")
    s, _ = read_structures(path)
    try:
        s = resplit(s, by, parts, seed)
    except LmlpError as exc:
        raise LmlpError(f"{path}: {exc}") from None
    s.attrs["split_command"] = _command_line()
    target = out or path
    write_structures(target, s)
    typer.echo(f"wrote {target}: " + ", ".join(f"{k} {len(v)}" for k, v in s.split.items()))


@data_app.command("merge")
def data_merge(
    out: Annotated[Path, typer.Argument(help="Output HDF5 file.")],
    sources: Annotated[list[Path], typer.Argument(help="lmlp HDF5 files with a stored split, joined in order.")],
) -> None:
    """Join structure files and their stored splits (e.g. the training data and newly labelled structures)."""
    from lmlp.data import concatenate, read_structures, write_structures

    sets = [read_structures(path)[0] for path in sources]
    methods = {str(s.attrs.get("method")) for s in sets}
    if len(methods) > 1:
        raise LmlpError(f"the files were labelled with different methods ({', '.join(sorted(methods))}); "
                        f"their energies cannot be mixed")
    for path, s in zip(sources, sets):
        if not s.split:
            raise LmlpError(f"{path}: has no stored split (lmlp data split or lmlp data convert makes one)")
    merged = concatenate(sets, keep_splits=True)
    merged.attrs.update({"command": _command_line(), "sources": ", ".join(map(str, sources))})
    write_structures(out, merged)
    typer.echo(f"wrote {len(merged)} structures to {out} "
               f"({', '.join(f'{k} {len(v)}' for k, v in merged.split.items())})")


@data_app.command("label")
def data_label(
    source: Annotated[Path, typer.Argument(help="Structures to label: extxyz (e.g. flagged by lmlp md) or anything ASE reads.")],
    out: Annotated[Path, typer.Option(help="Output HDF5 file (lmlp layout, with a train/test split).")],
    method: Annotated[str, typer.Option(help="Reference method: gfn2-xtb (tblite) or pyscf (B3LYP/def2-SVPD).")] = "gfn2-xtb",
    charge: Annotated[Optional[int], typer.Option(
        help="Total charge (e) of structures without info charge (SN2: -1); required if any lacks one.")] = None,
    test_fraction: Annotated[float, typer.Option(help="Test fraction of the split (stratified by label).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
) -> None:
    """Compute reference energies and forces for structures (as lmlp data generate does) and write HDF5."""
    from lmlp.labelling import label_file

    labelled, failed = label_file(source, out, method=method, charge=charge, test_fraction=test_fraction,
                                  seed=seed, command=_command_line(), progress=True)
    typer.echo(f"wrote {len(labelled)} structures labelled with {labelled.attrs['method']} to {out}"
               + (f"; {len(failed)} failed (structures {', '.join(map(str, failed))})" if failed else ""))


@data_app.command("augment")
def data_augment(
    path: Annotated[Path, typer.Argument(help="An lmlp HDF5 structure file with a stored split.")],
    copies: Annotated[int, typer.Option(help="Number of displaced copies to label and add.")],
    sigma: Annotated[str, typer.Option(help="Range of the rms displacement per atom, Å (low,high).")] = "0.05,0.1",
    split: Annotated[str, typer.Option(help="Split whose structures are copied and which the copies join.")] = "train",
    method: Annotated[str, typer.Option(help="Reference method: that of the file (gfn2-xtb or pyscf).")] = "gfn2-xtb",
    seed: Annotated[int, typer.Option(help="Seed of the choice of structures and the displacements.")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Output file (default: rewrite PATH in place, atomically).")] = None,
) -> None:
    """Add labelled, randomly displaced copies of structures of one split (training data off the MD manifold)."""
    from lmlp.data import read_structures, write_structures
    from lmlp.reference.augment import augment
    from lmlp.reference.labellers import get_labeller

    low_high = _float_list("--sigma", sigma)
    if len(low_high) != 2:
        raise LmlpError(f"--sigma: got {sigma!r}, expected two displacements in Å, e.g. 0.05,0.1")
    s, _ = read_structures(path)
    try:
        s, n_failed = augment(s, copies, (low_high[0], low_high[1]), seed, get_labeller(method), split, progress=True)
    except LmlpError as exc:
        raise LmlpError(f"{path}: {exc}") from None
    s.attrs["augment_command"] = _command_line()
    target = out or path
    write_structures(target, s)
    typer.echo(f"wrote {target}: {copies - n_failed} displaced copies added to {split} "
               f"({n_failed} labelling failures, not stored); " + ", ".join(f"{k} {len(v)}" for k, v in s.split.items()))


@data_app.command("choose")
def data_choose(
    source: Annotated[Path, typer.Argument(help="An lmlp HDF5 file of SN2 structures (candidates).")],
    model: Annotated[Path, typer.Option(help="Trained model whose ensemble spread ranks the candidates.")],
    count: Annotated[int, typer.Option(help="Structures to choose.")],
    out: Annotated[Path, typer.Option(help="Text file for the chosen indices (input of data relabel --indices).")],
    split: Annotated[str, typer.Option(help="Choose among the structures of this split.")] = "train",
    bins: Annotated[int, typer.Option(help="Bins of the reaction coordinate r(C-X) - r(C-Y) per reaction.")] = 6,
    uncertain_share: Annotated[float, typer.Option(help="Share per cell taken by decreasing force uncertainty "
                                                        "(the rest at random).")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the random part.")] = 0,
) -> None:
    """Choose SN2 structures to label (e.g. with DFT): even over reactions and the reaction path, led by uncertainty."""
    from lmlp.data import read_structures
    from lmlp.fileio import atomic_write_text
    from lmlp.metrics import model_batch
    from lmlp.modelfile import load_model
    from lmlp.reference.relabel import choose_for_labelling
    from lmlp.reference.sn2 import coverage_cells
    from lmlp.uncertainty import structure_errors

    s, _ = read_structures(source)
    if split not in s.split:
        raise LmlpError(f"{source}: no split {split!r}; it has {sorted(s.split) or 'none'}")
    candidates = s.split[split]
    part = s.subset(candidates)
    ensemble, _ = load_model(model)
    uncertainty = structure_errors(ensemble, model_batch(ensemble, part))["force_uncertainty"]
    chosen = candidates[choose_for_labelling(coverage_cells(part, bins), uncertainty, count, uncertain_share, seed)]
    header = (f"# {count} of the {len(candidates)} {split} structures of {source}: even over reactions x {bins} bins "
              f"of r(C-X) - r(C-Y), {uncertain_share:g} of each cell by decreasing force uncertainty of {model}, "
              f"the rest at random (seed {seed}); in a random order, so that every first part is an even sample too\n")
    atomic_write_text(out, header + "\n".join(map(str, chosen)) + "\n")
    typer.echo(f"wrote {len(chosen)} structure indices to {out}")


@data_app.command("relabel")
def data_relabel(
    source: Annotated[Path, typer.Argument(help="An lmlp HDF5 structure file.")],
    out: Annotated[Path, typer.Argument(help="Output HDF5 file (new labels; split and trajectory ids kept).")],
    method: Annotated[str, typer.Option(help="Reference method: pyscf (DFT) or gfn2-xtb.")] = "pyscf",
    xc: Annotated[str, typer.Option(help="PySCF exchange-correlation functional.")] = "b3lyp",
    basis: Annotated[str, typer.Option(help="PySCF orbital basis (def2 ECPs beyond Kr).")] = "def2-svpd",
    density_fit: Annotated[bool, typer.Option(help="PySCF density fitting of the Coulomb and exchange integrals.")] = True,
    split: Annotated[Optional[str], typer.Option(help="Only the structures of this split of SOURCE.")] = None,
    indices: Annotated[Optional[Path], typer.Option(
        help="Text file of structure indices of SOURCE (whitespace-separated), labelled in that order.")] = None,
    chunk_size: Annotated[int, typer.Option(help="Structures per chunk file (the unit of resuming).")] = 10,
    workers: Annotated[int, typer.Option(help="Processes, one single-threaded calculation each.")] = 1,
    time_budget: Annotated[Optional[float], typer.Option(
        help="Minutes after which no new chunk starts; re-run the command to continue.")] = None,
) -> None:
    """Label stored structures with another method (e.g. DFT), resumably: re-run to continue."""
    import numpy as np

    from lmlp.data import read_structures
    from lmlp.reference.labellers import get_labeller
    from lmlp.reference.relabel import relabel

    if split is not None and indices is not None:
        raise LmlpError("give --split or --indices, not both")
    options = {"xc": xc, "basis": basis, "density_fit": density_fit} if method.lower() == "pyscf" else {}
    labeller = get_labeller(method, **options)
    chosen, selection = None, "all structures"
    if split is not None:
        s, _ = read_structures(source)
        if split not in s.split:
            raise LmlpError(f"{source}: no split {split!r}; it has {sorted(s.split) or 'none'}")
        chosen, selection = s.split[split], f"split {split}"
    elif indices is not None:
        try:
            chosen = np.loadtxt(indices, dtype=np.int64, ndmin=1)
        except (OSError, ValueError) as exc:
            raise LmlpError(f"{indices}: not a list of structure indices ({exc})") from None
        selection = f"indices from {indices.name}"
    report = relabel(source, out, labeller, chosen, chunk_size=chunk_size, workers=workers,
                     time_budget=None if time_budget is None else 60.0 * time_budget,
                     selection=selection, command=_command_line(), progress=True)
    typer.echo(f"{out}: {report.n_labelled} of {report.n_selected} structures labelled with {labeller.method} "
               f"({report.n_failed} failed SCFs and {report.n_inconsistent} labels inconsistent with the source's, "
               f"not stored); {report.chunks_done} of {report.chunks} chunks done"
               + ("" if report.complete else " - re-run the command to continue"))


@app.command("md")
def md_command(
    model: Annotated[Path, typer.Argument(help="A model file (model.pt).")],
    start: Annotated[Path, typer.Argument(help="Start structure: any file ASE reads (xyz, extxyz, ...) or lmlp .h5.")],
    ensemble: Annotated[str, typer.Option(
        help="nve (velocity Verlet), nvt (Langevin) or npt (MTK, isotropic; periodic cells).")] = "nve",
    temperature: Annotated[float, typer.Option(help="Start-velocity (and NVT/NPT bath) temperature, K.")] = 300.0,
    pressure: Annotated[float, typer.Option(help="NPT external pressure, bar.")] = 1.0,
    timestep: Annotated[float, typer.Option(help="Time step, fs.")] = 0.5,
    steps: Annotated[int, typer.Option(help="Number of MD steps.")] = 1000,
    out: Annotated[Optional[Path], typer.Option(help="ASE trajectory file (.traj) to write.")] = None,
    flagged: Annotated[Optional[Path], typer.Option(
        help="extxyz file for structures above the uncertainty thresholds (active learning).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the start velocities and the Langevin noise.")] = 0,
    friction: Annotated[float, typer.Option(help="Langevin friction (nvt), 1/fs.")] = 0.01,
    index: Annotated[int, typer.Option(help="Which structure of START to use.")] = 0,
    interval: Annotated[int, typer.Option(help="Write the trajectory every this many steps.")] = 10,
    max_flagged: Annotated[int, typer.Option(help="At most this many flagged structures.")] = 100,
    flag_interval: Annotated[int, typer.Option(help="At least this many steps between two flagged structures.")] = 10,
    energy_factor: Annotated[Optional[float], typer.Option(
        help="Energy threshold: per-atom energy std above this x the model's mean member validation RMSE, meV/atom "
             "(default: lmlp.calculator.ENERGY_FACTOR).")] = None,
    force_factor: Annotated[Optional[float], typer.Option(
        help="Force threshold: largest force-component std above this x the mean member validation force RMSE "
             "(default: lmlp.calculator.FORCE_FACTOR).")] = None,
    min_distance: Annotated[Optional[float], typer.Option(
        help="Closest interatomic distance of the training data, Å (default: the model file's, if stored); "
             "closer atoms are warned about and counted.")] = None,
    float64: Annotated[bool, typer.Option("--float64", help="Run the lMLP in float64 (tighter energy conservation).")] = False,
    threads: Annotated[int, typer.Option(
        help="Torch threads (0: torch's default); small molecules run fastest on 1.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    backend: Annotated[str, typer.Option(
        help="Calculator kernels: script (TorchScript), compile (torch.compile: fastest after a one-off "
             "compilation of tens of seconds) or eager.")] = "script",
    member_forces: Annotated[bool, typer.Option(
        "--member-forces/--mean-forces",
        help="Every member's forces (force uncertainty), or only the ensemble-mean forces: 1.4-1.7x faster for "
             "condensed systems, flagged by the energy uncertainty alone.")] = True,
) -> None:
    """Molecular dynamics with an lMLP ensemble (ASE); prints the summary (energy drift, uncertainty)."""
    import torch

    from lmlp.md import run_md

    summary = run_md(model, start, ensemble=ensemble.lower(), temperature_K=temperature, timestep_fs=timestep,
                     steps=steps, out_trajectory=out, seed=seed, flagged_path=flagged, friction_per_fs=friction,
                     start_index=index, trajectory_interval=interval, max_flagged=max_flagged,
                     flag_interval=flag_interval, **_given(energy_factor=energy_factor, force_factor=force_factor),
                     dtype=torch.float64 if float64 else None, min_distance=min_distance, threads=threads or None,
                     progress=progress, pressure_bar=pressure, backend=backend, member_forces=member_forces)
    typer.echo(summary.format())


@app.command("train")
def train_command(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config file (not with --resume).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the interrupted run in this directory.")] = None,
    continue_from: Annotated[Optional[Path], typer.Option(
        help="Continual learning: start from this model file (and the optimizer and selection state of the "
             "checkpoint_last.pt beside it) on the config's, possibly grown, data.")] = None,
    set_: SetOption = None,
) -> None:
    """Train an lMLP ensemble; writes the run directory and prints the RMSE table."""
    from lmlp import distributed
    from lmlp.config import load_config, parse_overrides
    from lmlp.train import format_table, train

    if (config is None) == (resume is None):
        raise LmlpError("give a config file, or --resume RUN_DIR (whose config.yaml is used), not both")
    if resume is not None and (continue_from is not None or set_):
        raise LmlpError("--resume continues a run as it was started; --continue-from and --set are for a new run")
    cfg = load_config(config or resume / "config.yaml", parse_overrides(set_ or []))
    with distributed.processes(cfg.training.device) as workers:
        result = train(cfg, resume=resume is not None, continue_from=continue_from, workers=workers)
    if workers.main:
        typer.echo(format_table(result))


@app.command("evaluate")
def evaluate_command(
    model: Annotated[Path, typer.Argument(help="A model file (model.pt).")],
    data: Annotated[Path, typer.Argument(help="Structures: .h5 or anything ASE reads with energies and forces.")],
    split: Annotated[Optional[str], typer.Option(help="Only this stored split, e.g. test.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON file for the table (default: beside the model).")] = None,
    uncertainty: Annotated[bool, typer.Option(
        "--uncertainty", help="Also report how the ensemble spread tells the error: Spearman correlation, and the "
                              "threshold that flags 90 % of the structures with error > 3x the model's test RMSE.")] = False,
    skip_invalid: SkipInvalid = False,
) -> None:
    """RMSE table of a model on a data set: ensemble and members, per label (reaction); also JSON."""
    from lmlp.data import load
    from lmlp.fileio import atomic_write_text
    from lmlp.modelfile import load_model
    from lmlp.metrics import evaluate_model, evaluation_json, format_evaluation

    ensemble, metadata = load_model(model)
    structures, problems = load(data, on_invalid="skip" if skip_invalid else "raise")
    _report_skipped(data, problems)
    if split is not None:
        structures = structures.split_subset(split)
    results = evaluate_model(ensemble, structures)
    typer.echo(format_evaluation(results))
    table = evaluation_json(results)
    if uncertainty:
        from lmlp.metrics import model_batch
        from lmlp.uncertainty import format_report, uncertainty_report

        reference = metadata.get("test_ensemble") or results["all"].ensemble
        report = uncertainty_report(ensemble, model_batch(ensemble, structures), reference["rmse_e"], reference["rmse_f"])
        typer.echo(format_report(report))
        table["uncertainty"] = report.as_dict()
    target = out or model.with_name(f"evaluation_{data.stem}{'_' + split if split else ''}.json")
    atomic_write_text(target, json.dumps(table, indent=2))
    typer.echo(f"written to {target}")


@app.command("compare")
def compare_command(
    config: Annotated[Path, typer.Argument(help="YAML config with a compare: section (variants, seeds, ...).")],
    optimizers: Annotated[Optional[str], typer.Option(
        help="Comma-separated variant names of the config to run (default: all).")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Trainings per variant (overrides compare.seeds).")] = None,
    lr_grid: Annotated[Optional[str], typer.Option(
        help="Comma-separated learning rates / maximal step sizes to try per variant, e.g. 1e-4,1e-3,1e-2,1e-1,1.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epoch budget of every variant (overrides training.epochs).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (overrides compare.out).")] = None,
) -> None:
    """Compare optimizers under identical conditions: ranked table with accuracy scores, CSV, JSON, plots."""
    from lmlp import distributed
    from lmlp.compare import compare
    from lmlp.config import load_config

    if seeds is not None and seeds < 1 or epochs is not None and epochs < 1:
        raise LmlpError("--seeds and --epochs must be at least 1")
    cfg = load_config(config)
    with distributed.processes(cfg.training.device):
        compare(cfg, variants=optimizers.split(",") if optimizers else None, seeds=seeds,
                lr_grid=_float_list("--lr-grid", lr_grid) if lr_grid else None, epochs=epochs, out=out)


def _given(**options: object) -> dict[str, object]:
    """The ``options`` given on the command line (not None): the others keep the API's defaults."""
    return {name: value for name, value in options.items() if value is not None}


def _float_list(option: str, text: str) -> list[float]:
    """Comma-separated positive numbers; LmlpError naming ``option`` otherwise."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise LmlpError(f"{option}: {text!r} is not a comma-separated list of numbers") from None
    if not all(v > 0 for v in values):
        raise LmlpError(f"{option}: {text!r} must contain only positive numbers")
    return values


@app.command("export")
def export_command(
    model: Annotated[Path, typer.Argument(help="A model file (model.pt).")],
    out: Annotated[Optional[Path], typer.Argument(help="Program file to write (default: MODEL with .pt2).")] = None,
    aoti: Annotated[bool, typer.Option(
        help="Also compile an AOTInductor package OUT with .aoti.pt2 for C++ (libtorch), for this CPU; "
             "takes about a minute.")] = False,
) -> None:
    """Export a model with torch.export (.pt2) for Python (torch.export.load) and, with --aoti, C++;
    no lmlp needed to run it (lmlp.export describes inputs and outputs)."""
    from lmlp.export import export_model
    from lmlp.modelfile import load_model

    target = out or model.with_suffix(".pt2")
    aoti_target = target.with_suffix(".aoti.pt2") if aoti else None
    if model.resolve() in (target.resolve(), aoti_target and aoti_target.resolve()):
        raise LmlpError(f"{model}: the export would overwrite the model file; name the output")
    loaded = load_model(model)[0]
    export_model(loaded, target, aoti_target)
    triples = "" if loaded.descriptor.moments else ", triples (2, Q)"
    typer.echo(f"wrote {target}{f' and {aoti_target}' if aoti else ''}: inputs numbers (N,), positions (N, 3) Å, "
               f"pairs (2, P), shifts (P, 3) Å{triples}; outputs energies (M,) eV, forces (M, N, 3) eV/Å, "
               f"virials (M, 3, 3) eV")


@config_app.command("check")
def config_check(config: Annotated[Path, typer.Argument(help="YAML config file.")], set_: SetOption = None) -> None:
    """Validate a config file."""
    from lmlp.config import load_config, parse_overrides

    load_config(config, parse_overrides(set_ or []))
    typer.echo(f"{config}: ok")


@config_app.command("show")
def config_show(config: Annotated[Path, typer.Argument(help="YAML config file.")], set_: SetOption = None) -> None:
    """Print the resolved config, every default filled in."""
    from lmlp.config import dump_config, load_config, parse_overrides

    typer.echo(dump_config(load_config(config, parse_overrides(set_ or []))), nl=False)


def _report_skipped(source: Path, problems: list) -> None:
    for p in problems:
        typer.echo(f"{source}: skipped structure {p.index}: {p.reason}", err=True)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except LmlpError as exc:
        typer.echo(f"lmlp: error: {exc}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        typer.echo("lmlp: interrupted", err=True)
        raise SystemExit(130) from None
