"""The safetensors storage, written: ``steps/step_XXXXXXXX.safetensors``, one file per snapshot.

Layout and header rules: ``docs/format.md``. The writer receives a :class:`StepImage` that
:func:`trajscope.recorders.storage.build_image` already laid out as the complete file (its dtype
codes are :data:`trajscope.runformat.SAFETENSORS_DTYPES`, a view of the shared dtype table) and only
puts it on disk. The reader is :class:`trajscope.store.safetensors.SafetensorsStorage`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trajscope import confine
from trajscope import runformat as fmt
from trajscope.recorders.backends.base import DIRECT_IO_ALIGN

if TYPE_CHECKING:
    from trajscope.recorders.storage import StepImage

__all__ = ["SafetensorsWriter"]


class SafetensorsWriter:
    """One file per snapshot, ``steps/step_XXXXXXXX.safetensors``, written to a temp name and renamed.

    A reader, or a process killed mid-write, sees either no file or the complete one. Data goes out
    with ``O_DIRECT`` (no page-cache copy) when ``direct_io`` allows and the filesystem supports it,
    else through an ordinary buffered write.

    Files are created and renamed relative to the directory as opened when the writer is made
    (``dir_fd``), never through a symlink: a symlink planted later in place of the directory, or at
    a temp name (created with ``O_EXCL | O_NOFOLLOW``), does not lead a write out of the run; one
    at a step file's name is replaced by the rename.
    """

    def __init__(self, run_dir: Path, *, direct_io: bool | None = None,
                 steps_dir: Path | None = None, name: Callable[[int], str] = fmt.step_filename) -> None:
        self.dir = steps_dir if steps_dir is not None else run_dir / fmt.STEPS_DIR
        self._name = name  # the file of a step: a snapshot, or a rank's part (fmt.shard_filename)
        if self.dir.is_symlink():
            raise confine.link_error(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dir_fd: int | None = None
        if os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY"):
            self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        # None: try O_DIRECT and fall back silently; False: never; True: try, fall back too (some
        # filesystems, tmpfs among them, reject it), but the attempt is what the user asked for.
        self._direct = bool(getattr(os, "O_DIRECT", 0)) and direct_io is not False

    def path(self, step: int) -> Path:
        return self.dir / self._name(step)

    def _at(self, name: str) -> str:
        """``name`` as the path argument that goes with ``dir_fd=self._dir_fd``."""
        return name if self._dir_fd is not None else str(self.dir / name)

    def _create(self, name: str, flags: int = 0) -> int:
        """Create the temp file ``name`` for writing; whatever sits at that name (a leftover, a
        planted symlink) is removed first, never written through."""
        flags |= os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(self._at(name), flags, 0o644, dir_fd=self._dir_fd)
        except FileExistsError:
            os.unlink(self._at(name), dir_fd=self._dir_fd)
            return os.open(self._at(name), flags, 0o644, dir_fd=self._dir_fd)

    def write(self, image: StepImage) -> Path:
        name = self._name(image.step)
        tmp = f".{name}.tmp-{os.getpid()}"
        data = image.view()
        d = self._dir_fd
        try:
            if not (self._direct and self._write_direct(tmp, data)):
                fd = self._create(tmp)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            os.replace(self._at(tmp), self._at(name), src_dir_fd=d, dst_dir_fd=d)
        except BaseException:
            with _suppress_oserror():
                os.unlink(self._at(tmp), dir_fd=d)
            raise
        return self.dir / name

    def _write_direct(self, tmp: str, data: memoryview) -> bool:
        """Write ``data`` with O_DIRECT; False (nothing written) where the filesystem refuses it."""
        n_aligned = len(data) - len(data) % DIRECT_IO_ALIGN
        try:
            fd = self._create(tmp, os.O_DIRECT)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                self._direct = False
                return False
            raise
        try:
            done = 0
            while done < n_aligned:
                try:
                    done += os.write(fd, data[done:n_aligned])
                except OSError as exc:
                    if exc.errno == errno.EINVAL and done == 0:  # alignment stricter than 4 KiB
                        self._direct = False
                        return False
                    raise
            if n_aligned < len(data):
                import fcntl

                # The tail is shorter than a block: finish it with a buffered write.
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                _write_all(fd, data[n_aligned:])
        finally:
            os.close(fd)
        return True

    def close(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)
