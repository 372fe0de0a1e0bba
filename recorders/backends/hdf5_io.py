"""Low-level writing for the HDF5 storage (:mod:`trajscope.recorders.backends.hdf5`): chunks written
with ``O_DIRECT`` at the addresses HDF5 allocated for them, HDF5's own calls for extents and
hyperslab writes, and the translation of HDF5's failures into one-line ``OSError`` s.

h5py is imported only inside the functions that use it (``import trajscope.recorders`` must not
load it).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from trajscope.recorders.backends.base import DIRECT_IO_ALIGN

__all__ = ["DirectChunks", "early_allocation", "extend", "os_error", "put"]

_DIO = DIRECT_IO_ALIGN


class DirectChunks:
    """Whole chunks written with ``O_DIRECT`` at the file addresses HDF5 allocated for them.

    Why: a buffered write of new file data costs the page-cache allocation of every page, several
    times the cost of copying the bytes (``docs/performance.md``); the safetensors writer avoids it
    with ``O_DIRECT``, and so does this, for the bulk of a row. HDF5 keeps writing its own metadata
    and the small datasets through the page cache. A dataset written here is created with early
    allocation and no fill: resizing it allocates its new chunks (aligned to :data:`DIRECT_IO_ALIGN`
    by the file's alignment property) without writing them, and their addresses come from
    ``get_chunk_info_by_coord``. The kernel keeps the page cache coherent with direct writes, so
    SWMR readers see the data.

    ``fd`` is None where the filesystem refuses ``O_DIRECT`` (tmpfs) or the first direct write fails
    with EINVAL: then every chunk goes through HDF5 (``write_direct_chunk``) as a buffered write.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.fd: int | None = None
        if enabled and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW)
            except OSError:
                self.fd = None
        self._stage = np.empty(0, np.uint8)  # aligned staging buffer, reused (see staged)

    def staged(self, nbytes: int) -> np.ndarray:
        """An aligned, reused buffer of ``nbytes`` (rounded up to the alignment), for sources
        that are not aligned themselves."""
        n = -(-nbytes // _DIO) * _DIO
        if len(self._stage) < n:
            raw = np.zeros(n + _DIO, np.uint8)  # zeros: touch the pages once, here
            off = -raw.ctypes.data % _DIO
            self._stage = raw[off : off + n]
        return self._stage[:n]

    def write(self, dsid: Any, first: tuple[int, ...], step: int, chunk: int, data: np.ndarray) -> bool:
        """Write ``data`` (uint8, whole chunks of ``chunk`` bytes) as consecutive chunks of the
        dataset ``dsid`` (an h5py ``DatasetID``): the first at element coordinate ``first``, each
        next one ``step`` further along axis 0. False where that is not possible (nothing needs to
        be undone: the caller writes the same bytes through HDF5)."""
        if self.fd is None or len(data) % chunk or chunk % _DIO:
            return False
        if data.ctypes.data % _DIO:
            src = self.staged(len(data))
            src[: len(data)] = data
            data = src[: len(data)]
        # Runs of chunks that lie next to each other in the file go out in one write.
        runs: list[list[int]] = []
        for k in range(len(data) // chunk):
            info = dsid.get_chunk_info_by_coord((first[0] + k * step, *first[1:]))
            addr = info.byte_offset
            if addr is None or addr % _DIO or info.size != chunk:
                return False
            if runs and runs[-1][0] + runs[-1][2] == addr:
                runs[-1][2] += chunk
            else:
                runs.append([addr, k * chunk, chunk])
        view = data.data  # (1-D uint8: the buffer itself)
        try:
            for addr, begin, n in runs:
                done = 0
                while done < n:
                    done += os.pwrite(self.fd, view[begin + done : begin + n], addr + done)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Alignment stricter than this filesystem allows: HDF5 writes from now on, and
            # rewrites whatever part of these chunks went out.
            self.close()
            return False
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def extend(dsid: Any, shape: tuple[int, ...]) -> None:
    """Give the dataset ``dsid`` (an h5py ``DatasetID``) the shape ``shape`` (h5py's ``resize``
    costs several times HDF5's own call)."""
    dsid.set_extent(shape)


def put(dsid: Any, start: tuple[int, ...], arr: np.ndarray) -> None:
    """Write ``arr`` (of the dataset's dtype) into the dataset ``dsid`` at ``start`` with HDF5's
    own calls (h5py's slicing costs several times the write)."""
    from h5py import h5s

    fspace = dsid.get_space()
    fspace.select_hyperslab(start, arr.shape)
    dsid.write(h5s.create_simple(arr.shape), fspace, arr)


def os_error(exc: BaseException, path: Path) -> OSError:
    """``exc``, a failed write of ``path``, as an ``OSError`` whose text is one line.

    HDF5's failures (h5py's ``OSError`` or ``RuntimeError``) carry the library's error stack as
    several lines ("file write failed: time = …, errno = 28, error message = 'No space left on
    device', buf = …"): they become the ``OSError`` of the errno that text names. An ``OSError``
    with an errno and a one-line text (``os.pwrite``'s) is ``exc`` itself.
    """
    text = " ".join(str(exc).split())
    m = re.search(r"errno = (\d+)", text)
    code = int(m.group(1)) if m else (exc.errno if isinstance(exc, OSError) else None)
    if m is None and isinstance(exc, OSError) and exc.errno and "\n" not in str(exc.strerror):
        return exc
    if code:
        return OSError(code, os.strerror(code), str(path))
    return OSError(errno.EIO, f"HDF5: {text[:300]}", str(path))


def early_allocation() -> dict[str, Any]:
    """``create_dataset`` arguments for chunks allocated on resize and never filled: their file
    addresses exist before their bytes are written (:class:`DirectChunks`)."""
    from h5py import h5d, h5p

    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
    return {"dcpl": dcpl, "fill_time": "never"}
