"""The recorder's run directory: preparing it, the recording lock that makes the recorder its one
writer, and the writer that stores the snapshots in it."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from trajscope import confine
from trajscope import runformat as fmt
from trajscope.errors import RecorderError, RunFormatError, one_line
from trajscope.recorders.backends import HDF5Writer, SafetensorsWriter
from trajscope.recorders.sharded import PartSync, Sharding
from trajscope.recorders.storage import AsyncWriter, SlotPool

__all__ = ["WRITTEN", "RunLock", "holding_run", "open_writer", "prepare_run_dir", "release_lock"]


WRITTEN = (fmt.MANIFEST, fmt.SCALARS, fmt.STEPS_DIR, fmt.HDF5_FILE, fmt.RECORDING_LOCK)
"""What the recorder writes in a run directory, besides temporary names and the step files inside
``steps/`` (those are created with ``O_EXCL | O_NOFOLLOW`` and renamed into place)."""


def prepare_run_dir(run_dir: Path, storage: str, *, overwrite: bool) -> RunLock:
    """Create ``run_dir`` (or empty an existing run in it when ``overwrite``) for a new run, and
    take its :data:`~trajscope.runformat.RECORDING_LOCK`. The recorder holds the returned
    :class:`RunLock` until the final manifest is written (:func:`release_lock`).

    One run directory has one writer: the lock is taken before anything is removed, so a run that
    another recorder holds (in any process) is refused, never emptied under it; and with
    ``overwrite`` so is a run whose ``analysis/.lock`` an analysis holds, since its ``analysis/``
    would be removed while the analysis writes there.

    Every entry of :data:`WRITTEN` (and, with ``overwrite``, the ``analysis/`` and ``report/`` it
    removes) must be absent, a regular file or a real directory: a symlink there would lead a write
    or a removal out of the run (appending to ``scalars.jsonl``, creating ``trajectory.h5``, files
    in ``steps/``), so it is refused before anything is written. Nothing is followed when removing.

    Raises:
        RecorderError: ``run_dir`` holds a run and ``overwrite`` is False; another recorder or (with
            ``overwrite``) an analysis holds the run, naming the lock and its holder; or, naming it,
            an entry above is a symlink or a FIFO, socket or device.
    """
    removed = (fmt.ANALYSIS_DIR, fmt.REPORT_DIR) if overwrite else ()
    for name in (*WRITTEN, *removed):
        _confined(confine.check_replaceable, run_dir / name)
    manifest_path = run_dir / fmt.MANIFEST
    taken = RecorderError(f"{run_dir}: already holds a trajscope run; choose a new directory or pass overwrite=True")
    if manifest_path.exists() and not overwrite:
        raise taken
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(run_dir / fmt.RECORDING_LOCK)
    try:
        if manifest_path.exists():
            if not overwrite:  # written by a recorder that closed while this one took the lock
                raise taken
            with _no_analysis(run_dir / fmt.ANALYSIS_DIR / fmt.LOCK_FILE):
                # The report goes too: its figures would describe the replaced run.
                for name in (fmt.STEPS_DIR, *removed, fmt.SCALARS, fmt.HDF5_FILE, fmt.MANIFEST):
                    _confined(confine.remove_entry, run_dir / name)
        if storage == fmt.STORAGE_SAFETENSORS:
            (run_dir / fmt.STEPS_DIR).mkdir(exist_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


def _confined(check: Callable[[Path], None], path: Path) -> None:
    """``check(path)`` (:func:`trajscope.confine.check_replaceable` or ``remove_entry``), its
    refusal raised as the recorder's error."""
    try:
        check(path)
    except RunFormatError as exc:
        raise RecorderError(str(exc)) from exc


