"""``trajscope.analyze``: probe every pair of a recorded run and assemble the metrics Dataset.

:func:`analyze` decides what to compute (:mod:`trajscope.analysis.plan`), reuses the pairs persisted by an
earlier analysis with the same settings (:mod:`trajscope.analysis.persist`), probes the others on a
scheduler (:mod:`trajscope.analysis.execution`), and builds and writes the Dataset
(:mod:`trajscope.analysis.dataset`). Every scheduler runs the same pair task on the same snapshot
references (:mod:`trajscope.analysis.tasks`, :mod:`trajscope.analysis.loading`); only ``scheduler=`` changes, and
the results are the same under each.

Memory does not grow with the run: pairs go to the scheduler in windows of a few per worker, at
most two windows in flight, and a window's snapshots are released when its pairs are done. Each
finished pair is persisted under ``analysis/pairs/`` by the task itself, so an interrupted
analysis (even SIGKILL) resumes where it stopped, new recorded steps only cost their new pairs,
and a new reference point x* only costs each pair's reference part (:mod:`trajscope.probe.reference_point`).
The Dataset is written to a temporary file and renamed: it is never seen half-written. A lock
file keeps two analyses from writing the same run's ``analysis/`` at once. ``out=DIR`` puts
``analysis/``'s content in DIR instead (:mod:`trajscope.analysis.outputs`): a read-only run is analyzed
without writing a byte into it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trajscope import runformat as fmt
from trajscope.analysis import health
from trajscope.analysis.dataset import (
    build_dataset,
    import_libraries_in_background,
    open_metrics,
)
from trajscope.analysis.dataset import write_dataset as _write_dataset
from trajscope.analysis.execution import (
    LOCAL_SCHEDULERS,
    Backend,
    check_device,
    check_scheduler,
    open_backend,
    resolve_device,
    usable_cores,
)
from trajscope.analysis.follow import DEFAULT_POLL
from trajscope.analysis.follow import follow as follow_run
from trajscope.analysis.job import Job
from trajscope.analysis.outputs import analysis_dir, create_analysis_dir
from trajscope.analysis.persist import (
    VERSION,
    PairTable,
    analysis_lock,
    grouped_writes,
    load_persisted,
    load_references,
    pairs_digest,
    reference_digest,
    remove_stale_temporaries,
    settings_digest,
)
from trajscope.analysis.plan import (
    check_derivatives,
    objective_id,
    pairs_to_analyze,
    probe_settings,
    select_metrics,
    training_rounding,
    with_precision,
    with_requirements,
)
from trajscope.analysis.progress import Progress as _Progress
from trajscope.analysis.tasks import objective_for, window_graph
from trajscope.errors import AnalysisError, RunFormatError, TrajscopeWarning
from trajscope.metrics.pair import PairStats
from trajscope.metrics.registry import MetricSpec, evaluate_pair
from trajscope.objective import Objective, ObjectiveSource, check_run_objective, objective_digest
from trajscope.probe import memory
from trajscope.probe.reference_point import ReferencePart, merge, snapshot_identity
from trajscope.probe.settings import ProbeSettings
from trajscope.probe.trials import first_readable, persisted_objective_change, resolve_derivatives
from trajscope.store.run import Run, open_run
from trajscope.store.snapshot import Snapshot
from trajscope.store.trees import tree_map
from trajscope.store.unwrap import unwrapped

if TYPE_CHECKING:  # imported where a Dataset is built or read: worker processes never need it
    import xarray as xr

__all__ = ["analyze", "build_dataset", "open_metrics"]

__version__ = VERSION

PAIRS_PER_WORKER = 2
MIN_WINDOW = 8
"""A window holds max(MIN_WINDOW, PAIRS_PER_WORKER × workers) pairs and two windows are in flight,
so each worker holds a handful of snapshots (its pairs' x_{t−1}, x_t, x_{t+1}, shared between
neighbours) whatever the run length."""
SERIAL_WINDOW = 64
"""Pairs per window of a serial (``synchronous``) analysis. There dask runs the graph in pair
order, reading x_{t+1} just before pair t and releasing x_t after it, so a window's size costs no
memory; each window costs one ``dask.compute`` and a second read of the snapshot at its edge."""
PIN_MEMORY = True
"""Page-lock snapshots loaded for a GPU (in-process schedulers), so that host→device copies are
DMA transfers issued without blocking the host. A switch for benchmarks/gpu.py."""


def analyze(
    run: str | Path | Run,
    objective: ObjectiveSource = None,
    *,
    points: int = 9,
    margin: float = 0.5,
    device: str = "auto",
    dtype: str | None = None,
    scheduler: Any = "synchronous",
    workers: int | None = None,
    steps: str | slice | Iterable[int] | None = None,
    metrics: Iterable[str] | None = None,
    batched: bool | None = None,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    derivatives: str = "auto",
    sharpness: bool = False,
    sharpness_max_iter: int = 100,
    reference: int | None = None,
    force: bool = False,
    write: bool = True,
    out: str | Path | None = None,
    progress: bool | None = None,
    follow: bool = False,
    poll: float = DEFAULT_POLL,
) -> xr.Dataset:
    """Analyze a recorded run and return the metrics Dataset (also written to ``analysis/``).

    Args:
        run: run directory (or an opened :class:`Run`).
        objective: ``"module:function"``, a factory, or an :class:`Objective` (default: the run's).
        points, margin: α grid (``points`` on [0, 1], extended by ``margin`` on both sides).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available). With several
            GPUs, ``cuda``/``auto`` gives each worker its own GPU (set ``workers`` to the count).
        dtype: None (``"as-trained"``, ``"auto"``): each step under its recorded autocast, in float64
            for a float64 run, else float32; ``"float32"``/``"float64"``: that, without autocast.
        scheduler: ``synchronous`` (this thread), ``threads``, ``processes``, a dask.distributed
            address (``tcp://host:8786``) or ``Client``, whose workers see the run at the same path.
        workers: worker count for ``threads``/``processes`` (default: one per core).
        steps: which pairs, by start step: ``"START:STOP[:STRIDE]"``, a slice, or step numbers.
        metrics: metric names (default: every registered metric).
        batched, chunk_size, max_memory: α points by ``vmap`` (True), one by one (False) or as is
            faster (None: :mod:`trajscope.probe.line_plan`), ``chunk_size`` at a time (default: what fits
            ``max_memory``, all the analysis adds per worker, like ``"4GB"``; default half the free memory).
        derivatives: ℓ'(α) by ``forward``-mode AD (batched), ``reverse`` mode (one backward per α
            point) or ``auto`` (decided once: :func:`trajscope.probe.trials.resolve_derivatives`).
        sharpness: also λ_max(∇²f(x_t; z_t)) per pair by Lanczos (at most ``sharpness_max_iter``
            Hessian-vector products); implied when ``metrics`` names a metric that needs it.
        reference: step of x* in ``convexity_ratio_ref`` (default: the final state; else NaN).
        force: recompute pairs already persisted under ``analysis/pairs``.
        write: write ``analysis/metrics.nc`` and the per-pair results (and reuse those already
            there); False computes everything in memory and writes nothing.
        out: the analysis directory instead of ``RUN/analysis`` (:mod:`trajscope.analysis.outputs`), e.g.
            for a run directory that cannot be written; read it back with ``analysis=out``.
        progress: show a progress bar (default: when stderr is a terminal).
        follow, poll: analyze the pairs as the run is recorded, a round every ``poll`` seconds, until
            its recorder closes it (:mod:`trajscope.analysis.follow`); the last round's Dataset.
    """
    if follow:
        kwargs = {k: v for k, v in locals().items() if k not in ("run", "objective", "follow", "poll")}
        return follow_run(analyze, run, objective, poll=poll, **{**kwargs, "progress": False})
    r = run if isinstance(run, Run) else open_run(run)
    scheduler = _check_arguments(dtype, scheduler, device, chunk_size, derivatives)
    where = _destination(r, out, write, force)  # checked before any work: a read-only run fails at once
    local = isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS
    selected, sharpness = select_metrics(metrics, sharpness)
    settings = probe_settings(r, points=points, margin=margin, device=device, dtype=dtype,
                              chunk_size=chunk_size, batched=batched, sharpness=sharpness,
                              sharpness_max_iter=sharpness_max_iter, reference=reference)
    if local:  # a missing GPU fails before any work; a cluster's workers resolve the spec themselves
        settings = replace(settings, device=resolve_device(device))
    settings = _with_budget(settings, max_memory, scheduler, workers)  # a malformed size fails at once
    specs = with_requirements(selected)
    pairs, lost = pairs_to_analyze(r, steps)
    r, settings, code = _resolve_objective(r, objective, settings, dtype, derivatives, pairs, local)
    name = objective_id(objective, r.objective)
    job = _job(r, objective, name, settings, device, code, where, local)
    with analysis_lock(where) if where is not None else contextlib.nullcontext():
        done, skipped = _compute_pairs(job, pairs, lost, scheduler, workers, force, progress)
        ordered = _finished(r, [done.get(t) for t in pairs if t in done], skipped)
        ds = _dataset(r, ordered, specs, settings, name, skipped, len(pairs) + len(lost))
        if where is not None:
            _write_dataset(ds, where / fmt.METRICS_FILE)
    _warn_replay(ds)
    return ds


def _dataset(r: Run, ordered: list[PairStats], specs: dict[str, MetricSpec], settings: ProbeSettings,
             name: str, skipped: dict[int, str], total: int) -> xr.Dataset:
    """The metrics of every computed pair, with the skipped pairs and the provenance attrs."""
    values = [evaluate_pair(s, list(specs.values())) for s in ordered]
    ds = build_dataset(ordered, values, specs, r, settings, name)
    health.record_skipped(ds, skipped, total)
    ds.attrs["training_rounding"] = training_rounding(r, settings)  # scales the replay gate's bounds
    for metric in health.REPLAY_METRICS:
        bound = health.replay_bound(ds, metric)
        if bound is not None:
            ds.attrs[metric.removesuffix("_error") + "_bound"] = bound
    return ds


def _warn_replay(ds: xr.Dataset) -> None:
    """A :class:`TrajscopeWarning` when the replay gate fails (:func:`health.replay_failures`), one
    when parameters moved without a recorded gradient (:func:`health.unrecorded_warning`), and one
    when the loss is NaN/Inf on some pair (:func:`health.nonfinite_loss_warning`)."""
    check = health.replay_failures(ds)
    if not check.ok:
        warnings.warn(health.replay_warning(check, ds), TrajscopeWarning, stacklevel=3)
    for note in (health.unrecorded_warning(ds), health.nonfinite_loss_warning(ds)):
        if note is not None:
            warnings.warn(note, TrajscopeWarning, stacklevel=3)


def _destination(r: Run, out: str | Path | None, write: bool, force: bool = False) -> Path | None:
    """The analysis directory (``out`` or ``RUN/analysis``, checked writable:
    :func:`trajscope.analysis.outputs.analysis_dir`); None when nothing is written."""
    if not write:
        if out is not None:
            raise AnalysisError(f"out={str(out)!r}: given with write=False, which writes nothing")
        return None
    return analysis_dir(r.path, out, force=force)


def _job(r: Run, objective: ObjectiveSource, name: str, settings: ProbeSettings, device: str, code: str,
         where: Path | None, local: bool) -> Job:
    """What every pair shares; creates the analysis directory ``where`` and its ``pairs/`` (real
    directories only: nothing is written through a symlink), unless it is None.

    The tags: the pairs' digest, and the reference parts' digest, which covers x*'s snapshot
    identity (:func:`trajscope.probe.reference_point.snapshot_identity`, which reads x*'s parameters once) and
    is computed only when something is persisted.
    """
    digest = settings_digest(settings, name, code)
    if where is not None:
        create_analysis_dir(where)
        digest = pairs_digest(digest, r.path, where)
    ref_step = settings.reference_step
    identity = snapshot_identity(r.storage, ref_step) if where is not None and ref_step is not None else None
    ref_digest = reference_digest(digest, ref_step, identity) if identity is not None else None
    key = ref_digest or reference_digest(digest, ref_step, "")
    run_token = hashlib.sha256(str(r.path.resolve()).encode()).hexdigest()[:10]
    return Job(r, objective, name, settings, device, digest, where / fmt.PAIRS_DIR if where is not None else None,
               local, ref_digest, key, run_token)


def _check_arguments(dtype: str | None, scheduler: Any, device: str, chunk_size: int | None,
                     derivatives: str) -> Any:
    """Validate the arguments checked before the run is read further; returns the scheduler."""
    check_derivatives(derivatives)
    if dtype not in (None, "auto", "as-trained", "float32", "float64"):
        raise AnalysisError(f"dtype={dtype!r}: expected as-trained (or None or 'auto'), float32 or float64")
    scheduler = check_scheduler(scheduler)
    check_device(device)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise AnalysisError(f"chunk_size={chunk_size!r}: expected an int >= 1 or None")
    return scheduler


def _with_budget(settings: ProbeSettings, max_memory: int | str | None, scheduler: Any,
                 workers: int | None) -> ProbeSettings:
    """``settings`` with the memory budget per worker and a fresh line-plan id (one per analysis).
    An explicit ``max_memory`` covers everything the analysis adds (``memory_strict``): what this
    process holds now is where that starts (:func:`trajscope.probe.memory.begin`)."""
    out = replace(settings, max_memory=_memory_budget(max_memory, scheduler, workers, settings.device),
                  memory_strict=max_memory is not None, plan_id=uuid.uuid4().hex)
    if isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS:
        memory.begin(out.plan_id, out.device)
    return out


def _memory_budget(max_memory: int | str | None, scheduler: Any, workers: int | None, device: str) -> int:
    """Bytes each worker may add (``ProbeSettings.max_memory``: everything, when ``max_memory`` is
    given; the line evaluation's share by default): the budget split between the local worker
    processes (thread workers probe one at a time); 0 on a cluster without ``max_memory``, where
    each worker takes half of its own available memory."""
    local = isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS
    procs = (workers or usable_cores()) if scheduler == "processes" else 1
    if max_memory is None:
        return memory.default_budget(device, procs) if local else 0
    return max(1, memory.parse_size(max_memory) // procs)


def _resolve_objective(r: Run, objective: ObjectiveSource, settings: ProbeSettings, dtype: str | None,
                       derivatives: str, pairs: list[int], local: bool) -> tuple[Run, ProbeSettings, str]:
    """The run as the objective's model names it, the settings with the precision
    (:func:`~trajscope.analysis.plan.with_precision`) and the derivative path decided, and the
    digest of what the objective computes (:func:`objective_digest`). Resolved once, before any
    work, so import errors and name/shape mismatches surface at once."""
    obj = objective_for(objective, r.objective, run=r)
    r = unwrapped(r, obj.model)  # a run recorded through torch.compile/DDP: the model's plain names
    check_run_objective(obj, r.manifest)
    snap = first_readable(r, pairs)
    settings = with_precision(settings, dtype, snap, compiled=r.manifest.get("compiled") is True)
    if settings.memory_strict and settings.max_memory and snap is not None:
        _check_pair_floor(settings.max_memory, obj, snap, settings)
    return r, resolve_derivatives(derivatives, settings, r, obj, pairs, local, snap), objective_digest(obj)


def _check_pair_floor(budget: int, obj: Objective, snap: Snapshot, settings: ProbeSettings) -> None:
    """Refuse at once an explicit budget below the least one pair of the run holds
    (:func:`trajscope.probe.memory.pair_floor`), sized from the first readable snapshot."""
    def nbytes(tree: Any) -> int:
        sizes: list[int] = []
        tree_map(lambda t: sizes.append(t.nbytes), tree, leaf=torch.Tensor)
        return sum(sizes)

    model = nbytes(dict(obj.model.named_parameters()))
    stored = nbytes([snap.params, snap.grads, snap.buffers, snap.batch])
    params = sum(t.numel() for t in snap.params.values()) * settings.torch_dtype.itemsize
    floor = memory.pair_floor(model, stored, params)
    memory.check_pair_minimum(budget, floor, f"the model {memory.format_size(model)}, two snapshots of "
                              f"{memory.format_size(stored)}, Δ_t, one α point and G0 of {memory.format_size(params)} "
                              "each, before activations")


def _compute_pairs(job: Job, pairs: list[int], lost: dict[int, str], scheduler: Any, workers: int | None,
                   force: bool, progress: bool | None) -> tuple[PairTable, dict[int, str]]:
    """Every pair's PairStats, persisted ones reused (unless ``force``), and the skipped pairs
    (start step → why): damaged or missing snapshots cost only their pairs. A pair persisted but
    for its reference part (x* changed) gets a reference task, not a probe. A pair persisted from
    other snapshots than the run's current ones (replaced, rewritten, recorded anew) is recomputed, with
    one warning counting them."""
    done = PairTable(pairs)
    ref_only: list[int] = []  # persisted but for the reference part (a new x*)
    if job.pairs_dir is not None:
        remove_stale_temporaries(job.pairs_dir.parent)
        job.identify(pairs)  # what every pair reads, before any is read
        if not force:
            changed = load_persisted(done, job.pairs_dir, pairs, job.digest, job.inputs)
            if changed:
                warnings.warn(f"{changed} persisted pair(s) were computed from snapshot files that changed since "
                              "(replaced, rewritten or recorded anew); recomputing them", TrajscopeWarning,
                              stacklevel=3)
            done = _unchanged(job, done, pairs)
            ref_only = load_references(done, job.pairs_dir, pairs, job.ref_digest, job.reference_inputs)
    gone = set(job.run.pruned_pairs)  # their snapshots were pruned: nothing to compute them from
    skipped = dict(lost) | {t: f"a snapshot it reads was pruned ({fmt.PRUNED}) after an analysis under other "
                            "settings" for t in pairs if t in gone and t not in done}
    todo = sorted([t for t in pairs if t not in done and t not in gone] + [t for t in ref_only if t not in gone])
    bar = _Progress(len(pairs), len(pairs) - len(todo), sys.stderr.isatty() if progress is None else progress)
    try:
        if todo:
            with open_backend(scheduler, workers) as backend, grouped_writes(job.pairs_dir):
                import_libraries_in_background()
                _run_pairs(backend, job, todo, set(ref_only), done, skipped, bar.pair_done)
    finally:
        bar.close()
    return done, skipped


def _unchanged(job: Job, done: PairTable, pairs: list[int]) -> PairTable:
    """``done``, unless the objective no longer computes its first pair's ℓ(0) (a change its digest
    cannot see, e.g. a global constant): then an empty table, and one warning naming the change."""
    first = next((t for t in pairs if t in done and t in job.recorded), None)  # its snapshot on disk
    if first is None:
        return done
    objective = objective_for(job.objective, job.run.objective, run=job.run)
    what = persisted_objective_change(job.run, objective, job.settings, done.get(first), job.local)
    if what is None:
        return done
    warnings.warn(f"objective changed since the persisted pairs were computed: {what}; recomputing",
                  TrajscopeWarning, stacklevel=4)
    return PairTable(pairs)


def _finished(r: Run, ordered: list[PairStats], skipped: dict[int, str]) -> list[PairStats]:
    """``ordered``, unless no pair could be computed."""
    if not ordered:
        first = min(skipped)
        raise RunFormatError(
            f"{r.path}: all {len(skipped)} pair(s) were skipped as damaged or missing; "
            f"first: pair {first}: {skipped[first]}"
        )
    return ordered


def _run_pairs(backend: Backend, job: Job, todo: list[int], ref_only: set[int], done: PairTable,
               skipped: dict[int, str], on_pair: Callable[[], None]) -> None:
    """Probe the ``todo`` pairs on ``backend`` in windows, two windows in flight at a time; of
    those in ``ref_only`` compute the reference part alone."""
    placement = backend.placement(job.device, pin=PIN_MEMORY and job.settings.device.startswith("cuda"))
    size = (SERIAL_WINDOW if backend.name == "synchronous"
            else max(MIN_WINDOW, PAIRS_PER_WORKER * backend.workers))
    in_flight: collections.deque[Callable[[], list[Any]]] = collections.deque()
    for i in range(0, len(todo), size):
        tasks = window_graph(job, placement, todo[i : i + size], strict_step=todo[0], ref_only=ref_only)
        in_flight.append(backend.submit(tasks, on_pair))
        if len(in_flight) == 2:
            _collect(in_flight.popleft()(), done, skipped)
    while in_flight:
        _collect(in_flight.popleft()(), done, skipped)


def _collect(results: list[Any], done: PairTable, skipped: dict[int, str]) -> None:
    for s in results:
        if isinstance(s, health.SkippedPair):
            done.discard(s.step)  # a reference task's pair was loaded before its snapshot failed
            skipped[s.step] = s.reason
        elif isinstance(s, ReferencePart):
            done.put(merge(done.get(s.step), s))
        else:
            done.put(s)
