"""``trajscope validate``: check every file of a run directory and list each problem found."""

from __future__ import annotations

from pathlib import Path

from trajscope import format as fmt
from trajscope.errors import TrajscopeError
from trajscope.run import open_run, read_snapshot

__all__ = ["validate_run"]


def validate_run(path: str | Path) -> tuple[list[str], list[str]]:
    """Return (problems, notes). A problem makes the run (or part of it) unusable or incomplete."""
    problems: list[str] = []
    notes: list[str] = []
    try:
        run = open_run(path)
    except TrajscopeError as exc:
        return [str(exc)], notes
    if run.status != fmt.STATUS_COMPLETE:
        problems.append(
            f"{run.path / fmt.MANIFEST}: status is {run.status!r}, the run is incomplete "
            f"(analysis covers steps up to the last complete snapshot)"
        )
    try:
        _ = run.scalars
    except TrajscopeError as exc:
        problems.append(str(exc))
    specs = {p["name"]: p for p in run.manifest["params"]}
    for step in run.steps:
        try:
            snap = read_snapshot(run.step_path(step))
        except TrajscopeError as exc:
            problems.append(f"step {step}: {exc}")
            continue
        if snap.step != step:
            problems.append(f"{run.step_path(step)}: file is named step {step} but holds step {snap.step}")
        for name, spec in specs.items():
            if name not in snap.params:
                problems.append(f"step {step}: parameter {name!r} missing")
            elif list(snap.params[name].shape) != list(spec["shape"]):
                problems.append(
                    f"step {step}: parameter {name!r} has shape {list(snap.params[name].shape)}, "
                    f"manifest says {spec['shape']}"
                )
    notes.append(f"{run.path}: {len(run.steps)} snapshots, {len(run.pairs)} analyzable pairs, status {run.status}")
    return problems, notes