class RunLock:
    """The run's recording lock as the recorder holds it, and disk space kept for the manifest.

    The lock file holds a note naming its holder (``pid <pid> on <host> since <time>``, as
    ``analysis/.lock`` does), which a refused recorder quotes. After the note the file keeps a
    reserve of allocated bytes (:meth:`reserve`): on a full disk the manifest could not be
    rewritten to say why recording stopped (its temporary file needs room the failed write did not
    give back: an HDF5 file keeps what it allocated), so :meth:`free_reserve` gives that room back
    for the rewrite. ``fh`` None: no lock (no ``flock`` on this system or filesystem).
    """

    def __init__(self, fh: IO[bytes] | None) -> None:
        self._fh = fh
        self._note = 0  # bytes of the holder's note at the start of the file
        self._reserved = 0

    def write_note(self, what: str = "") -> None:
        """Write the holder's note (replacing whatever a previous holder left); ``what``: the
        command holding it when it is not a recorder (``trajscope convert``)."""
        if self._fh is None:
            return
        by = f" ({what})" if what else ""
        note = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}{by}\n"
        with contextlib.suppress(OSError):  # the note only helps a refused recorder say who holds the run
            os.ftruncate(self._fh.fileno(), 0)
            self._note = _write_at(self._fh.fileno(), note.encode(), 0)

    def reserve(self, nbytes: int) -> None:
        """Keep ``nbytes`` of disk space allocated after the note (growing the reserve, never
        shrinking it); nothing is kept where the disk has no room for it."""
        if self._fh is None or nbytes <= self._reserved:
            return
        fd = self._fh.fileno()
        try:
            try:
                os.posix_fallocate(fd, self._note, nbytes)
            except (AttributeError, OSError):  # no fallocate (macOS, some filesystems): write zeros
                _write_at(fd, bytes(nbytes), self._note)
            self._reserved = nbytes
        except OSError:
            with contextlib.suppress(OSError):  # a reserve half allocated is no reserve
                os.ftruncate(fd, self._note)

    def free_reserve(self) -> bool:
        """Give the reserve's space back to the filesystem; True when there was one to give."""
        if self._fh is None or not self._reserved:
            return False
        try:
            os.ftruncate(self._fh.fileno(), self._note)
        except OSError:
            return False
        self._reserved = 0
        return True

    def release(self) -> None:
        """Empty the lock file (note and reserve) and close it, which releases the ``flock``."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fh.fileno(), 0)
            self._fh.close()
            self._fh = None


def _write_at(fd: int, data: bytes, offset: int) -> int:
    """Write all of ``data`` at ``offset`` of ``fd``; the bytes written."""
    os.lseek(fd, offset, os.SEEK_SET)
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
    return done


_LOCK_TRIES = 5
"""Tries to take a lock before it counts as held: ``recorder_alive`` holds a recording lock shared for
an instant when it asks, which must not pass for a recorder."""


def _flock(fd: int) -> bool | None:
    """Take the exclusive ``flock`` of ``fd``: True; False when another holder keeps it; None when
    this system or filesystem has no ``flock``."""
    try:
        import fcntl
    except ImportError:
        return None
    for attempt in range(_LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < _LOCK_TRIES:
                time.sleep(0.02)
        except OSError:  # ENOLCK, EOPNOTSUPP: a filesystem without flock
            return None
    return False


def _holder(fd: int) -> str:
    """The holder's note at the start of a lock file, as one printable line."""
    try:
        raw = os.pread(fd, 512, 0)
    except OSError:
        raw = b""
    note = raw.split(b"\0", 1)[0].decode("utf-8", "replace").splitlines()[:1]
    return one_line(note[0].strip(), 200) if note and note[0].strip() else "its holder left no note"


@contextlib.contextmanager
def holding_run(run_dir: Path, what: str) -> Iterator[None]:
    """Hold ``run_dir``'s recording lock while the command ``what`` rewrites the run in place
    (``trajscope convert``): a recorder, even with ``overwrite=True``, is refused meanwhile, naming
    the command, and the command is refused while a recorder holds it.

    Raises:
        RunFormatError: a recorder (or another such command) holds the lock, naming its holder.
    """
    try:
        lock = _take_lock(run_dir / fmt.RECORDING_LOCK, what)
    except RecorderError as exc:
        raise RunFormatError(str(exc)) from None
    try:
        yield
    finally:
        lock.release()


