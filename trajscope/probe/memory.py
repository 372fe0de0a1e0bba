"""Memory budget of the line evaluation: sizes, available memory, one point's cost, the chunk plan.

The batched line evaluation (:func:`trajscope.probe.line.line_batched`) holds the activations of every
α point of a chunk at once, so its memory grows with the chunk. A CPU allocation that fails is a
kill by the kernel, not an exception, so the chunk is planned before the first batched call
instead of shrunk after a failure:

    chunk = min(n, ⌊budget / (SAFETY · point_bytes)⌋)

where ``point_bytes`` is the measured peak memory of one α point (its x_t + αΔ_t, the forward
activations and their tangents) above what the process held before it, and ``budget`` is the
memory the line evaluation of one worker may add on top of what that worker already holds (the
model, the pair's snapshots, the torch runtime). The parameter stacks of a chunk are part of
``point_bytes``: each point holds one copy of the parameters.

Measuring (:class:`PeakMeter`): on CUDA, the caching allocator's peak (``max_memory_allocated``)
since a reset; on Linux CPUs, the resident-set high-water mark (``VmHWM``) reset through
``/proc/self/clear_refs`` after returning the heap's free pages to the system (``malloc_trim``),
so that freed memory glibc kept is not reused unseen. Elsewhere (no ``clear_refs``) the
measurement reads 0 and the plan falls back to the parameters' size per point.
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

__all__ = ["DEFAULT_FRACTION", "PeakMeter", "available_bytes", "default_budget", "format_size", "parse_size"]

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


@dataclass
class PeakMeter:
    """Peak memory (bytes) and seconds of the block, above what was held at its start.

    ``with PeakMeter(device) as m: ...`` then ``m.peak``, ``m.seconds``. ``m.peak`` is 0 where
    the platform gives no way to measure (see the module docstring)."""

    device: str
    memory: bool = True
    """False: time the block only (no trim of the heap, whose fresh pages would slow the block)."""
    peak: int = 0
    seconds: float = 0.0

    @contextlib.contextmanager
    def _measure(self) -> Iterator[PeakMeter]:
        cuda = self.device.startswith("cuda") and torch.cuda.is_available()
        start: int | None = None
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
        elif self.memory:
            _malloc_trim()
            start = _reset_hwm()
        t0 = time.perf_counter()
        yield self
        if cuda:
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - t0
        if cuda:
            self.peak = max(0, torch.cuda.max_memory_allocated(self.device) - (start or 0))
        elif start is not None and self.memory:
            self.peak = max(0, (_status_kib("VmHWM") or start) - start)

    def __enter__(self) -> PeakMeter:
        self._cm = self._measure()
        return self._cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)  # type: ignore[arg-type]


def _reset_hwm() -> int | None:
    """Reset the resident-set high-water mark to the current RSS; the RSS (bytes), or None when
    the mark cannot be reset (not Linux, or ``clear_refs`` not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def plan_chunk(budget: int, point_bytes: int, n: int) -> int:
    """α points per batched call: ``min(n, ⌊budget / (SAFETY · point_bytes)⌋)``, at least 1.

    Raises:
        AnalysisError: when one point does not fit the budget.
    """
    if point_bytes > budget:
        raise AnalysisError(
            f"one α point of the line needs {format_size(point_bytes)} of memory, more than the "
            f"budget of {format_size(budget)} per worker; raise --max-memory (max_memory=) or use fewer workers"
        )
    return max(1, min(n, int(budget // (SAFETY * max(1, point_bytes)))))
