"""The tasks of the analysis graph, and the graph of one window of pairs.

Every scheduler runs the same pair task on the same snapshot references (:class:`SnapshotRef`):

    load-<run>-<t>     resolves the reference to step t once, for the (up to three) pairs that read
                       it: x_t is pair t's start, pair t−1's end and pair t+1's previous step
    params-<run>-<s>   the parameters alone of x_0 (distance from init) and of the reference
                       point x*, shared by every pair
       └─ pair-<key>-<run>-<t>  resolves what it was given, probes on the minibatch z_t,
                                reduces to PairStats and persists them to disk
       └─ pair-ref-<key>-<run>-<t>  for a pair persisted but for its reference part (a new x*):
                                    computes and persists that part alone (f(x*; z_t), ⟨G0, x_t − x*⟩)

A local process pool leaves out the load and params tasks: dask's multiprocessing scheduler routes
every task result through the driver, so the pair task is given the references themselves and
resolves them in its own worker, through that process's cache of recently read snapshots (which
also serves the neighbouring pairs it runs). Keys are deterministic (run token, settings digest
with the reference point, step), so a load shared by adjacent pairs is read once and two analyses
on one cluster never mix their tasks.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import threading
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import dask
import torch

from trajscope.analysis import health
from trajscope.analysis.job import Job, PairJob
from trajscope.analysis.loading import Loaded, SnapshotRef, on_device, resolved
from trajscope.analysis.persist import (
    Inputs,
    Tag,
    later,
    pair_path,
    reference_inputs,
    reference_path,
    save_pair,
    save_reference,
)
from trajscope.errors import ObjectiveError, TrajscopeError, one_line
from trajscope.metrics.pair import PairStats
from trajscope.objective import Objective, ObjectiveSource, resolve_objective
from trajscope.probe.pair import probe_pair
from trajscope.probe.reference_point import ReferencePart, probe_reference, split
from trajscope.probe.settings import ProbeSettings
from trajscope.store import Run, Snapshot, open_run

if TYPE_CHECKING:
    from trajscope.analysis.execution import Placement

__all__ = ["objective_for", "pair_task", "reference_task", "window_graph"]

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
    # Built under the probe lock: a factory draws its model's initial parameters from torch's
    # global RNG, which a probe in another thread may be replaying for dropout at that moment.
    with _PROBE_LOCK:
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


def pair_task(job: PairJob, snap: SnapshotRef | Loaded, nxt: SnapshotRef | Loaded,
              prev: SnapshotRef | Loaded | None, init: SnapshotRef | Loaded | None,
              ref: SnapshotRef | Loaded | None = None, *, out: str | None,
              strict: bool = False, inputs: Inputs | None = None) -> PairStats | health.SkippedPair:
    """Probe the pair (x_t, x_{t+1}) = (``snap``, ``nxt``) as ``job`` says and persist its
    PairStats to ``out``: the reference part (:mod:`trajscope.probe.reference_point`) apart, next to
    it, tagged ``job.ref_digest`` (None: not persisted), the rest tagged ``job.digest``; both
    record ``inputs``, the identities of the snapshots given (:meth:`trajscope.analysis.job.Job.inputs`).

    ``prev`` (x_{t−1}), ``init`` (x_0) and ``ref`` (x*) are optional neighbours. A damaged
    snapshot skips only this pair (or, as a neighbour, only the terms that need it). So does an
    exception raised by the objective's loss (e.g. a corrupted label tensor), unless ``strict``:
    the first pair of an analysis is strict, so that a broken objective stops the analysis with
    its :class:`ObjectiveError` instead of skipping every pair.
    """
    (x_t, x_next, x_prev, x_0, x_ref), settings = _placed((snap, nxt, prev, init, ref), job.placement, job.settings)
    objective = objective_for(job.source, job.recorded, job.objective_key, job.run_path)
    skip = health.skip_reason(x_t, x_next, objective.model)
    if skip is not None:
        return skip
    assert isinstance(x_t, Snapshot) and isinstance(x_next, Snapshot)
    # a damaged neighbour only costs its terms
    prev_ok, init_ok, ref_ok = (health.usable(s, objective.model) for s in (x_prev, x_0, x_ref))
    stats = _probe(objective, x_t.step, strict, lambda obj: probe_pair(
        obj, x_t, x_next, settings, prev=prev_ok, init=init_ok, ref=ref_ok, trainable=job.trainable))
    if out is not None and isinstance(stats, PairStats):
        rest, part = split(stats, settings.reference_step)
        pairs_dir = Path(out).parent
        given = inputs or {}
        later(pairs_dir, save_pair, Path(out), rest, Tag(job.digest, given))
        if part is not None and job.ref_digest is not None:
            later(pairs_dir, save_reference, reference_path(pairs_dir, part.step), part,
                  Tag(job.ref_digest, reference_inputs(given)))
    return stats


def reference_task(job: PairJob, snap: SnapshotRef | Loaded, ref: SnapshotRef | Loaded, *, out: str | None,
                   strict: bool = False, inputs: Inputs | None = None) -> ReferencePart | health.SkippedPair:
    """Compute the reference part of the pair starting at ``snap`` (x_t), x* = ``ref``, for a
    pair whose other results are persisted, and persist it to ``out`` tagged ``job.ref_digest``,
    recording ``inputs`` (:meth:`trajscope.analysis.job.Job.reference_inputs`).

    A damaged x_t skips the pair, as :func:`pair_task` would; a damaged x* gives the NaN part,
    not persisted. A loss that raises skips the pair unless ``strict`` (see :func:`pair_task`).
    """
    (x_t, x_ref), settings = _placed((snap, ref), job.placement, job.settings)
    objective = objective_for(job.source, job.recorded, job.objective_key, job.run_path)
    why = health.snapshot_problem(x_t, objective.model)
    if why is None and isinstance(x_t, Snapshot) and x_t.batch is None:
        why = f"step {x_t.step}: snapshot holds no minibatch"
    if why is not None:
        return health.SkippedPair(x_t.step, why)
    assert isinstance(x_t, Snapshot) and settings.reference_step is not None
    ref_ok = health.usable(x_ref, objective.model)
    if ref_ok is None:
        return ReferencePart.absent(x_t.step, settings.reference_step, tuple(job.trainable))
    part = _probe(objective, x_t.step, strict,
                  lambda obj: probe_reference(obj, x_t, ref_ok, settings, trainable=job.trainable))
    if out is not None and job.ref_digest is not None and isinstance(part, ReferencePart):
        later(Path(out).parent, save_reference, Path(out), part, Tag(job.ref_digest, inputs or {}))
    return part


def _placed(values: Sequence[SnapshotRef | Loaded | None], placement: Placement | None,
            settings: ProbeSettings) -> tuple[list[Any], ProbeSettings]:
    """The snapshots resolved, on this worker's device, and ``settings`` for that device."""
    inputs = [resolved(s) for s in values]
    if placement is not None:
        device = placement.apply()  # this worker's torch threads and GPU
        if device != settings.device:
            settings = dataclasses.replace(settings, device=device)
        inputs = [on_device(s, device) for s in inputs]
    return inputs, settings