def _take_lock(path: Path, what: str = "") -> RunLock:
    """Take the recording lock ``path`` (never through a symlink: a planted one is not followed out
    of the run) and write the holder's note into it.

    Raises:
        RecorderError: another recorder holds it (naming it and its holder), or it cannot be opened.
    """
    try:
        fd = confine.open_nofollow(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), "the recording lock")
    except RunFormatError as exc:
        raise RecorderError(str(exc)) from exc
    fh = os.fdopen(fd, "r+b")
    taken = _flock(fd)
    if taken is False:
        holder = _holder(fd)
        fh.close()
        raise RecorderError(
            f"{path}: another recorder is writing this run ({holder}); a run directory has one "
            "writer: wait for that recorder to close, or record into another directory"
        )
    if taken is None:  # no flock here: commands fall back to the manifest's status
        fh.close()
        return RunLock(None)
    lock = RunLock(fh)
    lock.write_note(what)
    return lock


@contextlib.contextmanager
def _no_analysis(path: Path) -> Iterator[None]:
    """Hold the analysis lock ``path`` (``analysis/.lock``) while the block removes ``analysis/``,
    when there is one.

    Raises:
        RecorderError: an analysis holds it, naming the lock and its holder.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:  # none, or a link that is removed without being followed
        yield
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode) and _flock(fd) is False:
            raise RecorderError(
                f"{path}: an analysis of this run is writing there ({_holder(fd)}); overwrite=True "
                "would remove its results under it: wait for the analysis to finish"
            )
        yield
    finally:
        os.close(fd)


def release_lock(lock: RunLock | None) -> None:
    """Give up the recording lock (:meth:`RunLock.release`); the file stays, empty."""
    if lock is not None:
        lock.release()


def open_writer(
    run_dir: Path,
    storage: str,
    declared: list[tuple[str, str, tuple[int, ...]]],
    *,
    slots: int,
    pin: bool,
    threaded: bool,
    direct_io: bool | None,
    sharding: Sharding | None = None,
) -> tuple[SafetensorsWriter | HDF5Writer, AsyncWriter]:
    """The store of ``storage`` in ``run_dir`` and the writer that feeds it from ``slots`` buffers.

    Args:
        declared: (key, dtype, shape) of the tensors fixed for the whole run (HDF5 datasets).
        slots: snapshot buffers; the training thread waits when all hold unwritten snapshots.
        pin: page-lock the buffers (fast copies from a GPU).
        threaded: write on a background thread.
        direct_io: write with ``O_DIRECT`` where the filesystem allows (:class:`SafetensorsWriter`,
            :class:`HDF5Writer`).
        sharding: a sharded run's layout: this rank writes its part of each snapshot (rank 0 the
            snapshot file, the others ``shards/``), completed by the writers' vote (:class:`PartSync`).
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
    elif sharding is not None and sharding.rank != 0:
        rank = sharding.rank
        store = SafetensorsWriter(run_dir, direct_io=direct_io, steps_dir=run_dir / fmt.SHARDS_DIR,
                                  name=lambda s: fmt.shard_filename(s, rank))
        where = lambda s: str(store.path(s))  # noqa: E731
    else:
        store = SafetensorsWriter(run_dir, direct_io=direct_io)
        where = lambda s: str(store.path(s))  # noqa: E731
    if sharding is None:
        return store, AsyncWriter(store.write, where, pool, threaded=threaded)
    sync = PartSync(sharding, store.write)
    return store, AsyncWriter(sync.write, where, pool, threaded=threaded, after_error=sync.refuse)
