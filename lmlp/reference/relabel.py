"""New reference labels for stored structures (e.g. DFT for GFN2-xTB-sampled data), resumably.

``relabel`` computes energies and forces with another labeller for chosen structures of an lmlp
HDF5 file and writes them, with the source's labels, trajectory ids and split, to a new file.
The work is cut into chunks of a few structures; each finished chunk is its own file under
``<out>.parts/``, so an interrupted run (or one stopped by its time budget) loses at most the chunk
in progress and the next run continues. Structures whose SCF fails are counted and left out.
Until every chunk is done, ``out`` holds what is finished (attribute ``complete`` "false"; rewritten
after every chunk), so partial progress can be used and shipped as it grows.
"""

from __future__ import annotations

import copy
import hashlib
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from lmlp.data.hdf5 import read_structures, write_structures
from lmlp.data.structures import StructureSet, concatenate
from lmlp.errors import LmlpError
from lmlp.reference.labellers import Labeller, label_structures


MAX_SHIFT_DEVIATION = 1.0
"""eV/atom. Two reasonable methods' energies of one composition differ by a nearly constant shift
(B3LYP − GFN2-xTB over the SN2 structures of one reaction: within ±0.15 eV/atom). A new label
whose shift from the source label is further than this from the median shift of its composition
is an SCF that converged to a wrong state (seen: F⁻ 10 Å from CH₃I, 82 eV/atom above the others,
20 eV/Å forces) and is left out as inconsistent."""


@dataclass(frozen=True)
class RelabelReport:
    """What a ``relabel`` call did: structures chosen, labelled so far (all runs), failed SCFs,
    labels left out as inconsistent with the source (``inconsistent_labels``), chunks done by this
    call and in total, its wall time (s) and whether every chunk is done."""

    n_selected: int
    n_labelled: int
    n_failed: int
    n_inconsistent: int
    chunks_done_now: int
    chunks_done: int
    chunks: int
    seconds: float
    complete: bool


@dataclass(frozen=True)
class _Chunk:
    """Structures ``indices`` of the source, labelled into ``path``."""

    index: int
    indices: np.ndarray
    path: Path


def relabel(
    source: Path, out: Path, labeller: Labeller, indices: np.ndarray | None = None, chunk_size: int = 20,
    workers: int = 1, time_budget: float | None = None, selection: str = "", command: str = "",
    progress: bool = False,
) -> RelabelReport:
    """Label structures ``indices`` (default all) of the lmlp HDF5 file ``source`` with ``labeller``.

    Args:
        source: lmlp HDF5 file; its split and trajectory ids carry over to the chosen structures.
        out: output file; chunk files go to ``<out>.parts/`` and are removed once all are done.
        labeller: the reference method (e.g. ``PySCFLabeller``), run single-threaded per worker.
        indices: (n,) structure indices of ``source`` in the order to label them.
        chunk_size: structures per chunk file.
        workers: processes labelling chunks at once.
        time_budget: seconds after which no further chunk is started (each call finishes at least
            one chunk, with one worker; None: run to the end).
        selection: how ``indices`` were chosen, stored as provenance (as is ``command``).
        progress: a line on stderr per finished chunk.

    A restarted run must use the same source, method and indices (checked via a settings hash).
    """
    s, _ = read_structures(source)
    indices = np.arange(len(s)) if indices is None else np.asarray(indices, dtype=np.int64)
    if not len(indices) or indices.min() < 0 or indices.max() >= len(s) or len(np.unique(indices)) != len(indices):
        raise LmlpError(f"{source}: the structure indices must be distinct and in 0..{len(s) - 1}")
    if chunk_size < 1 or workers < 1:
        raise LmlpError(f"chunk size and workers must be >= 1, got {chunk_size} and {workers}")
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    key = _settings_key(s, labeller, indices, chunk_size)
    chunks = [_Chunk(k, indices[a:a + chunk_size], parts / f"chunk_{k:05d}.h5")
              for k, a in enumerate(range(0, len(indices), chunk_size))]
    parts.mkdir(parents=True, exist_ok=True)
    _check_parts(parts, key)
    start = time.monotonic()
    todo = [c for c in chunks if not c.path.exists()]

    def write_out() -> tuple[list[StructureSet], StructureSet | None, bool]:
        """``out`` from every finished chunk; those chunks' structures, what was written (None if
        nothing is finished) and whether all are done."""
        finished = [c for c in chunks if c.path.exists()]
        labelled = [read_structures(c.path)[0] for c in finished]
        complete = len(finished) == len(chunks)
        merged = None
        if labelled:
            merged = _merged(s, labelled, len(finished), labeller, selection, command, len(indices), complete)
            write_structures(out, merged)
        return labelled, merged, complete

    done_now = _label_chunks(s, todo, labeller, key, workers, start, time_budget, progress, write_out)
    labelled, merged, complete = write_out()
    n_failed = sum(int(p.attrs["n_failed_labels"]) for p in labelled)
    n_inconsistent = 0 if merged is None else int(merged.attrs["n_inconsistent_labels"])
    finished = len(labelled)
    if complete:
        for c in chunks:
            c.path.unlink()
        (parts / "settings").unlink()
        parts.rmdir()
    return RelabelReport(len(indices), 0 if merged is None else len(merged), n_failed, n_inconsistent,
                         done_now, finished, len(chunks), time.monotonic() - start, complete)


