"""``trajscope.analyze``: build the dask graph, run it, assemble and write the xarray Dataset.

The graph (the same functions and keys under every scheduler; only ``scheduler=`` changes):

    load-<run>-<t>     one per snapshot, shared by the (up to three) pairs that read it
    params-<run>-<s>   the parameters alone of x_0 (distance from init) and of the reference
                       point x*, shared by every pair
       └─ pair-<digest>-<t>  probe on the same minibatch z_t, reduce to PairStats, persist to disk
             └─ metrics  pure functions of PairStats, evaluated here for all pairs at once
                   └─ one Dataset, series metrics (cumulative ones) added over ``step``

Keys are deterministic (run and settings digests, step numbers), so a load shared by adjacent pairs
is read once, and two analyses on one cluster never mix their tasks. Metric functions run in this
process: each takes microseconds, less than shipping it, and resumed pairs need them too.

Memory does not grow with the run: pairs go to the scheduler in windows of a few per worker, at
most two windows in flight, and a window's snapshots are released when its pairs are done. Each
finished pair is persisted under ``analysis/pairs/`` by the task itself, so an interrupted analysis
(even SIGKILL) resumes where it stopped, and new recorded steps only cost their new pairs. The
Dataset is written to a temporary file and renamed: it is never seen half-written. A lock file
keeps two analyses from writing the same run's ``analysis/`` at once.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import numpy as np

from trajscope import format as fmt
from trajscope import health
from trajscope.errors import AnalysisError, ObjectiveError, RunFormatError, TrajscopeError, one_line
from trajscope.execution import (
    LOCAL_SCHEDULERS,
    Backend,
    Placement,
    check_device,
    check_scheduler,
    open_backend,
    resolve_device,
    ship,
)
from trajscope.objective import Objective, check_run_objective, resolve_objective
from trajscope.probe import PairStats, ProbeSettings, alpha_grid, probe_pair
from trajscope.registry import MetricSpec, evaluate_pair, get_metrics
from trajscope.run import Run, Snapshot, open_run

if TYPE_CHECKING:  # imported where a Dataset is built or read: worker processes never need it
    import xarray as xr

__all__ = ["analyze", "open_metrics", "compute_pair_metrics", "build_dataset"]

__version__ = "0.1.0"
METRICS_FILE = "metrics.nc"
PAIRS_DIR = "pairs"
LOCK_FILE = ".lock"

PAIRS_PER_WORKER = 2
MIN_WINDOW = 8
"""A window holds max(MIN_WINDOW, PAIRS_PER_WORKER × workers) pairs and two windows are in flight,
so each worker holds a handful of snapshots (its pairs' x_{t−1}, x_t, x_{t+1}, shared between
neighbours) whatever the run length. (Larger windows cost no memory in serial runs, where dask
releases a snapshot as soon as its last pair is done, and save a little per-window overhead.)"""
PIN_MEMORY = True
"""Page-lock snapshots loaded for a GPU (in-process schedulers), so that host→device copies are
DMA transfers issued without blocking the host. A switch for benchmarks/gpu.py."""

ObjectiveSource = str | Callable[[], Objective] | Objective | None


# --- tasks ---------------------------------------------------------------------------------------

_local = threading.local()
_OBJECTIVES_PER_THREAD = 4


def _objective_for(source: ObjectiveSource, recorded: str | None, key: str | None = None) -> Objective:
    """One Objective per (thread, source): a module's parameters are swapped during a call, so
    concurrent threads must never share a model.

    ``key`` names the source stably: a function or Objective shipped to a worker process arrives as
    a new object with every task, so its ``id`` cannot be the key (the cache would grow by one
    model per pair). A few entries per thread: enough for the analyses a process runs in turn.
    """
    cache = getattr(_local, "objectives", None)
    if cache is None:
        cache = _local.objectives = collections.OrderedDict()
    if key is None:
        key = source if isinstance(source, str) else (recorded if source is None else str(id(source)))
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    if isinstance(source, Objective):
        # never touch the caller's instance: the probe moves it and sets its train mode
        obj = Objective(model=copy.deepcopy(source.model), loss=source.loss)
    else:
        obj = resolve_objective(source, recorded)
    cache[key] = obj
    while len(cache) > _OBJECTIVES_PER_THREAD:
        cache.popitem(last=False)
    return obj


# Recently loaded snapshots, per process: a window's boundary snapshots are the next window's
# first ones, and a snapshot passed by path (below) is read once per process that uses it. Keyed
# by (path, mtime, size, params only) so a rewritten file is never served stale; a handful, so
# memory stays bounded whatever the run length.
_SnapshotKey = tuple[str, int, int, bool]
_recent: collections.OrderedDict[_SnapshotKey, Snapshot] = collections.OrderedDict()
_recent_lock = threading.Lock()
_RECENT_SNAPSHOTS = 4


class _ByPath(Snapshot):
    """A snapshot read from a file, pickled as a reference to that file (:class:`_SnapshotFile`).

    Process pools use this: dask's multiprocessing scheduler routes every task input through the
    driver process, and shipping the tensors that way (3.4 MB per pair of the reference MLP)
    cost more than the worker reading them again from the OS page cache. The driver never reads
    a snapshot: a reference stays a reference until a pair task needs the tensors.
    """

    _key: _SnapshotKey

    def __reduce__(self) -> tuple[Any, ...]:
        return (_SnapshotFile, (self._key,))


class _SnapshotFile:
    """Where a snapshot is: (path, mtime, size, parameters only). Resolved by the pair task."""

    __slots__ = ("key",)

    def __init__(self, key: _SnapshotKey) -> None:
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return (_SnapshotFile, (self.key,))

    def resolve(self) -> Snapshot:
        snap = _read_cached(self.key[0], params_only=self.key[3], by_path=True)
        now = getattr(snap, "_key", self.key)
        if now[:3] != self.key[:3] and not _appended(self.key, now):
            raise AnalysisError(f"{self.key[0]}: the snapshot file changed during the analysis; re-run it")
        return snap


def _appended(then: _SnapshotKey, now: _SnapshotKey) -> bool:
    """An HDF5 row (``trajectory.h5/step_…``) whose container only grew: a live recording appended
    rows after the reference was made, and rows already written never change."""
    return Path(then[0]).parent.suffix == ".h5" and now[2] >= then[2]


def _file_ref(path: str, *, params_only: bool) -> _SnapshotFile:
    """A reference to a snapshot file, made in the driver without reading it: the worker that
    resolves it checks that the file is still the one stat'ed here."""
    return _SnapshotFile((path, *_stat_key(path), params_only))


