"""Labelling a file of structures (e.g. those ``lmlp md`` flagged) with a reference method, as
``lmlp data label`` does: energies eV, forces eV/Å, written as an lmlp HDF5 data set."""

from __future__ import annotations

import os
from dataclasses import replace

from ase import Atoms

from lmlp.data import StructureSet, stratified_split, write_structures
from lmlp.data.convert import read_images
from lmlp.errors import LmlpError


def label_file(
    source: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "gfn2-xtb",
    charge: int | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    command: str = "",
    progress: bool = False,
) -> tuple[StructureSet, list[int]]:
    """Label the structures of ``source`` (e.g. a flagged extxyz file) and write them to ``out`` (HDF5).

    The reference method and its settings are those of ``lmlp data generate``
    (``lmlp.reference.labellers``, single-threaded). The total charge of a structure
    is its ``info["charge"]``, else ``charge`` (e); without either it is an error (SN2 structures
    are −1, neutral molecules 0: no default guesses it). Labels come from ``info["label"]`` (else
    the formula). The output gets a ``test_fraction`` train/test split stratified by label
    (seeded), and the attributes method, program, program_version, command and source. Structures
    whose reference calculation fails are left out; their indices are returned.
    """
    from lmlp.reference.labellers import get_labeller, label_structures

    images = _read_images(source)
    for i, atoms in enumerate(images):
        if "charge" not in atoms.info:
            if charge is None:
                raise LmlpError(f"{source}: structure {i} has no charge in its info; give the total charge "
                                f"(e.g. --charge -1 for SN2 structures)")
            atoms.info["charge"] = charge
        atoms.info.pop("split", None)
    labeller = get_labeller(method)
    labelled, failed = label_structures(images, labeller, progress)
    if not labelled:
        raise LmlpError(f"{source}: every reference calculation failed ({len(failed)} structures)")
    s = StructureSet.from_atoms(labelled, source=str(source))
    s = replace(s, split=stratified_split(s.label, test_fraction, seed),
                attrs={"method": labeller.method, "program": labeller.program,
                       "program_version": labeller.program_version, "command": command,
                       "source": str(source), "n_failed_labels": str(len(failed))})
    write_structures(out, s)
    return s, failed


def _read_images(source: str | os.PathLike) -> list[Atoms]:
    """Every structure of an ASE-readable file (positions and info only)."""
    return [Atoms(a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc, info=dict(a.info))
            for a in read_images(source)]
