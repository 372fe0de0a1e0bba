"""The tasks of the analysis graph, and the graph of one window of pairs.

Every scheduler runs the same pair task on the same snapshot references (:class:`SnapshotRef`):

    load-<run>-<t>     resolves the reference to step t once, for the (up to three) pairs that read
                       it: x_t is pair t's start, pair t−1's end and pair t+1's previous step
    params-<run>-<s>   the parameters alone of x_0 (distance from init) and of the reference
                       point x*, shared by every pair
       └─ pair-<digest>-<run>-<t>  resolves what it was given, probes on the minibatch z_t,
                                   reduces to PairStats and persists them to disk

A local process pool leaves out the load and params tasks: dask's multiprocessing scheduler routes
every task result through the driver, so the pair task is given the references themselves and
resolves them in its own worker, through that process's cache of recently read snapshots (which
also serves the neighbouring pairs it runs). Keys are deterministic (run token, settings digest,
step), so a load shared by adjacent pairs is read once and two analyses on one cluster never mix
their tasks.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import torch

from trajscope import format as fmt
from trajscope import health
from trajscope.errors import ObjectiveError, TrajscopeError, one_line
from trajscope.objective import Objective, resolve_objective
from trajscope.pairs import PairStats
from trajscope.persist import pair_path, save_pair
from trajscope.probe import ProbeSettings, probe_pair
from trajscope.run import Run, Snapshot, open_run
from trajscope.snapshots import Loaded, SnapshotRef, on_device, resolved

if TYPE_CHECKING:
    from trajscope.execution import Placement

__all__ = ["ObjectiveSource", "objective_for", "pair_task", "window_graph"]

ObjectiveSource = str | Callable[..., Objective] | Objective | None

_local = threading.local()
_OBJECTIVES_PER_THREAD = 4
_PROBE_LOCK = threading.Lock()


def objective_for(source: ObjectiveSource, recorded: str | None, key: str | None = None,
                  run: Run | str | Path | None = None) -> Objective:
    """One Objective per (thread, source, run): a module's parameters are swapped during a call,
    so concurrent threads must never share a model.

    ``run`` (the run, or its path: a worker process is given the path and opens the run only if
    the factory takes it) is what a factory taking an argument is called with; it is part of the
    cache key, since such a factory builds a different model for another run's configuration.

    ``key`` names the source stably: a function or Objective shipped to a worker process arrives as
    a new object with every task, so its ``id`` cannot be the key (the cache would grow by one
    model per pair). A few entries per thread: enough for the analyses a process runs in turn.
    """
    cache = getattr(_local, "objectives", None)
    if cache is None:
        cache = _local.objectives = collections.OrderedDict()
    if key is None:
        key = source if isinstance(source, str) else (recorded if source is None else str(id(source)))
    if run is not None:
        key = f"{key}@{run.path if isinstance(run, Run) else run}"
    if key in cache:
        cache.move_to_end(key)
        return cache[key][0]
    if isinstance(source, Objective):
        # never touch the caller's instance: the probe moves it and sets its train mode
        obj = Objective(model=copy.deepcopy(source.model), loss=source.loss)
    else:
        # a path is opened only if the factory takes the run
        opener = functools.partial(open_run, run) if isinstance(run, (str, Path)) else run
        obj = resolve_objective(source, recorded, opener)
    # The source is kept with its Objective: while cached, its id (the key of a source given
    # without one) cannot be reused by another object.
    cache[key] = (obj, source)
    while len(cache) > _OBJECTIVES_PER_THREAD:
        cache.popitem(last=False)
    return obj


def load_task(ref: SnapshotRef, pin: bool = False) -> Loaded:
    """Resolve one snapshot for the pairs sharing it: CPU tensors, page-locked when they will be
    copied to a GPU."""
    return ref.resolve(pin=pin)


def pair_task(snap: SnapshotRef | Loaded, nxt: SnapshotRef | Loaded, prev: SnapshotRef | Loaded | None,
              init: SnapshotRef | Loaded | None, source: ObjectiveSource, recorded: str | None,
              settings: ProbeSettings, trainable: list[str], out: str | None, digest: str,
              ref: SnapshotRef | Loaded | None = None, placement: Placement | None = None,
              objective_key: str | None = None, run_path: str | None = None,
              strict: bool = False) -> PairStats | health.SkippedPair:
    """Probe the pair (x_t, x_{t+1}) = (``snap``, ``nxt``) and persist its PairStats to ``out``.

    ``run_path`` is the run a factory that takes the run is called with (opened in this process).

    ``prev`` (x_{t−1}), ``init`` (x_0) and ``ref`` (x*) are optional neighbours. A damaged
    snapshot skips only this pair (or, as a neighbour, only the terms that need it). So does an
    exception raised by the objective's loss (e.g. a corrupted label tensor), unless ``strict``:
    the first pair of an analysis is strict, so that a broken objective stops the analysis with
    its :class:`ObjectiveError` instead of skipping every pair.
    """
    inputs = [resolved(s) for s in (snap, nxt, prev, init, ref)]
    if placement is not None:
        device = placement.apply()  # this worker's torch threads and GPU
        if device != settings.device:
            settings = dataclasses.replace(settings, device=device)
        inputs = [on_device(s, device) for s in inputs]
    x_t, x_next, x_prev, x_0, x_ref = inputs
    objective = objective_for(source, recorded, objective_key, run_path)
    skip = health.skip_reason(x_t, x_next, objective.model)
    if skip is not None:
        return skip
    assert isinstance(x_t, Snapshot) and isinstance(x_next, Snapshot)
    # a damaged neighbour only costs its terms
    prev_ok, init_ok, ref_ok = (health.usable(s, objective.model) for s in (x_prev, x_0, x_ref))
    try:
        stats = _probe(objective, x_t, x_next, settings, prev_ok, init_ok, ref_ok, trainable)
    except _LossFailed as exc:
        if strict:
            raise exc.error from exc.error.__cause__
        return health.SkippedPair(x_t.step, str(exc.error))
    if out is not None:
        save_pair(Path(out), stats, digest)
    return stats


def _probe(objective: Objective, snap: Snapshot, nxt: Snapshot, settings: ProbeSettings,
           prev: Snapshot | None, init: Snapshot | None, ref: Snapshot | None,
           trainable: list[str]) -> PairStats:
    # One probe at a time per process: torch's forward-mode AD level (jvp) and the RNG state that
    # dropout replay sets are process-global, so two threads probing at once corrupt each other.
    # Threads still overlap loading and persisting with the probe; processes probe in parallel.
    marked = Objective(model=objective.model, loss=_marking(objective.loss))
    with _PROBE_LOCK:
        try:
            return probe_pair(marked, snap, nxt, settings, prev=prev, init=init, ref=ref,
                              trainable=trainable)
        except TrajscopeError:
            raise
        except Exception as exc:  # the user's loss failed: say where, in one line
            error = ObjectiveError(
                f"step {snap.step}: evaluating the objective's loss failed: {type(exc).__name__}: "
                f"{one_line(exc, 500)} (--debug shows where)"
            )
            error.__cause__ = exc
            if getattr(exc, _RAISED_BY_LOSS, False):
                raise _LossFailed(error) from exc
            raise error from exc


_RAISED_BY_LOSS = "_trajscope_raised_by_loss"


class _LossFailed(Exception):
    """The objective's loss raised on one pair: ``error`` is its ObjectiveError."""

    def __init__(self, error: ObjectiveError) -> None:
        super().__init__(str(error))
        self.error = error