def _resolved(snap: Any) -> Any:
    return snap.resolve() if isinstance(snap, _SnapshotFile) else snap


def _stat_key(path: str) -> tuple[int, int]:
    """(mtime, size) of the file holding a snapshot: the step file itself, or for an HDF5 row
    (``trajectory.h5/step_…``) the container, which only grows while a row stays the same."""
    p = Path(path)
    try:
        st = os.stat(p if p.exists() or p.parent.suffix != ".h5" else p.parent)
    except OSError:
        return (-1, -1)  # missing: the reader reports it as a damaged snapshot
    return (st.st_mtime_ns, st.st_size)


def _read_cached(path: str, *, params_only: bool = False, pin: bool = False,
                 by_path: bool = False) -> Snapshot | health.BadSnapshot:
    key = (path, *_stat_key(path), params_only)
    with _recent_lock:
        snap = _recent.get(key)
        if snap is not None:
            _recent.move_to_end(key)
            return snap
    # issue 7 (damage is local): a damaged snapshot is returned as its error, not raised, so only
    # the pairs that need it are skipped (see trajscope.health).
    loaded = _read_params(path) if params_only else health.load_snapshot(path)
    if isinstance(loaded, health.BadSnapshot):
        return loaded
    snap = loaded
    if pin:
        snap = _pinned(snap)
    fields = {f.name: getattr(snap, f.name) for f in dataclasses.fields(snap)}
    if by_path:
        snap = _ByPath(**fields)
        object.__setattr__(snap, "_key", key)
    else:
        snap = ship(snap)  # pickles as plain arrays when a cluster moves it between workers
    with _recent_lock:
        _recent[key] = snap
        while len(_recent) > _RECENT_SNAPSHOTS:
            _recent.popitem(last=False)
    return snap


def _read_params(path: str) -> Snapshot | health.BadSnapshot:
    """x_0 or x*: the parameters alone, read lazily from a safetensors step file (through the same
    bounded, checked header as every read); an HDF5 row is read whole."""
    from safetensors import safe_open

    from trajscope.run import _snapshot_meta

    p = Path(path)
    if fmt.parse_step_filename(p.name) is None:  # not a step file: e.g. trajectory.h5/step_…
        full = health.load_snapshot(path)
        return full if isinstance(full, health.BadSnapshot) else Snapshot(
            step=full.step, kind=full.kind, params=full.params)
    try:
        meta = _snapshot_meta(fmt.read_safetensors_header(p), p)
        with safe_open(str(p), framework="pt") as fh:
            params = {fmt.check_name(k[len(fmt.PARAM):], f"{p}: tensor key param/…"): fh.get_tensor(k)
                      for k in fh.keys() if k.startswith(fmt.PARAM)}
    except RunFormatError as exc:
        return health.BadSnapshot(fmt.parse_step_filename(p.name) or -1, str(exc))
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors for a damaged buffer
        return health.BadSnapshot(fmt.parse_step_filename(p.name) or -1,
                                  f"{p}: damaged safetensors file ({exc})")
    return Snapshot(step=meta["step"], kind=str(meta.get("kind", fmt.KIND_STEP)), params=params)


