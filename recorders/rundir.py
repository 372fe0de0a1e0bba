"""The recorder's run directory: preparing it, and the writer that stores the snapshots in it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from trajscope import confine
from trajscope import runformat as fmt
from trajscope.errors import RecorderError, RunFormatError
from trajscope.recorders.backends import HDF5Writer, SafetensorsWriter
from trajscope.recorders.storage import AsyncWriter, SlotPool

__all__ = ["WRITTEN", "open_writer", "prepare_run_dir", "release_lock"]


WRITTEN = (fmt.MANIFEST, fmt.SCALARS, fmt.STEPS_DIR, fmt.HDF5_FILE, fmt.RECORDING_LOCK)
"""What the recorder writes in a run directory, besides temporary names and the step files inside
``steps/`` (those are created with ``O_EXCL | O_NOFOLLOW`` and renamed into place)."""


def prepare_run_dir(run_dir: Path, storage: str, *, overwrite: bool) -> IO[bytes] | None:
    """Create ``run_dir`` (or empty an existing run in it when ``overwrite``) for a new run, and
    take its :data:`~trajscope.runformat.RECORDING_LOCK` (the open lock file; None where there is
    no ``flock``). The recorder keeps it until the final manifest is written (:func:`release_lock`).

    Every entry of :data:`WRITTEN` (and, with ``overwrite``, the ``analysis/`` and ``report/`` it
    removes) must be absent, a regular file or a real directory: a symlink there would lead a write
    or a removal out of the run (appending to ``scalars.jsonl``, creating ``trajectory.h5``, files
    in ``steps/``), so it is refused before anything is written. Nothing is followed when removing.

    Raises:
        RecorderError: ``run_dir`` holds a run and ``overwrite`` is False; or, naming it, an entry
            above is a symlink or a FIFO, socket or device.
    """
    removed = (fmt.ANALYSIS_DIR, fmt.REPORT_DIR) if overwrite else ()
    for name in (*WRITTEN, *removed):
        _confined(confine.check_replaceable, run_dir / name)
    manifest_path = run_dir / fmt.MANIFEST
    if manifest_path.exists():
        if not overwrite:
            raise RecorderError(
                f"{run_dir}: already holds a trajscope run; choose a new directory or "
                "pass overwrite=True"
            )
        # The report goes too: its figures would describe the replaced run.
        for name in (fmt.STEPS_DIR, *removed, fmt.SCALARS, fmt.HDF5_FILE, fmt.MANIFEST):
            _confined(confine.remove_entry, run_dir / name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if storage == fmt.STORAGE_SAFETENSORS:
        (run_dir / fmt.STEPS_DIR).mkdir(exist_ok=True)
    return _take_lock(run_dir / fmt.RECORDING_LOCK)


def _confined(check: Callable[[Path], None], path: Path) -> None:
    """``check(path)`` (:func:`trajscope.confine.check_replaceable` or ``remove_entry``), its
    refusal raised as the recorder's error."""
    try:
        check(path)
    except RunFormatError as exc:
        raise RecorderError(str(exc)) from exc


def _take_lock(path: Path) -> IO[bytes] | None:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): commands fall back to the manifest's status
        return None
    try:  # O_NOFOLLOW: a planted symlink is never followed out of the run
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError:
        return None  # recording goes on; only the liveness check is lost
    fh = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by another recorder of this directory: it is the one that is alive
        fh.close()
        return None
    return fh


def release_lock(fh: IO[bytes] | None) -> None:
    """Give up the recording lock (closing the file releases the ``flock``); the file stays."""
    if fh is not None:
        fh.close()


def open_writer(
    run_dir: Path,
    storage: str,
    declared: list[tuple[str, str, tuple[int, ...]]],
    *,
    slots: int,
    pin: bool,
    threaded: bool,
    direct_io: bool | None,
) -> tuple[SafetensorsWriter | HDF5Writer, AsyncWriter]:
    """The store of ``storage`` in ``run_dir`` and the writer that feeds it from ``slots`` buffers.

    Args:
        declared: (key, dtype, shape) of the tensors fixed for the whole run (HDF5 datasets).
        slots: snapshot buffers; the training thread waits when all hold unwritten snapshots.
        pin: page-lock the buffers (fast copies from a GPU).
        threaded: write on a background thread.
        direct_io: write with ``O_DIRECT`` where the filesystem allows (:class:`SafetensorsWriter`,
            :class:`HDF5Writer`).
    """
    pool = SlotPool(slots, pin=pin)
    store: SafetensorsWriter | HDF5Writer
    if storage == fmt.STORAGE_HDF5:
        store = HDF5Writer(run_dir / fmt.HDF5_FILE, declared,
                           {"trajscope_storage": fmt.STORAGE_HDF5, "format_version": fmt.FORMAT_VERSION},
                           direct_io=direct_io)
        if store.image_align:  # it writes tensors straight from the slot: lay them out aligned
            pool.align_tensors(store.image_align)
        where: Callable[[int], str] = lambda s: str(run_dir / fmt.HDF5_FILE)  # noqa: E731
    else:
        store = SafetensorsWriter(run_dir, direct_io=direct_io)
        where = lambda s: str(run_dir / fmt.STEPS_DIR / fmt.step_filename(s))  # noqa: E731
    return store, AsyncWriter(store.write, where, pool, threaded=threaded)
