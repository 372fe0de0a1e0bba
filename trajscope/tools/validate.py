"""``trajscope validate``: check every file of a run directory and list each problem found.

A *problem* is damage or inconsistency: something the analysis will skip or refuse (a damaged or
missing snapshot, a snapshot that disagrees with the manifest, an unreadable ``scalars.jsonl``).
A *warning* is something worth knowing that is not damage (the run is still recording or crashed,
a leftover temporary file, non-finite values that training itself produced). Validation reads
files only: nothing is imported or executed unless an objective is passed explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from trajscope import runformat as fmt
from trajscope.errors import TrajscopeError, one_line
from trajscope.store import Run, Snapshot, coverage, open_run, read_snapshot
from trajscope.store.names import dtypes, mismatches, shapes
from trajscope.store.run import step_ranges
from trajscope.store.safetensors import header_meta
from trajscope.store.shards import part_paths

__all__ = ["ValidationReport", "validate_run"]

T = TypeVar("T")


@dataclass
class ValidationReport:
    """What :func:`validate_run` found. ``ok`` when there is no problem (warnings allowed)."""

    path: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """The report as printed by ``trajscope validate`` (one line per finding)."""
        out = [one_line(n) for n in self.notes]
        out += [f"warning: {one_line(w)}" for w in self.warnings]
        out += [f"problem: {one_line(p)}" for p in self.problems]
        n = len(self.problems)
        if n:
            out.append(f"{n} problem{'s' if n > 1 else ''} found")
        else:  # a crashed or still-recording run is sound but must not read as plain "ok"
            w = len(self.warnings)
            out.append("ok" if not w else f"ok: no damage, {w} warning{'s' if w > 1 else ''}")
        return out


def validate_run(path: str | Path, *, objective: Any = None, quick: bool = False) -> ValidationReport:
    """Check the run directory ``path`` against ``docs/format.md``; never raises for bad input.

    Args:
        path: the run directory.
        objective: also check this objective (``"module:function"``, factory or Objective)
            against the run's parameters. ``None``: import nothing.
        quick: check snapshot headers and sizes only, without reading the tensors.
    """
    rep = ValidationReport(Path(path))
    _leftover_files(Path(path), rep)
    try:
        run = open_run(path)
    except TrajscopeError as exc:
        rep.problems.append(str(exc))
        steps_dir = Path(path) / fmt.STEPS_DIR
        if steps_dir.is_dir() and not steps_dir.is_symlink():  # still check what can be checked
            for step, file in _step_files(steps_dir, rep):
                _check_step(file, step, None, rep, quick)
            _check_shard_files(Path(path), rep)
        return rep

    note = run.incomplete_note()
    if note is not None:  # analyzable up to its last complete snapshot: a warning, not damage
        rep.warnings.append(f"{run.path / fmt.MANIFEST}: {note}")
    _check_scalars(run, rep)
    steps_dir = run.path / fmt.STEPS_DIR
    if run.storage.kind != fmt.STORAGE_SAFETENSORS:
        # one container file (HDF5): check every committed row through the same reader
        for step in run.steps:
            _check_step(run.step_path(step), step, run, rep, quick=False)
        _check_uncommitted(run, rep)
    elif not steps_dir.is_dir():
        if run.status == fmt.STATUS_COMPLETE or run.scalars:
            rep.problems.append(f"{steps_dir}: missing (the run has no snapshots)")
    else:
        for step, file in _step_files(steps_dir, rep):
            _check_step(file, step, run, rep, quick)
        _check_shard_files(run.path, rep)
    for s in coverage.missing_steps(run):
        rep.problems.append(
            f"step {s}: {run.step_path(s)} is missing although the run recorded it; the pairs "
            f"that need it are lost"
        )
    if objective is not None:
        from trajscope.objective import check_run_objective, resolve_objective

        try:
            check_run_objective(resolve_objective(objective, run.objective, run), run.manifest)
        except TrajscopeError as exc:
            rep.problems.append(f"objective: {exc}")
    lost = coverage.lost_pairs(run)
    rep.notes.append(
        f"{run.path}: status {run.status}, {len(run.steps)} snapshot(s) ({step_ranges(run.steps)}), "
        f"{len(run.pairs)} analyzable pair(s)" + (f", {len(lost)} lost" if lost else "")
    )
    return rep


def _check_uncommitted(run: Run, rep: ValidationReport) -> None:
    """Rows of a container whose commit never reached the disk: invisible to readers, worth a
    warning (like a leftover temporary file)."""
    count = getattr(run.storage, "uncommitted_rows", None)
    try:
        n = count() if count is not None else 0
    except TrajscopeError as exc:
        rep.problems.append(str(exc))
        return
    if n:
        rep.warnings.append(f"{run.path / fmt.HDF5_FILE}: {n} row(s) without a step number (a write that "
                            "failed or was cut off before its commit); ignored")


def _leftover_files(run_dir: Path, rep: ValidationReport) -> None:
    """Temporary files an interrupted write left in the run directory: the manifest's
    (``.trajscope.json.tmp-<pid>``) and ``trajscope convert``'s (``.trajectory.h5.converting``,
    ``.steps.converting``). Readers ignore them, so each is a warning that says what it is and that
    it may be deleted, never a problem: they are no damage to the run."""
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return  # not a readable directory: open_run says so
    converting = {f".{fmt.HDF5_FILE}.converting", f".{fmt.STEPS_DIR}.converting"}
    for name in names:
        if name.startswith(f".{fmt.MANIFEST}.tmp-"):
            what = "leftover temporary file of an interrupted manifest write (harmless; may be deleted)"
        elif name in converting:
            what = ("left by an interrupted `trajscope convert` (harmless; may be deleted unless a convert "
                    "of this run is running)")
        else:
            continue
        rep.warnings.append(f"{run_dir / one_line(name)}: {what}")


def _step_files(steps_dir: Path, rep: ValidationReport) -> list[tuple[int, Path]]:
    return sorted((step, steps_dir / name) for name, step in _named_files(steps_dir, fmt.parse_step_filename, rep))


def _named_files(where: Path, parse: Callable[[str], T | None], rep: ValidationReport) -> list[tuple[str, T]]:
    """The files of ``where`` whose name ``parse`` reads, with what it reads, in name order; every
    other file a warning (a leftover temporary file of an interrupted write, or an unexpected one),
    a directory that cannot be listed a problem."""
    try:
        names = sorted(os.listdir(where))
    except OSError as exc:
        rep.problems.append(f"{where}: cannot list ({exc.strerror})")
        return []
    out = []
    for name in names:
        parsed = parse(name)
        if parsed is not None:
            out.append((name, parsed))
        elif name.startswith(".") and ".tmp-" in name:
            rep.warnings.append(f"{where / one_line(name)}: leftover temporary file of an interrupted write "
                                "(harmless; may be deleted)")
        else:
            rep.warnings.append(f"{where / one_line(name)}: unexpected file (ignored)")
    return out


def _check_shard_files(run_dir: Path, rep: ValidationReport) -> None:
    """The files of ``shards/`` that no snapshot reads, a warning each (readers ignore them): a
    part whose step file does not exist (a step whose recording never completed, or a prune killed
    between its removals), a part its step file does not list, a leftover temporary file, anything
    else. A missing or damaged part of a step is a problem, found when the step is read."""
    where = run_dir / fmt.SHARDS_DIR
    if not where.is_dir() or where.is_symlink():
        return
    listed: dict[int, set[int] | None] = {}  # step → the ranks its step file lists
    for name, (step, rank) in _named_files(where, fmt.parse_shard_filename, rep):
        file = where / name
        step_file = run_dir / fmt.STEPS_DIR / fmt.step_filename(step)
        if not step_file.exists():
            rep.warnings.append(f"{file}: part of a snapshot that was never completed (rank {rank}, step {step}): "
                                "harmless, may be deleted")
            continue
        if step not in listed:
            listed[step] = _listed_ranks(step_file)
        if (ranks := listed[step]) is not None and rank not in ranks:
            rep.warnings.append(f"{file}: part of rank {rank}, which {step_file} does not list in 'shards' "
                                "(ignored; may be deleted)")


def _listed_ranks(step_file: Path) -> set[int] | None:
    """The ranks other than 0 whose parts the step file lists in ``"shards"``; None when it cannot
    be read (its read reports that)."""
    try:
        meta = header_meta(fmt.read_safetensors_header(step_file), step_file)
        return {r for r, _ in part_paths(step_file, meta)} if "shards" in meta else set()
    except TrajscopeError:
        return None


def _check_step(file: Path, step: int, run: Run | None, rep: ValidationReport, quick: bool) -> None:
    if quick:  # headers only: the step file's, and those of the parts it lists
        try:
            meta = header_meta(fmt.read_safetensors_header(file), file)
            for _, part in part_paths(file, meta) if "shards" in meta else []:
                fmt.read_safetensors_header(part)
        except TrajscopeError as exc:
            rep.problems.append(str(exc))
        return
    try:
        snap = read_snapshot(file)
    except TrajscopeError as exc:
        rep.problems.append(str(exc))
        return
    if run is None:
        return
    _check_against_manifest(file, snap, run, rep)
    _check_finite(file, snap, rep)


def _check_against_manifest(file: Path, snap: Snapshot, run: Run, rep: ValidationReport) -> None:
    m = run.manifest
    specs = {q["name"]: q for q in m["params"]}
    final = m.get("final_step")
    if snap.kind == fmt.KIND_FINAL and final is not None and final != snap.step:
        rep.problems.append(f"{file}: holds a final state, but the manifest's final_step is {final}")
    if final == snap.step and snap.kind != fmt.KIND_FINAL:
        rep.problems.append(f"{file}: the manifest names step {final} final, but the file holds a "
                            "training step")
    found = mismatches({n: q["shape"] for n, q in specs.items()}, shapes(snap.params),
                       expected_dtypes={n: q.get("dtype") for n, q in specs.items()},
                       actual_dtypes=dtypes(snap.params))
    for mm in found:
        if mm.kind == "missing":
            rep.problems.append(f"{file}: parameter {mm.name!r} is missing")
        elif mm.kind == "shape":
            rep.problems.append(f"{file}: parameter {mm.name!r} has shape {list(mm.actual)}, manifest says "
                                f"{specs[mm.name]['shape']}")
        elif mm.kind == "dtype":
            rep.problems.append(f"{file}: parameter {mm.name!r} is {mm.actual}, manifest says {mm.expected}")
        else:
            rep.problems.append(f"{file}: parameter {mm.name!r} is not in the manifest")
    if snap.kind == fmt.KIND_STEP:
        if snap.batch is None:
            rep.problems.append(f"{file}: training step without its minibatch (batch_tree missing)")
        _check_grads(file, snap, run, specs, rep)


def _check_grads(file: Path, snap: Snapshot, run: Run, specs: dict[str, Any], rep: ValidationReport) -> None:
    """A step's gradients as the manifest's ``grads`` says: stored (``grad/`` tensors of trainable
    parameters, each of its parameter's shape) or, with ``"grads": false``, named only
    (``grad_names``, trainable parameters)."""
    if not run.grads_recorded and snap.unstored_grad_names is None:
        rep.problems.append(f"{file}: the manifest says the run stores no gradients ('grads': false), but the "
                            "snapshot " + ("holds grad/ tensors" if snap.grads else "lacks 'grad_names'"))
    elif run.grads_recorded and snap.unstored_grad_names is not None:
        rep.problems.append(f"{file}: holds 'grad_names' (a run that stores no gradients), but the manifest "
                            "says the run stores them ('grads' true or absent)")
    trains = set(snap.trainable) if snap.trainable is not None else None  # the step's own set
    for name in snap.grad_names:
        p, g = snap.params.get(name), snap.grads.get(name)
        if p is None or not (name in trains if trains is not None else specs.get(name, {}).get("trainable", True)):
            rep.problems.append(f"{file}: gradient {name!r} of a parameter the run does not train")
        elif g is not None and g.shape != p.shape:
            rep.problems.append(
                f"{file}: gradient {name!r} has shape {list(g.shape)}, parameter has {list(p.shape)}"
            )


def _check_finite(file: Path, snap: Snapshot, rep: ValidationReport) -> None:
    for what, tensors in (("parameter", snap.params), ("gradient", snap.grads)):
        for name, t in tensors.items():
            if t.is_floating_point() and t.numel():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    rep.warnings.append(
                        f"{file}: {what} {name!r} holds {bad} non-finite value(s) (NaN/Inf); the "
                        "affected metrics of its pairs will be NaN and flagged"
                    )
    if snap.loss is not None and not torch.isfinite(torch.tensor(snap.loss)):
        rep.warnings.append(f"{file}: recorded loss is {snap.loss}")


def _check_scalars(run: Run, rep: ValidationReport) -> None:
    path = run.path / fmt.SCALARS
    if not path.exists():
        rep.warnings.append(f"{path}: missing (no per-step losses; missing snapshots cannot be detected)")
        return
    try:
        lines = run.scalars
    except TrajscopeError as exc:
        rep.problems.append(str(exc))
        return
    prev = -1
    for rec in lines:
        step = rec["step"]
        if step < prev:
            rep.problems.append(f"{path}: step {step} follows step {prev}; steps must not go back")
            break
        prev = step
