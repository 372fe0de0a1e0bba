"""Retention: ``trajscope analyze RUN --prune`` removes a raw snapshot once every pair that reads it
is analyzed, so that a long run recorded every step does not fill the disk (GPT-2 small: ~1 GB a
step).

A step s is read by up to three pairs: s (as x_t, with g_t and the minibatch), s − 1 (as x_{t+1},
with g_{t+1}) and s + 1 (as x_{t−1}). Its snapshot is removed (:func:`prunable`) when

* it is not kept: the final state, the reference point x*, x_0 (step 0, the distance from
  initialisation of every pair) and the steps the user keeps;
* its neighbourhood is settled: the run is closed, or a step after s + 1 is on disk (steps are
  written in order, so s − 1, s + 1 and s + 2 are then there or never will be);
* each of those pairs that exists is analyzed: in the analysis just made, so its result (and its
  reference part) is persisted.

Nothing that is not analyzed is ever removed, whenever the process is killed (:func:`prune`): the
persisted results the step's pairs need are made durable (``fsync``) first; then the step is added
to the run's ``pruned.json`` (written whole, renamed into place, made durable); only then is its
file removed, and after it, in a sharded run, its parts in ``shards/``. A kill between the last
two leaves a listed step whose file is still there: it reads as recorded, and the next prune
removes it (a kill among the removals leaves parts without their step file, which a later prune
removes too). Pruned pairs are served from their persisted results (``Run.pruned_pairs``); an
analysis under other settings cannot recompute them, and lists them as skipped, naming
``pruned.json``. The HDF5 storage keeps every step in one file and cannot give one
back: convert the run to safetensors first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from trajscope import runformat as fmt
from trajscope.analysis.persist import pair_path, reference_path
from trajscope.errors import AnalysisError
from trajscope.store.run import Run, open_run
from trajscope.store.shards import part_files

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["check_prunable", "prunable", "prune", "pruner"]


def prunable(r: Run, analyzed: Iterable[int], *, keep: Iterable[int] = (), reference: int | None = None) -> list[int]:
    """The steps on disk whose snapshot may be removed now (see the module docstring): ``analyzed``
    holds the start steps of the pairs whose results are persisted; ``reference``, the step of x*."""
    done = set(analyzed)
    kept = set(keep) | {0} | {s for s in (r.final_step, reference) if s is not None}
    have = set(r.steps) | r.pruned
    closed = r.status != fmt.STATUS_RECORDING
    last = max(have, default=-1)
    out = []
    for s in r.steps:
        if s not in kept and (closed or s + 2 <= last) and _readers(s, have, r.final_step) <= done:
            out.append(s)
    return out


def _readers(s: int, have: set[int], final: int | None) -> set[int]:
    """The pairs (t, t+1) that read step s among the steps ``have``: t = s − 1, s, s + 1."""
    return {t for t in (s - 1, s, s + 1) if t in have and t + 1 in have and t != final}


def prune(r: Run, analyzed: Iterable[int], pairs_dir: Path, *, keep: Iterable[int] = (),
          reference: int | None = None) -> list[int]:
    """Remove the snapshots :func:`prunable` names, safely (see the module docstring); the steps removed.

    Raises:
        AnalysisError: a run stored as HDF5.
    """
    check_prunable(r)
    steps = prunable(r, analyzed, keep=keep, reference=reference)
    if not steps:
        return []
    have = set(r.steps) | r.pruned
    for t in sorted(set().union(*(_readers(s, have, r.final_step) for s in steps))):
        for path in (pair_path(pairs_dir, t), reference_path(pairs_dir, t)):
            _fsync(path)
    _fsync(pairs_dir)
    listed = r.path / fmt.PRUNED
    fmt.atomic_write_bytes(listed, json.dumps({"steps": sorted(r.pruned | set(steps))}).encode())
    _fsync(listed)
    _fsync(r.path)
    # Each step file first: a step is on disk while its step file is, so removing a part first
    # would show a reader a damaged step. The parts of earlier prunes killed before theirs go too.
    for path in [*(r.storage.location(s) for s in steps), *part_files(r.path, r.pruned | set(steps))]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    _fsync(r.path / fmt.STEPS_DIR)
    _fsync(r.path / fmt.SHARDS_DIR)
    return steps


def pruner(path: Path, out: str | Path | None, keep: str | None,
           echo: Callable[[str], None] | None) -> Callable[[xr.Dataset], None]:
    """What prunes the run at ``path`` after each analysis of it (``trajscope analyze --prune``): its
    Dataset names the pairs persisted under ``out`` (default ``RUN/analysis``); ``keep``
    (``START:STOP[:STRIDE]``) names steps to keep; one line to ``echo`` per prune. Checks the run's
    storage at once."""
    from trajscope.analysis.plan import select_steps

    check_prunable(open_run(path))

    def after(ds: xr.Dataset) -> None:
        r = open_run(path)  # the steps on disk now
        reference = json.loads(str(ds.attrs.get("probe", "{}"))).get("reference_step")
        pairs_dir = (Path(out) if out else path / fmt.ANALYSIS_DIR) / fmt.PAIRS_DIR
        removed = prune(r, [int(t) for t in ds["step"].values], pairs_dir,
                        keep=select_steps(r.steps, keep) if keep else (), reference=reference)
        if removed and echo is not None:
            echo(f"pruned {len(removed)} snapshot(s) (steps {removed[0]}-{removed[-1]}); listed in {fmt.PRUNED}")

    return after


def check_prunable(r: Run) -> None:
    """Raise AnalysisError unless ``r`` keeps each step in a file of its own (safetensors)."""
    if r.storage.kind != fmt.STORAGE_SAFETENSORS:
        raise AnalysisError(f"{r.path}: --prune removes step files, and this run keeps its steps in one HDF5 "
                            "file; convert it first (trajscope convert RUN --to safetensors)")


def _fsync(path: Path) -> None:
    """Make ``path`` (a file or a directory) durable; a missing file is nothing to sync."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