def _load_task(path: str, pin: bool = False, by_path: bool = False) -> Snapshot | health.BadSnapshot:
    """Read one snapshot: CPU tensors, page-locked when they will be copied to a GPU, pickled by
    path when the scheduler is a local process pool."""
    return _read_cached(path, pin=pin, by_path=by_path)


def _load_params_task(path: str, by_path: bool = False) -> Snapshot | health.BadSnapshot:
    """x_0 (distance from initialisation) or x* (reference point): its parameters only."""
    return _read_cached(path, params_only=True, by_path=by_path)


def _map_tensors(snap: Snapshot, fn: Callable[[Any], Any]) -> Snapshot:
    """``snap`` with ``fn`` applied to every tensor of its parameters, gradients, buffers and batch
    (RNG states stay as they are: torch's RNG API wants them on the CPU)."""
    import torch

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return fn(x)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    return dataclasses.replace(snap, params=walk(snap.params), grads=walk(snap.grads),
                               buffers=walk(snap.buffers), batch=walk(snap.batch))


def _pinned(snap: Snapshot) -> Snapshot:
    return _map_tensors(snap, lambda t: t.pin_memory())


def _on_device(snap: Snapshot | health.BadSnapshot | None, device: str) -> Snapshot | health.BadSnapshot | None:
    """The snapshot's tensors on ``device`` (asynchronous from page-locked memory)."""
    if not isinstance(snap, Snapshot) or device == "cpu":
        return snap
    return _map_tensors(snap, lambda t: t.to(device, non_blocking=t.is_pinned()))


_PROBE_LOCK = threading.Lock()


def _pair_task(snap: Snapshot | health.BadSnapshot, nxt: Snapshot | health.BadSnapshot,
               prev: Snapshot | health.BadSnapshot | None, init: Snapshot | health.BadSnapshot | None,
               source: ObjectiveSource, recorded: str | None, settings: ProbeSettings,
               trainable: list[str], out: str | None, digest: str,
               ref: Snapshot | health.BadSnapshot | None = None, placement: Placement | None = None,
               objective_key: str | None = None) -> PairStats | health.SkippedPair:
    snap, nxt, prev, init, ref = (_resolved(s) for s in (snap, nxt, prev, init, ref))
    if placement is not None:
        device = placement.apply()  # this worker's torch threads and GPU
        if device != settings.device:
            settings = dataclasses.replace(settings, device=device)
        snap, nxt, prev, init, ref = (_on_device(s, device) for s in (snap, nxt, prev, init, ref))
    objective = _objective_for(source, recorded, objective_key)
    # --- issue 7 (damage is local): a damaged/incomplete snapshot skips this pair only ---------
    skip = health.skip_reason(snap, nxt, objective.model)
    if skip is not None:
        return skip
    prev = health.usable(prev, objective.model)  # a damaged neighbour only costs its terms
    init = health.usable(init, objective.model)
    ref = health.usable(ref, objective.model)
    assert isinstance(snap, Snapshot) and isinstance(nxt, Snapshot)
    # --- end issue 7 ---------------------------------------------------------------------------
    # One probe at a time per process: torch's forward-mode AD level (jvp) and the RNG state that
    # dropout replay sets are process-global, so two threads probing at once corrupt each other.
    # Threads still overlap loading and persisting with the probe; processes probe in parallel.
    with _PROBE_LOCK:
        try:
            stats = probe_pair(objective, snap, nxt, settings, prev=prev, init=init, ref=ref,
                               trainable=trainable)
        except TrajscopeError:
            raise
        except Exception as exc:  # issue 7: the user's loss failed; say where, one line
            raise ObjectiveError(
                f"step {snap.step}: evaluating the objective's loss failed: {type(exc).__name__}: "
                f"{one_line(exc, 500)} (--debug shows where)"
            ) from exc
    if out is not None:
        _save_pair(Path(out), stats, digest)
    return stats


def compute_pair_metrics(stats: PairStats, specs: Sequence[MetricSpec]) -> dict[str, np.ndarray]:
    """Apply every pair metric to one pair (and per layer where declared). Pure."""
    return evaluate_pair(stats, specs)


# --- persistence of per-pair partial results -----------------------------------------------------


def _pair_path(pairs_dir: Path, step: int) -> Path:
    return pairs_dir / f"pair_{step:08d}.safetensors"