_R = TypeVar("_R")


def _probe(objective: Objective, step: int, strict: bool,
           compute: Callable[[Objective], _R]) -> _R | health.SkippedPair:
    """``compute(objective)``, the objective's loss marked, one at a time per process; a loss that
    raises skips the pair (unless ``strict``), any other failure of the user's code raises an
    :class:`ObjectiveError` naming the step."""
    # One probe at a time per process: torch's forward-mode AD level (jvp) and the RNG state that
    # dropout replay sets are process-global, so two threads probing at once corrupt each other
    # (objective_for builds models under the same lock, since building draws from that RNG).
    # Threads still overlap loading and persisting with the probe; processes probe in parallel.
    marked = Objective(model=objective.model, loss=_marking(objective.loss))
    with _PROBE_LOCK:
        try:
            return compute(marked)
        except TrajscopeError:
            raise
        except Exception as exc:  # the user's loss failed: say where, in one line
            error = ObjectiveError(
                f"step {step}: evaluating the objective's loss failed: {type(exc).__name__}: "
                f"{one_line(exc, 500)} (--debug shows where)"
            )
            if getattr(exc, _RAISED_BY_LOSS, False) and not strict:
                return health.SkippedPair(step, str(error))
            raise error from exc


_RAISED_BY_LOSS = "_trajscope_raised_by_loss"


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


def window_graph(job: Job, placement: Placement, window: list[int], *, strict_step: int | None = None,
                 ref_only: Collection[int] = ()) -> list[Any]:
    """The delayed tasks of one window of ``job``, over the references to the snapshots they read
    (wrapped in load tasks shared by adjacent pairs, except where ``placement`` resolves them in
    the task itself: a local process pool): a pair task per pair, or for a pair of ``ref_only``
    (persisted but for its reference part) a reference task.

    Every task is handed ``job.for_tasks(placement)``. Pairs persist to ``job.pairs_dir``; the
    tasks are named by ``job.task_key``, which changes with the reference point. The task starting
    at ``strict_step`` (the first of the analysis) fails the analysis when the objective's loss
    raises; the others are skipped (see :func:`pair_task`). A task that persists is handed the
    identities of what it reads (:meth:`~trajscope.analysis.job.Job.inputs`), recorded with its results."""
    storage, run_token, key, pairs_dir = job.run.storage, job.run_token, job.task_key, job.pairs_dir
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

    init = params_of(job.init_step)
    ref = params_of(job.settings.reference_step)
    # The job is bound once per window: dask walks the arguments of each delayed call looking for
    # collections, and would walk it anew for every pair. Naming the function spares tokenizing it.
    tasks_job = job.for_tasks(placement)
    probe = dask.delayed(functools.partial(pair_task, tasks_job), pure=True, name=f"pair-task-{key}")
    probe_ref = dask.delayed(functools.partial(reference_task, tasks_job), pure=True,
                             name=f"pair-ref-task-{key}")
    tasks = []
    for t in window:
        if t in ref_only:
            out = str(reference_path(pairs_dir, t)) if pairs_dir is not None else None
            tasks.append(probe_ref(load(t), ref, out=out, strict=t == strict_step,
                                   inputs=job.reference_inputs(t) if pairs_dir is not None else None,
                                   dask_key_name=(f"pair-ref-{key}-{run_token}", t)))
            continue
        prev = job.previous(t)
        out = str(pair_path(pairs_dir, t)) if pairs_dir is not None else None
        tasks.append(probe(load(t), load(t + 1), load(prev) if prev is not None else None, init, ref,
                           out=out, strict=t == strict_step, inputs=job.inputs(t) if pairs_dir is not None else None,
                           dask_key_name=(f"pair-{key}-{run_token}", t)))
    return tasks