def _marking(loss: Callable[..., Any]) -> Callable[..., Any]:
    """``loss``, with every exception it raises marked as the loss's own (re-raised unchanged, so
    the probe's handling by type still applies). Out-of-memory is never marked: it is the
    analysis's to handle (smaller chunks), not a property of the pair."""

    @functools.wraps(loss)
    def marked(model: Any, batch: Any) -> Any:
        try:
            return loss(model, batch)
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(exc, _RAISED_BY_LOSS, True)
            raise

    return marked


def window_graph(r: Run, window: list[int], have: set[int], init_step: int | None, run_token: str,
                 objective: ObjectiveSource, objective_key: str | None, settings: ProbeSettings,
                 placement: Placement, digest: str, pairs_dir: Path | None,
                 strict_step: int | None = None) -> list[Any]:
    """The delayed pair tasks of one window, over the references to the snapshots they read
    (wrapped in load tasks shared by adjacent pairs, except in a local process pool).

    The pair starting at ``strict_step`` (the first of the analysis) fails the analysis when the
    objective's loss raises; the others are skipped (see :func:`pair_task`)."""
    storage = r.storage
    loads: dict[int, Any] = {}

    def load(step: int) -> Any:
        if step not in loads:
            loads[step] = SnapshotRef.of(storage, step)
            if not placement.by_path:
                loads[step] = dask.delayed(load_task, pure=True)(
                    loads[step], placement.pin, dask_key_name=(f"load-{run_token}", step))
        return loads[step]

    def params_of(step: int | None) -> Any:
        # x_0 and x* enter every pair, through their parameters alone: a small shared task
        if step is None:
            return None
        ref = SnapshotRef.of(storage, step, params_only=True)
        if placement.by_path:
            return ref
        return dask.delayed(load_task, pure=True)(ref, dask_key_name=(f"params-{run_token}", step))

    init = params_of(init_step)
    ref = params_of(settings.reference_step)
    # The arguments every pair shares are bound once: dask walks the arguments of each delayed
    # call looking for collections, and these (settings, names, placement) would be walked anew
    # for every pair. Naming the function also spares tokenizing it.
    probe = dask.delayed(
        functools.partial(pair_task, source=objective, recorded=r.objective, settings=settings,
                          trainable=r.trainable, digest=digest, placement=placement,
                          objective_key=objective_key, run_path=str(r.path)),
        pure=True, name=f"pair-task-{digest}",
    )
    tasks = []
    for t in window:
        prev = load(t - 1) if (t - 1) in have and r.kind(t - 1) == fmt.KIND_STEP else None
        out = str(pair_path(pairs_dir, t)) if pairs_dir is not None else None
        tasks.append(probe(load(t), load(t + 1), prev, init, out=out, ref=ref, strict=t == strict_step,
                           dask_key_name=(f"pair-{digest}-{run_token}", t)))
    return tasks
