"""What an analysis process sets up for itself: a heap that keeps freed memory for the next pair,
and, in a pool's worker process, an end when the process that started it ends."""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["die_with_parent", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Let this process's heap keep freed memory for reuse (glibc), once per process.

    A probe allocates and frees the same few megabytes of activations and tangents for every pair.
    With glibc's defaults, blocks above its (adaptive) mmap threshold are unmapped when freed and
    the heap top is trimmed back to the OS, so the next pair writes into fresh pages: a large share
    of the line evaluation for a small model (docs/performance.md; benchmarks/line_batching.py
    --allocator keep|default). Keeping up to 256 MB of freed heap, and serving blocks under 32 MB
    from the heap, is close to what jemalloc and tcmalloc do by default. Peak memory is unchanged;
    memory once freed is kept for the next pair instead of being returned.

    Skipped where the user chose for themselves (``MALLOC_*`` variables, ``GLIBC_TUNABLES`` for
    malloc, a preloaded allocator), with ``TRAJSCOPE_KEEP_FREED_MEMORY=0``, and off glibc.
    Returns whether the setting is active.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    env = os.environ
    if (env.get("TRAJSCOPE_KEEP_FREED_MEMORY", "1") == "0" or "LD_PRELOAD" in env
            or any(k.startswith("MALLOC_") for k in env)
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl, macOS: AttributeError)
    except (OSError, AttributeError):
        return False
    _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 256 << 20))
    return _allocator_tuned


def die_with_parent() -> None:
    """End this pool process as soon as the process that started it is gone, even by SIGKILL.

    Otherwise a killed ``trajscope analyze`` leaves its workers computing (and holding its stdout,
    so ``trajscope analyze ... | grep`` never returns). On Linux the kernel sends SIGKILL when the
    parent dies (``PR_SET_PDEATHSIG``; the pool's processes are all started by the thread that
    runs the analysis, which outlives them). Everywhere, a daemon thread exits the process once
    ``os.getppid()`` changes (the orphan is re-parented), checked every 0.2 s.
    """
    import signal
    import sys
    import time

    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # no libc prctl: the watchdog still works
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="trajscope-parent-watch", daemon=True).start()
