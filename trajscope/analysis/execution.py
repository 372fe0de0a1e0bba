"""Where the analysis graph runs: one small interface over dask's schedulers.

Every scheduler runs the same pair task on the same snapshot references (see
:mod:`trajscope.analysis.tasks`). A backend decides where tasks run, and its :class:`Placement` how
snapshots reach them:

* ``synchronous``: in the calling thread (debugging, profiling);
* ``threads``: a pool of N threads in this process (GPUs; no data is copied between tasks);
* ``processes``: a pool of N spawned processes (CPU-bound models), through dask's multiprocessing
  scheduler; pair tasks are given the snapshot references and read the files in their own worker
  (``Placement.by_path``) rather than receiving loaded snapshots through the driver;
* ``tcp://host:port`` (any dask.distributed address) or a ``distributed.Client``: a cluster, whose
  workers see the run directory at the same path; a loaded snapshot that moves between workers
  pickles as plain arrays (:class:`trajscope.analysis.loading.ShippedSnapshot`).

Each backend runs one graph at a time (the analyzer feeds it bounded windows of pairs) and calls
``on_pair`` once per finished pair, for the progress bar. What each worker needs to know about
itself (torch threads, which GPU) travels with the tasks as a :class:`Placement` and is applied
inside the task, so it holds under every backend, including workers that joined a cluster late.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.local
import dask.multiprocessing
import dask.threaded
from dask.callbacks import Callback

from trajscope.analysis.process import die_with_parent, keep_freed_memory
from trajscope.errors import AnalysisError

__all__ = [
    "LOCAL_SCHEDULERS",
    "Backend",
    "Placement",
    "check_device",
    "check_scheduler",
    "open_backend",
    "resolve_device",
]

LOCAL_SCHEDULERS = ("synchronous", "threads", "processes")

# Each local scheduler's function. dask.compute is given the function, not its name: given a name,
# it imports `distributed` to look for a client, which a local analysis never has.
_LOCAL_GET: dict[str, Callable[..., Any]] = {
    "synchronous": dask.local.get_sync,
    "threads": dask.threaded.get,
    "processes": dask.multiprocessing.get,
}


# --- scheduler and device specifications ---------------------------------------------------------


def check_scheduler(scheduler: Any) -> Any:
    """Validate ``scheduler=``: a local scheduler name, a dask.distributed address or Client."""
    if isinstance(scheduler, str):
        if scheduler == "sync":
            return "synchronous"
        if scheduler in LOCAL_SCHEDULERS or "://" in scheduler:
            return scheduler
    elif type(scheduler).__name__ == "Client" and hasattr(scheduler, "scheduler_info"):
        return scheduler
    raise AnalysisError(
        f"scheduler={scheduler!r}: expected synchronous, threads, processes, a dask.distributed "
        "address such as tcp://host:8786, or a distributed.Client"
    )


def check_device(device: str) -> str:
    """Validate the syntax of ``device=`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``)."""
    if device in ("cpu", "cuda", "auto"):
        return device
    if device.startswith("cuda:") and device[5:].isdigit():
        return device
    raise AnalysisError(f"device={device!r}: expected cpu, cuda, cuda:N or auto")


def resolve_device(spec: str, slot: int = 0) -> str:
    """The torch device a worker evaluates on.

    ``auto`` is CUDA when this worker sees a GPU. An unindexed ``cuda`` on a machine with several
    GPUs gives worker ``slot`` the GPU ``slot mod count``: one worker per device when the worker
    count equals the GPU count.
    """
    import torch

    spec = check_device(spec)
    if spec == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if spec == "auto":
            return "cpu"
        raise AnalysisError(f"device={spec!r}: CUDA is not available on this machine; use cpu or auto")
    count = torch.cuda.device_count()
    if spec in ("auto", "cuda"):
        return f"cuda:{slot % count}" if count > 1 else "cuda"
    if int(spec[5:]) >= count:
        raise AnalysisError(f"device={spec!r}: this machine has {count} CUDA device(s)")
    return spec


# --- per-worker placement ------------------------------------------------------------------------


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. ``taskset`` or a batch job's
    allocation), not every core of the machine: the number to split between workers."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_slot_local = threading.local()
_slot_counter = itertools.count()
_slot_lock = threading.Lock()
_process_slot: int | None = None  # set in a pool process by _init_process


def _worker_slot(slots: dict[str, int]) -> int:
    """This worker's index among the workers of its machine (0 for synchronous)."""
    if slots:
        try:
            from distributed import get_worker

            return slots.get(get_worker().address, 0)
        except (ImportError, ValueError):
            pass
    if _process_slot is not None:
        return _process_slot
    slot = getattr(_slot_local, "slot", None)
    if slot is None:
        with _slot_lock:
            slot = _slot_local.slot = next(_slot_counter)
    return slot


def split_cores(cores: int, procs: int) -> int:
    """Torch intra-op threads for each of ``procs`` processes probing at once on ``cores`` cores.

    One core is left to the driver (dask's scheduler loop, results, loading) whenever a worker
    would get several threads: a team of intra-op threads spin-waits at every parallel region,
    and one member preempted by the driver stalls the rest (measured in docs/performance.md,
    benchmarks/workers.py).
    """
    if procs >= cores:
        return 1
    return max(1, (cores - 1) // procs)


@dataclass(frozen=True)
class Placement:
    """How a task sets up its worker: torch threads and device. Applied inside each task.

    Attributes:
        device: the ``device=`` spec (``cpu``, ``cuda``, ``cuda:N``, ``auto``), resolved per worker.
        threads: torch intra-op threads per worker; None leaves the worker's setting alone.
        threads_by_worker: per distributed worker address (a cluster mixes machines).
        slots: distributed worker address → index among the workers of its host.
        pin: page-lock loaded snapshots so host→device copies are asynchronous DMA.
        by_path: pair tasks are given snapshot references and resolve them in their own
            process, with no load tasks (local process pools: one machine, one page cache).
    """

    device: str = "cpu"
    threads: int | None = None
    threads_by_worker: dict[str, int] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)
    pin: bool = False
    by_path: bool = False

    def apply(self) -> str:
        """Set this worker's torch threads; return the device it evaluates on."""
        import torch

        keep_freed_memory()

        threads = self.threads
        if self.threads_by_worker:
            try:
                from distributed import get_worker

                threads = self.threads_by_worker.get(get_worker().address, threads)
            except (ImportError, ValueError):
                pass
        # Per thread: torch's intra-op setting is per thread under OpenMP (checked), so each
        # worker thread sets its own and the caller's thread keeps its setting.
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return resolve_device(self.device, _worker_slot(self.slots))


def _init_process(threads: int, counter: Any) -> None:
    """Initializer of a pool process: its torch threads (the environment variables too, for any
    library that reads them later), its slot among the workers, and its death with the driver."""
    global _process_slot
    die_with_parent()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from trajscope.probe import memory

    memory.own_process()
    with counter.get_lock():
        _process_slot = counter.value
        counter.value += 1


def _warm_up() -> int:
    """A first task per pool process, run while the driver scans the run: imports what the real
    tasks need, including the torch modules that the first vmap/jvp imports lazily (seconds)."""
    import torch
    from torch.func import functional_call, jvp, vmap

    # What a pair task runs: the probe and persistence (and, through the package, the task module).
    import trajscope.analysis.persist
    import trajscope.probe.pair  # noqa: F401

    lin = torch.nn.Linear(2, 1)
    p = {n: t.detach() for n, t in lin.named_parameters()}

    def f(q: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(lin, q, (torch.ones(1, 2),)).reshape(1, 1),
                                                 torch.zeros(1, dtype=torch.long))

    with torch.no_grad():
        vmap(lambda a: jvp(f, ({n: t * a for n, t in p.items()},), (p,)))(torch.ones(2))
    from trajscope.probe import memory

    memory.own_process()  # the libraries are loaded: what the pairs hold is counted from here
    return os.getpid()


# --- backends ------------------------------------------------------------------------------------


class _PairCallback(Callback):
    """Calls ``on_pair`` when a ``pair-*`` task finishes (local schedulers run callbacks here)."""

    def __init__(self, on_pair: Callable[[], None]) -> None:
        super().__init__()
        self.on_pair = on_pair

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if isinstance(name, str) and name.startswith("pair-"):
            self.on_pair()


class Backend(abc.ABC):
    """Runs task graphs on workers it owns (a pool) or reaches (a cluster).

    :meth:`submit` starts one graph and returns at once (except ``synchronous``, which runs it
    in the caller's thread), so the analyzer keeps the next window of pairs queued while the
    current one finishes: no worker idles at a window boundary.
    """

    name: str = ""
    workers: int = 1
    """How many tasks run at once (the analyzer sizes its windows of pairs by this)."""

    @abc.abstractmethod
    def placement(self, device: str, pin: bool) -> Placement:
        """Where this backend's pair tasks run (threads, device) for ``device``."""

    @abc.abstractmethod
    def submit(self, tasks: Sequence[Any], on_pair: Callable[[], None]) -> Callable[[], list[Any]]:
        """Start computing ``tasks``; the returned function waits for and returns their results."""

    def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing to release
        pass


class _Queued:
    """A process pool as dask's multiprocessing scheduler sees it, ``depth`` times as wide.

    That scheduler keeps at most one task per worker submitted and sends a task's dependents
    only after its result has come back through the driver, a few milliseconds per hop, which
    leaves each worker idle between tasks; with a second task queued behind the running one, the
    worker goes straight on to it. Only queueing
    deepens: the pool still runs ``workers`` tasks at once.
    """

    def __init__(self, pool: Executor, depth: int) -> None:
        self._pool = pool
        self._max_workers = pool._max_workers * depth  # type: ignore[attr-defined]

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return self._pool.submit(fn, *args, **kwargs)


class LocalBackend(Backend):
    """dask's synchronous, threaded or multiprocessing scheduler over a pool this object owns.

    Owning the pool (rather than letting each ``dask.compute`` make one) keeps the worker
    processes, their imports and their cached objectives alive from one window to the next.
    """

    def __init__(self, kind: str, workers: int | None) -> None:
        self.name = kind
        cores = usable_cores()
        self.workers = 1 if kind == "synchronous" else (workers or cores)
        # Torch threads per worker: the cores split between the processes that probe at once, so
        # they do not oversubscribe the machine. Thread workers probe one at a time (see
        # tasks._PROBE_LOCK), so each may use the cores; synchronous keeps the caller's setting.
        self.threads = None if kind == "synchronous" else split_cores(
            cores, 1 if kind == "threads" else self.workers)
        self.pool: Executor | None = None
        self._driver: ThreadPoolExecutor | None = None
        if kind == "threads":
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="trajscope")
        elif kind == "processes":
            ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools is unsafe
            counter = ctx.Value("i", 0)
            # (typeshed types the initializer as taking no arguments)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx,
                                            initializer=_init_process,  # type: ignore[arg-type]
                                            initargs=(self.threads, counter))  # type: ignore[arg-type]
            # Start every process now: they import torch while the driver scans the run.
            self._warm = [self.pool.submit(_warm_up) for _ in range(self.workers)]

    def placement(self, device: str, pin: bool) -> Placement:
        procs = self.name == "processes"
        return Placement(device=device, threads=self.threads, pin=pin and not procs, by_path=procs)

    def _compute(self, tasks: Sequence[Any], on_pair: Callable[[], None]) -> list[Any]:
        kw: dict[str, Any] = {"scheduler": _LOCAL_GET[self.name], "callbacks": [_PairCallback(on_pair)._callback]}
        if self.pool is not None:
            kw["pool"] = self.pool
        if self.name == "processes":
            assert self.pool is not None  # made in __init__ for processes
            kw["pool"] = _Queued(self.pool, depth=4)
            kw["chunksize"] = 1  # a pair is much more work than a dispatch: balance, do not batch
        return list(dask.compute(*tasks, **kw))

    def submit(self, tasks: Sequence[Any], on_pair: Callable[[], None]) -> Callable[[], list[Any]]:
        if self.pool is None:  # synchronous: here and now, in the caller's thread
            result = self._compute(tasks, on_pair)
            return lambda: result
        if self._driver is None:
            # Each dask.compute blocks its thread and keeps at most `workers` tasks in the pool,
            # so two graphs in flight need two driver threads; the pool runs them in order.
            self._driver = ThreadPoolExecutor(2, thread_name_prefix="trajscope-driver")
        return self._driver.submit(self._compute, tasks, on_pair).result

    def close(self) -> None:
        # On an error or interrupt, graphs may still be in flight. Shutting the pool without
        # cancelling lets the tasks already queued finish (at most `workers` per graph); the
        # waiting dask.compute then fails to submit more and returns, so the driver threads end.
        # (Cancelling would strand dask.compute waiting for results that never come.)
        if self.pool is not None:
            self.pool.shutdown(wait=False)
        if self._driver is not None:
            self._driver.shutdown(wait=True)
            self._driver = None
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


class DistributedBackend(Backend):
    """A dask.distributed cluster, reached by address (connection owned) or by a Client."""

    def __init__(self, scheduler: Any, timeout: float = 30.0) -> None:
        try:
            from distributed import Client
        except ImportError:  # pragma: no cover - distributed is a dependency
            raise AnalysisError(f"scheduler={scheduler!r}: needs the dask.distributed package") from None
        self.name = "distributed"
        self._pending: list[Any] = []
        if isinstance(scheduler, str):
            try:
                self.client = Client(scheduler, timeout=timeout, set_as_default=False)
            except OSError as exc:
                raise AnalysisError(f"scheduler={scheduler!r}: cannot connect ({exc})") from None
            self._owned = True
        else:
            self.client = scheduler
            self._owned = False
        info = self.client.scheduler_info()["workers"]
        if not info:
            self.close()
            raise AnalysisError(f"scheduler={scheduler!r}: the cluster has no workers")
        self.workers = sum(int(w.get("nthreads", 1)) for w in info.values())
        # Per host: the cores split between its worker processes (each probes one pair at a
        # time, whatever its thread count), and each worker's index there (its GPU).
        cores = self.client.run(usable_cores)
        pids = self.client.run(os.getpid)
        by_host: dict[str, list[str]] = {}
        for addr, w in sorted(info.items()):
            by_host.setdefault(str(w.get("host", addr)), []).append(addr)
        self.threads_by_worker: dict[str, int] = {}
        self.slots: dict[str, int] = {}
        for addrs in by_host.values():
            procs = len({pids.get(a, a) for a in addrs})  # in-process workers share one process
            for i, a in enumerate(addrs):
                self.threads_by_worker[a] = split_cores(int(cores.get(a) or 1), procs)
                self.slots[a] = i

    def placement(self, device: str, pin: bool) -> Placement:
        # No pinning: snapshots reach a worker by network or pickle, not by a page-locked read.
        return Placement(device=device, threads=None, threads_by_worker=self.threads_by_worker,
                         slots=self.slots)

    def submit(self, tasks: Sequence[Any], on_pair: Callable[[], None]) -> Callable[[], list[Any]]:
        futures = self.client.compute(list(tasks))
        self._pending.extend(futures)

        def wait() -> list[Any]:
            from distributed import as_completed

            for fut in as_completed(futures, loop=self.client.loop):
                if fut.status == "error":
                    fut.result()  # raises the task's own exception
                on_pair()
            out = list(self.client.gather(futures))
            self._pending = [f for f in self._pending if f not in futures]
            return out

        return wait

    def close(self) -> None:
        if self._pending:  # an interrupted analysis leaves no work behind on a shared cluster
            self.client.cancel(self._pending)
            self._pending = []
        if self._owned:
            self.client.close()


@contextlib.contextmanager
def open_backend(scheduler: Any, workers: int | None) -> Iterator[Backend]:
    """The backend for ``scheduler`` (see :func:`check_scheduler`), closed on exit."""
    scheduler = check_scheduler(scheduler)
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise AnalysisError(f"workers={workers!r}: expected an int >= 1")
    if isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS:
        backend: Backend = LocalBackend(scheduler, workers)
    elif workers is not None:
        raise AnalysisError(
            f"workers={workers!r}: applies to the local schedulers; a cluster's workers are set "
            "where the cluster is started"
        )
    else:
        backend = DistributedBackend(scheduler)
    try:
        yield backend
    finally:
        backend.close()