def _save_pair(path: Path, stats: PairStats, digest: str) -> None:
    import safetensors.numpy

    meta = {"digest": digest, "step": str(stats.step), "layers": json.dumps(list(stats.layers))}
    data = safetensors.numpy.save(
        {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in stats.to_tensors().items()},
        metadata=meta,
    )
    # Temp file + rename: a kill at any moment leaves the old state or the whole new file. No
    # fsync: after a power cut a torn file fails to parse and the pair is simply recomputed.
    fmt.atomic_write_bytes(path, data)


def _load_pair(path: Path, digest: str) -> PairStats | None:
    """A persisted pair if it exists and was computed with the same settings, else None."""
    import safetensors.numpy

    if not path.exists():
        return None
    try:
        header = fmt.read_safetensors_header(path)
        meta = header.get("__metadata__", {})
        if meta.get("digest") != digest:
            return None
        tensors = safetensors.numpy.load(path.read_bytes())
        return PairStats.from_tensors(int(meta["step"]), tuple(json.loads(meta["layers"])), tensors)
    except Exception:  # noqa: BLE001 - a damaged partial result is simply recomputed
        return None


def _settings_digest(settings: ProbeSettings, objective_id: str) -> str:
    blob = json.dumps({"v": __version__, "probe": settings.to_json(), "objective": objective_id},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _PairTable:
    """Every pair's :class:`PairStats`, packed into arrays allocated once per field.

    Why not a dict of PairStats: a pair's results are a few dozen small arrays that live to the
    end of the analysis, allocated (numpy data, torch storage) in the heap where the probe also
    allocates and frees megabytes of tensors. Each small survivor pins the freed memory around it
    (glibc returns a heap region to the OS only when nothing in it is alive), so memory grew with
    the run: 1.8 GB peak for 500 serial pairs instead of 0.4 GB. Copied here as they arrive, a
    pair's own arrays are freed at once and nothing small stays behind between the probes.
    """

    def __init__(self, steps: Sequence[int]) -> None:
        self._row = {t: i for i, t in enumerate(steps)}
        self._arrays: dict[str, np.ndarray] = {}
        self._filled: dict[str, np.ndarray] = {}
        self._layers: dict[int, tuple[str, ...]] = {}
        self._odd: dict[int, PairStats] = {}  # a pair whose shapes differ from the first (never seen)

    def __contains__(self, step: int) -> bool:
        return step in self._layers or step in self._odd

    def __len__(self) -> int:
        return len(self._layers) + len(self._odd)

    def put(self, stats: PairStats) -> None:
        i = self._row[stats.step]
        flat = stats.to_tensors()
        n = len(self._row)
        for key, value in flat.items():
            value = np.asarray(value, dtype=np.float64)
            arr = self._arrays.get(key)
            if arr is None:
                arr = self._arrays[key] = np.full((n, *value.shape), np.nan)
                self._filled[key] = np.zeros(n, dtype=bool)
            if arr.shape[1:] != value.shape:
                self._odd[stats.step] = stats
                return
        for key, value in flat.items():
            self._arrays[key][i] = value
            self._filled[key][i] = True
        self._layers[stats.step] = tuple(stats.layers)

    def get(self, step: int) -> PairStats:
        if step in self._odd:
            return self._odd[step]
        i = self._row[step]
        views = {k: a[i] for k, a in self._arrays.items() if self._filled[k][i]}
        return PairStats.from_tensors(step, self._layers[step], views)


# --- one analysis at a time per run --------------------------------------------------------------


@contextlib.contextmanager
def _analysis_lock(analysis_dir: Path) -> Iterator[None]:
    """Hold ``analysis/.lock`` for the whole analysis, or fail at once naming the holder.

    An OS lock (flock), not a marker file: the kernel releases it when its holder dies, even by
    SIGKILL, so a killed analysis never blocks the next one. (On network filesystems without
    flock support the lock is advisory at best; the per-file writes are atomic regardless.)
    """
    analysis_dir.mkdir(parents=True, exist_ok=True)
    path = analysis_dir / LOCK_FILE
    fh = open(path, "a+", encoding="utf-8")
    try:
        if not _try_lock(fh):
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            raise AnalysisError(
                f"{analysis_dir}: another analysis of this run is writing here ({holder}); wait "
                "for it to finish (analyze(..., write=False) computes without writing)"
            )
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            _unlock(fh)
    finally:
        fh.close()


def _try_lock(fh: Any) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(fh: Any) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(analysis_dir: Path) -> None:
    """Temp files left by a killed analysis (the lock is ours, so none is being written now)."""
    for d in (analysis_dir, analysis_dir / PAIRS_DIR):
        if d.is_dir():
            for f in d.glob(".*.tmp-*"):
                with contextlib.suppress(OSError):
                    f.unlink()


# --- progress ------------------------------------------------------------------------------------


class _Progress:
    """Pairs done / total, rate and ETA on stderr (tqdm); silent when disabled."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit="pair", desc="analyze", file=sys.stderr,
                            dynamic_ncols=True)

    def pair_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the public entry points ---------------------------------------------------------------------


def _objective_id(source: ObjectiveSource, recorded: str | None) -> str:
    if source is None:
        return str(recorded)
    if isinstance(source, str):
        return source
    if isinstance(source, Objective):
        return f"Objective({type(source.model).__qualname__})"
    mod = getattr(source, "__module__", "?")
    if mod == "__main__":  # a script's factory: name it as the recorder does (file stem)
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        mod = Path(main_file).stem if main_file else mod
    return f"{mod}:{getattr(source, '__qualname__', '?')}"


def _select_steps(pairs: list[int], steps: str | slice | Iterable[int] | None) -> list[int]:
    if steps is None:
        return pairs
    if isinstance(steps, str):
        parts = steps.split(":")
        try:
            nums = [int(p) if p else None for p in parts]
        except ValueError:
            raise AnalysisError(f"steps={steps!r}: expected START:STOP[:STRIDE]") from None
        if len(nums) not in (2, 3):
            raise AnalysisError(f"steps={steps!r}: expected START:STOP[:STRIDE]")
        steps = slice(*nums)
    if isinstance(steps, slice):
        start = steps.start or 0
        stop = steps.stop if steps.stop is not None else float("inf")
        stride = 1 if steps.step is None else steps.step
        if stride < 1:
            raise AnalysisError(f"steps={steps!r}: the stride must be >= 1")
        return [t for t in pairs if start <= t < stop and (t - start) % stride == 0]
    wanted = set(steps)
    return [t for t in pairs if t in wanted]


def analyze(
    run: str | Path | Run,
    objective: ObjectiveSource = None,
    *,
    points: int = 9,
    margin: float = 0.5,
    device: str = "auto",
    dtype: str = "float32",
    scheduler: Any = "synchronous",
    workers: int | None = None,
    steps: str | slice | Iterable[int] | None = None,
    metrics: Iterable[str] | None = None,
    batched: bool = True,
    chunk_size: int | None = None,
    sharpness: bool = False,
    sharpness_max_iter: int = 100,
    reference: int | None = None,
    force: bool = False,
    write: bool = True,
    progress: bool | None = None,
) -> xr.Dataset:
    """Analyze a recorded run and return the metrics Dataset (also written to ``analysis/``).

    Args:
        run: run directory (or an opened :class:`Run`).
        objective: ``"module:function"``, a factory function, or an :class:`Objective`; default:
            the name recorded in the manifest.
        points, margin: α grid (``points`` on [0, 1], extended by ``margin`` on both sides).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available). With several
            GPUs, ``cuda``/``auto`` gives each worker its own GPU (set ``workers`` to the count).
        dtype: evaluation dtype, ``float32`` or ``float64`` (independent of the training dtype).
        scheduler: ``synchronous`` (this thread), ``threads``, ``processes``, a dask.distributed
            scheduler address (``tcp://host:8786``) or a ``distributed.Client``. The results
            are the same under every scheduler. A cluster's workers must see the run directory
            at the same path and be able to import the objective.
        workers: worker count for ``threads``/``processes`` (default: one per core). Torch
            intra-op threads are split between them.
        steps: which pairs, by start step: ``"START:STOP[:STRIDE]"``, a slice, or step numbers.
        metrics: metric names (default: every registered metric).
        batched, chunk_size: evaluate the α points together with ``vmap``, at most
            ``chunk_size`` at a time (default: all; halved automatically when out of memory).
        sharpness: also compute λ_max(∇²f(x_t; z_t)) per pair by Lanczos (at most
            ``sharpness_max_iter`` Hessian-vector products); implied when ``metrics`` names a
            metric that needs it.
        reference: step of the reference point x* of ``convexity_ratio_ref`` (default: the final
            recorded state; a run without one gets NaN unless a step is given).
        force: recompute pairs already persisted under ``analysis/pairs``.
        write: write ``analysis/metrics.nc`` and the per-pair results (and reuse those already
            there); False computes everything in memory and writes nothing.
        progress: show a progress bar (default: when stderr is a terminal).
    """
    r = run if isinstance(run, Run) else open_run(run)
    if dtype not in ("float32", "float64"):
        raise AnalysisError(f"dtype={dtype!r}: expected float32 or float64")
    scheduler = check_scheduler(scheduler)
    check_device(device)
    local = isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise AnalysisError(f"chunk_size={chunk_size!r}: expected an int >= 1 or None")
    selected = get_metrics(metrics)
    # Naming an opt-in metric asks for its probe; otherwise opt-in metrics follow the flags.
    sharpness = sharpness or (metrics is not None and any("sharpness" in s.needs for s in selected.values()))
    provided = {"sharpness"} if sharpness else set()
    selected = {n: s for n, s in selected.items() if set(s.needs) <= provided}
    # An optional probe's results come with its diagnostics (e.g. sharpness with its iteration
    # count and convergence flag): every metric reading only what is provided is free by now.
    for n, s in get_metrics().items():
        if s.needs and set(s.needs) <= provided:
            selected.setdefault(n, s)
    ref_step = _reference_step(r, reference)
    settings = ProbeSettings(
        alphas=tuple(float(a) for a in alpha_grid(points, margin)),
        # Local: resolved here, so a missing GPU fails before any work. A cluster's workers
        # resolve the spec themselves (this machine may have no GPU at all).
        device=resolve_device(device) if local else device,
        dtype=dtype,
        chunk_size=chunk_size,
        batched=batched,
        sharpness=sharpness,
        sharpness_max_iter=sharpness_max_iter,
        reference_step=ref_step,
    )
    specs = _with_requirements(selected, get_metrics())
    pairs = _select_steps(r.pairs, steps)
    lost_all = health.lost_pairs(r)  # issue 7: pairs whose snapshot file went missing
    lost = {t: lost_all[t] for t in _select_steps(list(lost_all), steps)}
    if not pairs and lost:
        first = min(lost)
        raise RunFormatError(f"{r.path}: every selected pair is lost; first: pair {first}: {lost[first]}")
    if not pairs:
        raise AnalysisError(
            f"{r.path}: no analyzable pairs (recorded steps: {len(r.steps)}; a pair needs "
            "snapshots of two consecutive steps; check the schedule's window >= 2 or --steps)"
        )
    # Resolve once here so import errors and name/shape mismatches surface before any work.
    check_run_objective(_objective_for(objective, r.objective), r.manifest)
    objective_id = _objective_id(objective, r.objective)
    digest = _settings_digest(settings, objective_id)
    analysis_dir = r.path / fmt.ANALYSIS_DIR
    pairs_dir = analysis_dir / PAIRS_DIR
    if write:
        fmt.safe_output_dir(r.path, fmt.ANALYSIS_DIR, PAIRS_DIR)  # issue 7: no symlinked way out

    with _analysis_lock(analysis_dir) if write else contextlib.nullcontext():
        done = _PairTable(pairs)
        if write:
            _remove_stale_temporaries(analysis_dir)
            if not force:
                for t in pairs:
                    s = _load_pair(_pair_path(pairs_dir, t), digest)
                    if s is not None:
                        done.put(s)
        todo = [t for t in pairs if t not in done]
        skipped = dict(lost)  # issue 7: damaged/missing snapshots cost only their pairs
        bar = _Progress(len(pairs), len(done), sys.stderr.isatty() if progress is None else progress)
        try:
            if todo:
                _import_dataset_libraries_in_background()
                with open_backend(scheduler, workers) as backend:
                    _run_pairs(backend, r, todo, done, skipped, objective, settings, device, digest,
                               pairs_dir if write else None, bar.pair_done)
        finally:
            bar.close()
        ordered = [done.get(t) for t in pairs if t in done]
        if not ordered:
            first = min(skipped)
            raise RunFormatError(
                f"{r.path}: all {len(skipped)} pair(s) were skipped as damaged or missing; "
                f"first: pair {first}: {skipped[first]}"
            )
        values = [compute_pair_metrics(s, list(specs.values())) for s in ordered]
        ds = build_dataset(ordered, values, specs, r, settings, objective_id)
        health.record_skipped(ds, skipped, len(pairs) + len(lost))
        if write:
            _write_dataset(ds, analysis_dir / METRICS_FILE)
    return ds


def _import_dataset_libraries_in_background() -> None:
    """Import xarray, dask.array and h5netcdf while the pairs are probed, not after.

    The driver needs them only to build and write the Dataset at the end, where their first
    import (~1 s: xarray, then the dask.array it probes for duck arrays, then h5netcdf) was a
    serial tail after the last pair, longer than a hundred pairs of parallel work on 2 workers.
    Worker processes never import them.
    """
    if "h5netcdf" in sys.modules:
        return
    # dask.compute imports `distributed` (when installed) to look for a client, in this thread, a
    # moment from now. Import it first: two threads importing overlapping packages at once can
    # meet in a circular import, which Python reports as a deadlock error in one of them. After
    # this, this thread's remaining lazy imports (torch's) share no module with the ones below.
    with contextlib.suppress(ImportError):
        import distributed  # noqa: F401

    def work() -> None:
        with contextlib.suppress(Exception):  # the real import, later, reports any problem
            import dask.array  # noqa: F401
            import h5netcdf  # noqa: F401
            import xarray  # noqa: F401

    threading.Thread(target=work, name="trajscope-import", daemon=True).start()


def _run_pairs(backend: Backend, r: Run, todo: list[int], done: _PairTable,
               skipped: dict[int, str], objective: ObjectiveSource, settings: ProbeSettings, device: str, digest: str,
               pairs_dir: Path | None, on_pair: Callable[[], None]) -> None:
    """Probe the ``todo`` pairs on ``backend`` in windows; two windows in flight at a time."""
    # A shipped function or Objective has no stable identity in a worker; name it once here.
    objective_key = (objective if isinstance(objective, str)
                     else r.objective if objective is None
                     else f"{_objective_id(objective, r.objective)}#{uuid.uuid4().hex}")
    placement = backend.placement(device, pin=PIN_MEMORY and settings.device.startswith("cuda"))
    run_token = hashlib.sha256(str(r.path.resolve()).encode()).hexdigest()[:10]
    have = set(r.steps)
    init_step = r.steps[0] if r.steps and r.steps[0] == 0 else None
    size = max(MIN_WINDOW, PAIRS_PER_WORKER * backend.workers)
    in_flight: collections.deque[Callable[[], list[Any]]] = collections.deque()
    for i in range(0, len(todo), size):
        tasks = _window_graph(r, todo[i : i + size], have, init_step, run_token, objective,
                              objective_key, settings, placement, digest, pairs_dir)
        in_flight.append(backend.submit(tasks, on_pair))
        if len(in_flight) == 2:
            _collect(in_flight.popleft()(), done, skipped)
    while in_flight:
        _collect(in_flight.popleft()(), done, skipped)


def _collect(results: list[Any], done: _PairTable, skipped: dict[int, str]) -> None:
    for s in results:
        if isinstance(s, health.SkippedPair):
            skipped[s.step] = s.reason
        else:
            done.put(s)


def _window_graph(r: Run, window: list[int], have: set[int], init_step: int | None, run_token: str,
                  objective: ObjectiveSource, objective_key: str, settings: ProbeSettings,
                  placement: Placement, digest: str, pairs_dir: Path | None) -> list[Any]:
    """The delayed pair tasks of one window, over load tasks shared by adjacent pairs."""
    loads: dict[int, Any] = {}

    def load(step: int) -> Any:
        # One load per snapshot, shared by the up-to-three pairs of the window that read it.
        if step not in loads:
            if placement.by_path:
                # A local process pool: a load task would only send a file reference through
                # the driver, one pool round trip (~3.5 ms) per snapshot. The pair task is given
                # the reference and reads the file in its own worker (per-process cache).
                loads[step] = _file_ref(str(r.step_path(step)), params_only=False)
            else:
                loads[step] = dask.delayed(_load_task, pure=True)(
                    str(r.step_path(step)), placement.pin, placement.by_path,
                    dask_key_name=(f"load-{run_token}", step),
                )
        return loads[step]

    def params_of(step: int | None) -> Any:
        # x_0 and x* enter every pair, through their parameters alone: a small shared task
        if step is None:
            return None
        if placement.by_path:
            return _file_ref(str(r.step_path(step)), params_only=True)
        return dask.delayed(_load_params_task, pure=True)(
            str(r.step_path(step)), placement.by_path, dask_key_name=(f"params-{run_token}", step)
        )

    init = params_of(init_step)
    ref = params_of(settings.reference_step)
    # The arguments every pair shares are bound once: dask walks the arguments of each delayed
    # call looking for collections, and these (settings, names, placement) would be walked anew
    # for every pair. Naming the function also spares tokenizing it.
    probe = dask.delayed(
        functools.partial(_pair_task, source=objective, recorded=r.objective, settings=settings,
                          trainable=r.trainable, digest=digest, placement=placement,
                          objective_key=objective_key),
        pure=True, name=f"pair-task-{digest}",
    )
    tasks = []
    for t in window:
        prev = load(t - 1) if (t - 1) in have and r.kind(t - 1) == fmt.KIND_STEP else None
        out = str(_pair_path(pairs_dir, t)) if pairs_dir is not None else None
        tasks.append(probe(load(t), load(t + 1), prev, init, out=out, ref=ref,
                           dask_key_name=(f"pair-{digest}-{run_token}", t)))
    return tasks


def _with_requirements(selected: dict[str, MetricSpec], everything: dict[str, MetricSpec]) -> dict[str, MetricSpec]:
    out = dict(selected)
    todo = list(selected.values())
    while todo:  # transitively: a series may read another series
        spec = todo.pop()
        for req in spec.requires:
            if req not in everything:
                raise AnalysisError(f"metric {spec.name!r} requires unknown metric {req!r}")
            if req not in out:
                out[req] = everything[req]
                todo.append(everything[req])
    # pair metrics first, then series; each group in registration order, so a series registered
    # after the series it reads is computed after it
    order = {n: i for i, n in enumerate(everything)}
    return dict(sorted(out.items(), key=lambda kv: (kv[1].kind != "pair", order.get(kv[0], 0))))


def _reference_step(run: Run, reference: int | None) -> int | None:
    """x* of convexity_ratio_ref: the given step, else the final state.

    A run without a final state (still recording, or crashed) has no default: its last snapshot
    moves as the run grows, and a moving x* would invalidate every persisted pair on each resume.
    convexity_ratio_ref is then NaN unless ``reference`` names a step.
    """
    if reference is None:
        return run.final_step
    if reference not in run.steps:
        raise AnalysisError(
            f"reference={reference}: step {reference} is not recorded; choose a recorded step "
            f"(first {run.steps[:1]}, last {run.steps[-1:]}) or omit it for the final state"
        )
    return int(reference)


def build_dataset(stats: Sequence[PairStats], values: Sequence[dict[str, np.ndarray]],
                  specs: dict[str, MetricSpec], run: Run, settings: ProbeSettings,
                  objective_id: str) -> xr.Dataset:
    """Stack per-pair metric values along ``step`` and add the series metrics. Pure."""
    values = health.sanitize_values(stats, values, run)  # issue 7: affected metrics NaN, never ±Inf
    steps = np.array([s.step for s in stats], dtype=np.int64)
    layers = list(stats[0].layers) if stats else []
    data_vars: dict[str, Any] = {}
    for name, spec in specs.items():
        if spec.kind != "pair":
            continue
        data_vars[name] = (("step", *spec.dims), np.stack([v[name] for v in values]), spec.attrs())
        if spec.per_layer:
            attrs = spec.attrs() | {"long_name": f"{spec.long_name} (per parameter tensor)"}
            data_vars[f"{name}_by_layer"] = (
                ("step", "layer"), np.stack([v[f"{name}_by_layer"] for v in values]), attrs
            )
    lr = np.array([s.lr[0] if len(s.lr) else np.nan for s in stats], dtype=np.float64)
    coords = {
        "step": ("step", steps, {"long_name": "pair start step t", "units": "optimizer step"}),
        "alpha": ("alpha", np.asarray(settings.alphas), {"long_name": "line coordinate α",
                                                        "units": "1",
                                                        "description": "x_t + αΔ_t"}),
        "layer": ("layer", np.array(layers, dtype=object), {"long_name": "parameter tensor"}),
        "lr": ("step", lr, {"long_name": "learning rate (param group 0)", "units": "1"}),
    }
    import xarray as xr

    ds = xr.Dataset(data_vars, coords=coords)
    for name, spec in specs.items():
        if spec.kind == "series":
            ds[name] = ("step", np.asarray(spec.fn(ds), dtype=np.float64), spec.attrs())
    manifest_bytes = (run.path / fmt.MANIFEST).read_bytes()
    ds.attrs = {
        "title": f"trajscope metrics of {run.path.name}",
        "trajscope_version": __version__,
        "run": str(run.path.resolve()),
        "run_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "run_status": run.status,
        "objective": objective_id,
        "probe": json.dumps(settings.to_json()),
        "device": settings.device,
        "eval_dtype": settings.dtype,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return health.add_flags(ds, stats, run)  # issue 7: pair_flags (non-finite, zero update)


def _write_dataset(ds: xr.Dataset, path: Path) -> None:
    """Write to a temp file, fsync, rename: readers see the old Dataset or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # issue 7: never write through a symlink planted at the temp name
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def open_metrics(run: str | Path | Sequence[str | Path]) -> xr.Dataset:
    """Open the Dataset written by ``trajscope analyze``; several runs concat along ``run``."""
    import xarray as xr

    if isinstance(run, (list, tuple)):
        parts = [open_metrics(p) for p in run]
        names = [Path(p).name for p in run]
        if len(set(names)) < len(names):  # runs/cnn/sgd and runs/convex/sgd: keep them apart
            names = [str(p) for p in run]
        return xr.concat(parts, dim=xr.DataArray(names, dims="run", name="run"), join="outer",
                         combine_attrs="drop_conflicts")
    if not Path(run).is_dir():
        raise RunFormatError(f"{run}: no such run directory")
    path = Path(run) / fmt.ANALYSIS_DIR / METRICS_FILE
    if not path.exists():
        raise RunFormatError(f"{path}: no analysis found; run `trajscope analyze {run}` first")
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()
