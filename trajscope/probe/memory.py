"""Memory budget of an analysis: sizes, available memory, what a worker holds, one point's cost,
the chunk plan.

The batched line evaluation (:func:`trajscope.probe.line.line_batched`) holds the activations of every
α point of a chunk at once, so its memory grows with the chunk. A CPU allocation that fails is a
kill by the kernel, not an exception, so the chunk is planned before the first batched call
instead of shrunk after a failure:

    chunk = min(n, ⌊room / (SAFETY · point_bytes)⌋)

where ``point_bytes`` is the measured peak memory of one α point (its x_t + αΔ_t, the forward
activations and their tangents) above what the process held before it. ``room`` is what the line
may add: with an explicit budget B (``--max-memory``, :attr:`ProbeSettings.memory_strict`), the
budget covers everything the analysis adds to its process, so ``room = B − held`` with ``held``
(:func:`held`) the memory the worker holds above what it held when the analysis began (the
objective's model, the cached snapshots, x_t, x_{t+1}, Δ_t). One pair then needs at least

    held + point_bytes + P

(the line point, or after it the gradient passes: G0 is kept, P bytes, while G1's pass runs, whose
activations a point's cost stands for); a budget below it is one :class:`AnalysisError` naming
it, and :func:`check_pair_minimum` refuses, before any pair, a budget below the least a pair of the
run can hold (:func:`pair_floor`). The default budget (half the available memory) sizes the line
only.

Measuring (:class:`PeakMeter`): on CUDA the caching allocator's peak (``max_memory_allocated``),
on Linux CPUs the resident-set high-water mark (``VmHWM``), after returning the heap's free pages to
the system (``malloc_trim``) so that freed memory glibc kept is not reused unseen. The marks belong
to the process: in a process trajscope owns (the CLI, a pool worker: :func:`own_process`) the
meter resets them to measure; in a caller's process it never does (a user's own
``max_memory_allocated()`` or ``ru_maxrss`` stays true), and a block that sets no new peak is
bounded by the old one (:attr:`PeakMeter.exact` False), a size that plans safely but is not
refused on. Elsewhere (no ``/proc``) the measurement reads 0 and the plan falls back to the
parameters' size per point.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trajscope.errors import AnalysisError

__all__ = ["DEFAULT_FRACTION", "PeakMeter", "available_bytes", "begin", "check_pair_minimum", "default_budget",
           "format_size", "held", "in_use", "own_process", "pair_floor", "parse_size"]

DEFAULT_FRACTION = 0.5
"""Share of the available memory (CPU: ``MemAvailable`` within the cgroup limit; CUDA: the free
device memory) that the line evaluations of an analysis may take by default, split between its
local worker processes."""

SAFETY = 1.25
"""Margin on the measured one-point cost: the allocator rounds, and vmap's batched kernels may
hold a little more per point than the unbatched call that was measured."""

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a string such as ``"4GB"`` (10⁹), ``"512MiB"`` (2²⁰) or ``"1e9"``."""
    if isinstance(value, bool):
        raise AnalysisError(f"max_memory={value!r}: expected a size in bytes or a string like '4GB'")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = _SIZE.match(str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            try:
                n = float(str(value))
            except ValueError:
                raise AnalysisError(
                    f"max_memory={value!r}: expected bytes or a size like '4GB', '512MiB'"
                ) from None
        else:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not (math.isfinite(n) and n >= 1):  # inf, nan, 0 and fractions of a byte alike
        raise AnalysisError(f"max_memory={value!r}: expected a finite size of at least 1 byte")
    return int(n)


def format_size(n: float) -> str:
    """``n`` bytes in words, e.g. ``"1.5 GiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _cgroup_free() -> int | None:
    """Bytes the cgroup limit leaves (v2 ``memory.max`` − ``memory.current``, or v1
    ``memory.limit_in_bytes`` − ``memory.usage_in_bytes``); None without a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 2**60:  # v1 writes a huge number for "no limit"
                return None
            return max(0, int(text) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def available_bytes(device: str) -> int:
    """Memory free for new allocations: the free memory of a CUDA device, or on a CPU the smaller
    of ``MemAvailable`` (``/proc/meminfo``) and what the cgroup limit leaves."""
    if device.startswith("cuda"):
        device_free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(device_free)
    free: int | None = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        free = int(line.split()[1]) * 1024
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = 4 * 2**30  # no way to ask: a size any machine that runs torch has
    cg = _cgroup_free()
    return min(free, cg) if cg is not None else free


def default_budget(device: str, workers: int = 1) -> int:
    """:data:`DEFAULT_FRACTION` of :func:`available_bytes`, split between ``workers``."""
    return int(DEFAULT_FRACTION * available_bytes(device) / max(1, workers))


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    return None


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the system (no-op elsewhere), so that a measurement sees
    the pages it touches instead of reusing freed ones that are still resident."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_OWNED = False
"""Whether trajscope owns this process (:func:`own_process`): its peak-memory marks are ours to reset."""
_ORIGINS: dict[str, int] = {}
"""Analysis id (``ProbeSettings.plan_id``) → bytes in use on its device when it began in this process."""
_PROCESS_ORIGIN: int | None = None
"""Resident bytes when this process became trajscope's own (:func:`own_process`)."""


def own_process() -> None:
    """Declare this process trajscope's own (the CLI's, or a pool worker's): :class:`PeakMeter` may
    reset its peak-memory marks, and what it holds now is where its analyses' memory starts."""
    global _OWNED, _PROCESS_ORIGIN
    _OWNED = True
    _PROCESS_ORIGIN = in_use("cpu")


def in_use(device: str) -> int | None:
    """Bytes this process holds now: allocated on a CUDA device, or its resident set after the
    heap's free pages went back to the system; None where that cannot be read."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    _malloc_trim()
    return _status_kib("VmRSS")


def begin(analysis: str, device: str) -> None:
    """Note what this process holds as the analysis ``analysis`` begins (see :func:`held`)."""
    used = in_use(device)
    if used is not None:
        _ORIGINS[analysis] = used
        while len(_ORIGINS) > 16:  # a long-lived process runs many analyses: keep the recent ones
            del _ORIGINS[next(iter(_ORIGINS))]


def held(analysis: str, device: str) -> int:
    """Bytes this process holds on ``device`` above what it held when ``analysis`` began here (or
    when it became a pool worker); 0 where neither is known (a cluster's worker) or unreadable."""
    origin = _ORIGINS.get(analysis)
    if origin is None:  # a pool worker: a fresh process allocated nothing on a device before its tasks
        origin = 0 if device.startswith("cuda") else _PROCESS_ORIGIN
    used = in_use(device)
    return max(0, used - origin) if used is not None and origin is not None else 0


def _peak_mark(device: str, cuda: bool) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if cuda else _status_kib("VmHWM")


@dataclass
class PeakMeter:
    """Peak memory (bytes) and seconds of the block, above what was held at its start.

    ``with PeakMeter(device) as m: ...`` then ``m.peak``, ``m.exact``, ``m.seconds``. ``m.peak`` is
    0 where the platform gives no way to measure (see the module docstring)."""

    device: str
    memory: bool = True
    """False: time the block only (no trim of the heap, whose fresh pages would slow the block)."""
    peak: int = 0
    exact: bool = True
    """False: the block set no new peak in a process whose marks are not ours to reset, and
    ``peak`` is the old peak's height above the block's start, an upper bound."""
    seconds: float = 0.0

    @contextlib.contextmanager
    def _measure(self) -> Iterator[PeakMeter]:
        cuda = self.device.startswith("cuda") and torch.cuda.is_available()
        start = before = None
        if cuda or self.memory:
            start = in_use(self.device if cuda else "cpu")
            if cuda and _OWNED:
                torch.cuda.reset_peak_memory_stats(self.device)
            elif not cuda and _OWNED:
                _reset_hwm()
            before = _peak_mark(self.device, cuda)
        t0 = time.perf_counter()
        yield self
        if cuda:
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - t0
        after = _peak_mark(self.device, cuda) if start is not None else None
        if start is not None and before is not None and after is not None:
            self.peak = max(0, after - start)
            self.exact = after > before or before <= start

    def __enter__(self) -> PeakMeter:
        self._cm = self._measure()
        return self._cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)  # type: ignore[arg-type]


def _reset_hwm() -> None:
    """Reset this process's resident-set high-water mark to its resident set (Linux; a no-op
    where ``clear_refs`` is not writable)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def pair_floor(model_bytes: int, snapshot_bytes: int, param_bytes: int) -> int:
    """The least memory one pair of a run can hold: two snapshots (x_t with g_t and z_t, x_{t+1}),
    the objective's model, and three parameter-sized vectors (Δ_t, one α point's x_t + αΔ_t, then
    G0), bytes. The activations come on top."""
    return model_bytes + 2 * snapshot_bytes + 3 * param_bytes


def check_pair_minimum(budget: int, floor: int, what: str) -> None:
    """Refuse an explicit budget below ``floor`` (:func:`pair_floor`), before any pair runs.

    Raises:
        AnalysisError: naming the floor and what it is made of (``what``).
    """
    if budget < floor:
        raise AnalysisError(
            f"--max-memory (max_memory=) gives {format_size(budget)} per worker, below the "
            f"{format_size(floor)} one pair of this run holds at least ({what}); raise it or use fewer workers"
        )


def plan_room(budget: int, held_bytes: int, point_bytes: int, param_bytes: int, strict: bool,
              exact: bool) -> int:
    """Bytes the line may add: ``budget − held_bytes`` under an explicit (``strict``) budget,
    ``budget`` otherwise.

    Raises:
        AnalysisError: under an explicit budget, when a measured (``exact``) pair does not fit:
            ``held_bytes + point_bytes + param_bytes > budget`` (see the module docstring).
    """
    if not strict:
        return budget
    need = held_bytes + point_bytes + param_bytes
    if exact and need > budget:
        raise AnalysisError(
            f"one pair needs {format_size(need)} of memory ({format_size(held_bytes)} held: the model, "
            f"snapshots and x_t, x_(t+1), Δ_t; one α point {format_size(point_bytes)}; the gradient G0 "
            f"{format_size(param_bytes)}), more than the budget of {format_size(budget)} per worker; "
            "raise --max-memory (max_memory=) or use fewer workers"
        )
    return max(1, budget - held_bytes)


def plan_chunk(budget: int, point_bytes: int, n: int, exact: bool = True) -> int:
    """α points per batched call: ``min(n, ⌊budget / (SAFETY · point_bytes)⌋)``, at least 1.

    Raises:
        AnalysisError: when one measured (``exact``) point does not fit the budget.
    """
    if point_bytes > budget and exact:
        raise AnalysisError(
            f"one α point of the line needs {format_size(point_bytes)} of memory, more than the "
            f"budget of {format_size(budget)} per worker; raise --max-memory (max_memory=) or use fewer workers"
        )
    return max(1, min(n, int(budget // (SAFETY * max(1, point_bytes)))))