def inconsistent_labels(new: StructureSet, old: StructureSet) -> np.ndarray:
    """(S,) bool: the structures whose energy shift new − old (eV) is more than
    ``MAX_SHIFT_DEVIATION`` per atom from the median shift of their composition (compositions with
    at least 3 structures; ``new`` and ``old`` hold the same structures)."""
    shift = new.energy - old.energy
    n_atoms = np.diff(new.offsets)
    elements, element = np.unique(new.numbers, return_inverse=True)
    counts = np.zeros((len(new), len(elements)), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(new)), n_atoms), element), 1)
    _, composition = np.unique(counts, axis=0, return_inverse=True)
    bad = np.zeros(len(new), dtype=bool)
    for c in np.unique(composition):
        members = np.flatnonzero(composition == c)
        if len(members) >= 3:
            deviation = np.abs(shift[members] - np.median(shift[members])) / n_atoms[members]
            bad[members] = deviation > MAX_SHIFT_DEVIATION
    return bad


def choose_for_labelling(
    cells: np.ndarray, uncertainty: np.ndarray, n: int, uncertain_share: float = 0.5, seed: int = 0,
) -> np.ndarray:
    """Indices of ``n`` structures to label, spread over coverage cells and led by uncertainty.

    Args:
        cells: (S,) int coverage cell of each candidate (e.g. reaction × bin of the reaction
            coordinate); the ``n`` are dealt as evenly as the cells' sizes allow.
        uncertainty: (S,) the current model's uncertainty (e.g. the ensemble's force spread).
        n: structures to choose (at most S).
        uncertain_share: within a cell, this share is taken in order of decreasing uncertainty, the
            rest at random from the remaining candidates (so that labels also cover what the
            ensemble agrees on, e.g. where all members are wrong alike).
        seed: seed of the random part.

    Returns the chosen indices (n,) in a seeded random order, so that every first part of them is
    an even sample too (labelling in that order ships usable partial sets, and nested subsets).
    """
    cells, uncertainty = np.asarray(cells), np.asarray(uncertainty, dtype=float)
    if not 0 < n <= len(cells) or not 0.0 <= uncertain_share <= 1.0:
        raise LmlpError(f"choose 1..{len(cells)} structures with an uncertain share in [0, 1], got {n} and {uncertain_share}")
    ids, cell_of = np.unique(cells, return_inverse=True)
    sizes = np.bincount(cell_of)
    quota = np.zeros(len(ids), dtype=np.int64)
    while quota.sum() < n:  # water-filling: every cell gets the same share, capped by its size
        open_cells = np.flatnonzero(quota < sizes)
        extra = max(1, (n - int(quota.sum())) // len(open_cells))
        for c in open_cells[np.argsort(quota[open_cells], kind="stable")]:
            take = min(extra, sizes[c] - quota[c], n - int(quota.sum()))
            quota[c] += take
            if quota.sum() == n:
                break
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(len(ids)):
        members = np.flatnonzero(cell_of == c)
        by_uncertainty = members[np.argsort(-uncertainty[members], kind="stable")]
        k_uncertain = int(round(uncertain_share * quota[c]))
        rest = by_uncertainty[k_uncertain:]
        chosen += [by_uncertainty[:k_uncertain], rng.choice(rest, quota[c] - k_uncertain, replace=False)]
    return rng.permutation(np.concatenate(chosen))


def _settings_key(s: StructureSet, labeller: Labeller, indices: np.ndarray, chunk_size: int) -> str:
    """A hash of what the chunks depend on: source positions, method, indices and chunk size."""
    h = hashlib.sha256()
    for array in (s.numbers, s.positions, s.offsets, indices):
        h.update(np.ascontiguousarray(array).tobytes())
    h.update(f"{labeller.method}|{labeller.program}|{labeller.program_version}|{chunk_size}".encode())
    return h.hexdigest()


def _check_parts(parts: Path, key: str) -> None:
    """Record ``key`` in a new parts folder, or check that an existing one was made with it."""
    marker = parts / "settings"
    if not marker.exists():
        marker.write_text(key)
    elif marker.read_text() != key:
        raise LmlpError(f"{parts} holds chunks of another labelling run (other source, method, structures or "
                        f"chunk size); delete it to start over")


def _label_chunks(s: StructureSet, todo: list[_Chunk], labeller: Labeller, key: str, workers: int,
                  start: float, time_budget: float | None, progress: bool, finished_one: Callable[[], object]) -> int:
    """Label the chunks ``todo`` until done or out of time, calling ``finished_one`` after each
    chunk but the last; return how many were finished."""
    done = 0

    def in_time() -> bool:
        return time_budget is None or done == 0 or time.monotonic() - start < time_budget

    if workers == 1:
        for c in todo:
            if not in_time():
                break
            if done:
                finished_one()
            _say(_label_chunk(s.subset(c.indices), c, labeller, key), progress)
            done += 1
        return done
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        pending = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < workers and in_time():
                c = queue.pop(0)
                pending[pool.submit(_label_chunk, s.subset(c.indices), c, labeller, key)] = c
            if not pending:
                break
            finished = next(as_completed(pending))
            pending.pop(finished)
            _say(finished.result(), progress)
            done += 1
            if queue or pending:
                finished_one()
    return done


def _label_chunk(part: StructureSet, chunk: _Chunk, labeller: Labeller, key: str) -> str:
    """Label one chunk single-threaded with a fresh copy of ``labeller`` (so that labels do not
    depend on the worker count) and write its file atomically; return a summary line."""
    labeller = copy.copy(labeller)
    images = [part.atoms(i) for i in range(len(part))]
    t0 = time.process_time()  # CPU time of this single-threaded worker: the cost, whatever else runs
    labelled, failed = label_structures(images, labeller)
    seconds = time.process_time() - t0
    kept = np.delete(np.arange(len(part)), failed)
    new = replace(StructureSet.from_atoms(labelled) if labelled else part.subset(kept), split={},
                  attrs={"settings": key, "source_indices": ",".join(map(str, chunk.indices[kept])),
                         "n_failed_labels": str(len(failed)), "seconds": f"{seconds:.1f}"})
    write_structures(chunk.path, new)
    return (f"chunk {chunk.index}: {len(labelled)} labelled, {len(failed)} failed, "
            f"{seconds / max(len(part), 1):.1f} CPU s/structure")


def _merged(s: StructureSet, labelled: list[StructureSet], n_chunks: int, labeller: Labeller,
            selection: str, command: str, n_selected: int, complete: bool) -> StructureSet:
    """The finished chunks joined, without ``inconsistent_labels``, with the source's split restricted to
    them and provenance."""
    merged = concatenate(labelled)
    source_index = np.concatenate([np.array(p.attrs["source_indices"].split(","), dtype=np.int64)
                                   if p.attrs["source_indices"] else np.zeros(0, np.int64) for p in labelled])
    inconsistent = inconsistent_labels(merged, s.subset(source_index))
    merged, dropped, source_index = merged.subset(np.flatnonzero(~inconsistent)), source_index[inconsistent], \
        source_index[~inconsistent]
    if s.trajectory is not None:
        merged.trajectory = s.trajectory[source_index]
    merged.split = {name: np.flatnonzero(np.isin(source_index, idx)) for name, idx in s.split.items()}
    seconds = sum(float(p.attrs["seconds"]) for p in labelled)
    merged.attrs = {
        "method": labeller.method, "program": labeller.program, "program_version": labeller.program_version,
        "sampling": s.attrs.get("sampling", ""), "relabelled_from": f"{s.attrs.get('method', '?')} data",
        "selection": selection, "command": command, "n_selected": str(n_selected),
        "n_failed_labels": str(sum(int(p.attrs["n_failed_labels"]) for p in labelled)),
        "n_inconsistent_labels": str(len(dropped)), "inconsistent_source_indices": ",".join(map(str, dropped)),
        "labelling_seconds": f"{seconds:.0f}", "complete": "true" if complete else "false",
        "chunks": str(n_chunks),
    }
    return merged


def _say(line: str, progress: bool) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)
