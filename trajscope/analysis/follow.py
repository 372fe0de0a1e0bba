"""Following a run while it is recorded: ``trajscope analyze RUN --follow``, ``analyze(..., follow=True)``.

A follower analyzes each pair (t, t+1) as soon as both of its snapshots are complete, and keeps
``metrics.nc`` current. It works in rounds, ``poll`` seconds apart:

1. look at the recording lock, read the manifest's status, *then* list the snapshots: a run seen
   closed has every snapshot it will ever have on the list, and a run seen recording after its lock
   was seen free has lost its recorder (a recorder writes its closing manifest before it lets the
   lock go, so one that closes between the reads is seen closed). A snapshot is listed only once
   complete, from what the recorder writes last (a safetensors file once renamed into place; an
   HDF5 row once its ``index/step`` entry is written), never from a partial file;
2. when there is a pair not analyzed yet, analyze the pairs analyzed so far and at most
   :data:`ROUND_PAIRS` new ones, the earliest (:func:`~trajscope.analysis.driver.analyze`: the pairs
   persisted by earlier rounds are reused, the new ones computed, ``metrics.nc`` replaced
   atomically, so a reader never sees a torn file), and hand the new pairs to ``on_pairs`` (a
   tracker export). Rounds follow each other without a wait while pairs are waiting: a backlog
   (the follower started late, or training outpaces it) reaches ``metrics.nc`` a few pairs at a
   time rather than in one long round;
3. stop when the recorder closed the run, after one last round (which adds the pairs the final
   state completes and the reference parts of x*, the final state by default); or when the run is
   still marked recording but its recorder is gone (no process holds its recording lock), saying
   so through ``notify``.

The derivative path is decided in the first round that analyzes and kept after (``auto`` could
otherwise pick reverse mode while few pairs exist and forward mode later, recomputing them all).
An interrupt (Ctrl-C, SIGTERM) leaves what every analysis leaves: persisted pairs and the last
complete ``metrics.nc``; following again resumes. Polling, rather than file-system events, works on
network file systems and for a run recorded on another machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trajscope import runformat as fmt
from trajscope.analysis.plan import select_steps
from trajscope.errors import AnalysisError
from trajscope.store.run import Run, open_run

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["DEFAULT_POLL", "follow"]

DEFAULT_POLL = 2.0
"""Seconds between rounds when every recorded pair is analyzed (TensorBoard's reader polls every 5 s)."""
ROUND_PAIRS = 8
"""New pairs per round at most: each round rewrites ``metrics.nc``, so this bounds how long a new
pair waits behind a backlog, against the fixed cost of a round (the objective, the Dataset)."""

Analyze = Callable[..., "xr.Dataset"]


def follow(analyze: Analyze, run: str | Path | Run, objective: Any, *, poll: float = DEFAULT_POLL,
           on_pairs: Callable[[xr.Dataset, list[int]], None] | None = None,
           notify: Callable[[str], None] | None = None, **kwargs: Any) -> xr.Dataset:
    """Analyze ``run`` round after round until its recorder closes it (see the module docstring);
    the last round's Dataset.

    Args:
        analyze: :func:`trajscope.analysis.driver.analyze`, called with ``objective`` and ``kwargs``.
        poll: seconds between rounds (> 0).
        on_pairs: called after a round with its Dataset and the start steps of the pairs new in it.
        notify: called with one line when the follower stops because the recorder is gone.

    Raises:
        AnalysisError: a bad ``poll``; and whatever a round's analysis raises.
    """
    if not (isinstance(poll, (int, float)) and 0 < poll < float("inf")):
        raise AnalysisError(f"poll={poll!r}: expected a positive number of seconds")
    path = run.path if isinstance(run, Run) else Path(run)
    seen: set[int] = set()
    ds: xr.Dataset | None = None  # the last round's
    while True:
        # The lock before the manifest: a recorder writes its closing manifest before it lets the lock
        # go, so a lock seen free and a manifest still "recording" read after it mean a recorder that
        # is gone, not one that closed between the two reads.
        alive = fmt.recorder_alive(path)
        r = open_run(path)  # the manifest is read before the snapshots are listed
        closed = r.status != fmt.STATUS_RECORDING
        gone = not closed and alive is False
        waiting = [t for t in select_steps(sorted(set(r.pairs) | set(r.pruned_pairs)), kwargs.get("steps"))
                   if t not in seen]
        batch = waiting[:ROUND_PAIRS]
        last = (closed or gone) and len(waiting) <= ROUND_PAIRS  # this round covers what is left
        if batch or last:  # the last round also adds the final state's reference parts
            # (a run that ended without a pair: analyze says why)
            ds = analyze(r, objective, **{**kwargs, "steps": sorted(seen | set(batch)) or kwargs.get("steps")})
            if kwargs.get("derivatives", "auto") == "auto":  # kept from now on
                kwargs["derivatives"] = str(ds.attrs.get("derivatives", "auto"))
            new = sorted(int(t) for t in ds["step"].values if int(t) not in seen)
            seen.update(new)
            if on_pairs is not None and new:
                on_pairs(ds, new)
        if last:
            assert ds is not None
            if gone and notify is not None:
                notify(f"{path}: the recorder is gone but the run is still marked recording (killed?); "
                       f"stopped following after {len(seen)} pair(s)")
            return ds
        if len(waiting) <= ROUND_PAIRS:  # caught up: wait for the next pair; else the next round at once
            time.sleep(poll)
