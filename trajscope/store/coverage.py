"""Which recorded steps a run lacks on disk, and the pairs lost with them.

A run whose snapshot files were lost after recording (deleted, never copied) keeps the record of
every recorded step in ``scalars.jsonl``; comparing it with the snapshots on disk tells which
steps are missing (:func:`missing_steps`) and which analyzable pairs went with them
(:func:`lost_pairs`). ``trajscope validate`` reports both; an analysis lists the lost pairs as
skipped.
"""

from __future__ import annotations

from trajscope import runformat as fmt
from trajscope.errors import TrajscopeError
from trajscope.store.run import Run

__all__ = ["lost_pairs", "missing_steps"]


def missing_steps(run: Run) -> list[int]:
    """Steps the run recorded (and the final step of a complete run) whose snapshot file is not on
    disk.

    ``scalars.jsonl`` marks every recorded step. Snapshots are written in step order (by a
    background writer, after the step's line), so in a run that did not complete, recorded steps
    after its last snapshot on disk were still queued when it stopped: not written, not lost, and
    not reported here. Any other recorded step without its file was lost afterwards. If
    ``scalars.jsonl`` is unreadable, the manifest's schedule is used instead, for the neighbours
    of the snapshots on disk (what a lost pair needs).
    """
    have = set(run.steps)
    try:
        expected = {int(r["step"]) for r in run.scalars if r.get("recorded") is True}
    except TrajscopeError:
        expected = _scheduled_neighbours(run, have)
    fs = run.manifest.get("final_step")
    if run.status == fmt.STATUS_COMPLETE and isinstance(fs, int):
        expected.add(fs)
        expected = {s for s in expected if s <= fs}
    elif run.status != fmt.STATUS_COMPLETE:
        last = max(have, default=-1)
        expected = {s for s in expected if s <= last}
    return sorted(expected - have - run.pruned)  # pruned after their pairs were analyzed: not lost


def _scheduled_neighbours(run: Run, have: set[int]) -> set[int]:
    sched = run.manifest.get("schedule", {})
    every, window = sched.get("every"), sched.get("window")
    if sched.get("kind") != "every" or not (isinstance(every, int) and isinstance(window, int)
                                              and every >= 1 and window >= 2):
        return set()
    top = max(have) if have else -1
    fs = run.manifest.get("final_step")
    if run.status == fmt.STATUS_COMPLETE and isinstance(fs, int):
        top = fs
    out = set()
    for s in have:
        for n in (s - 1, s + 1):
            if 0 <= n < top and n % every < window:
                out.add(n)
    return out


def lost_pairs(run: Run) -> dict[int, str]:
    """Pairs (by start step) that the recording schedule produced but a missing snapshot lost."""
    gone = missing_steps(run)
    if not gone:
        return {}
    have = set(run.steps) | set(gone)
    fs = run.manifest.get("final_step")
    out: dict[int, str] = {}
    for s in gone:
        for t in (s - 1, s):
            if t >= 0 and t in have and t + 1 in have and t != fs and t not in out:
                out[t] = f"step {s}: {run.step_path(s)} is missing"
    return dict(sorted(out.items()))
