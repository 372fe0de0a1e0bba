"""The HDF5 storage, written: one file ``trajectory.h5``, one row per snapshot (``docs/format.md``,
storage ``hdf5``). The reader is :class:`trajscope.store.hdf5.HDF5Storage`.

h5py is imported only inside the functions that use it, so that ``import trajscope.recorders``
(which imports this module with the other writers) does not load it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from trajscope import confine
from trajscope.recorders.backends.base import DIRECT_IO_ALIGN, DTYPES
from trajscope.recorders.backends.hdf5_io import DirectChunks, early_allocation, extend, os_error, put

if TYPE_CHECKING:
    from trajscope.recorders.storage import Entry, StepImage

__all__ = ["HDF5Writer", "H5_STORE"]


def _store_type(name: str) -> str:
    """How HDF5 stores dtype ``name``: a little-endian numpy type string (``"<f4"``).

    A dtype with an integer view in :data:`~trajscope.runformat.DTYPES` (float16, bfloat16, float8,
    bool) keeps its exact bits in an *unsigned* integer of the same width; the dataset's ``dtype``
    attribute names the real type.
    """
    _, size, view = DTYPES[name]
    if view is not None:
        return "u1" if size == 1 else f"<u{size}"
    code = np.dtype(name)
    return code.str.replace("|", "") if size == 1 else "<" + code.str[1:]


H5_STORE: dict[str, str] = {name: _store_type(name) for name in DTYPES}
"""torch dtype name → the numpy type string HDF5 stores it as (the HDF5 format's dtype map)."""

_H5_MAX_ROW = 1 << 30  # a row is one HDF5 chunk (limit 4 GiB); larger tensors go to the blob
_DIO = DIRECT_IO_ALIGN
_DIRECT_MIN = 1 << 16
"""Chunks this large or larger are aligned in the file and written with ``O_DIRECT``; smaller
ones cost little through the page cache."""
_BLOB_CHUNK = 1 << 18


@dataclass
class _Rows:
    """A declared tensor's dataset: one row per snapshot, one chunk per row."""

    d: Any
    dtype: str
    shape: tuple[int, ...]
    direct: bool  # rows go out with O_DIRECT (aligned, early-allocated chunks)
    nbytes: int  # bytes of one row (one chunk)
    rows: int = 0  # the dataset's length (kept here: asking h5py costs a library call)


class HDF5Writer:
    """The HDF5 storage (``trajectory.h5``, layout in ``docs/format.md``).

    Every tensor declared when the file is created (parameters, gradients, buffers) gets an
    extendable dataset ``<kind>/<name>`` of shape ``(rows, *shape)``, chunked one row per chunk;
    a snapshot is one row, written as a raw chunk. Everything of variable layout (minibatch, RNG
    state, optimizer state, a tensor whose shape changed) goes to the 1-D byte dataset ``blob``
    with a table of contents in the row's JSON metadata (dataset ``meta``), and so does a tensor
    without a dataset (a gradient of a parameter unfrozen after the file was created) or one whose
    early-allocated dataset it would leave a gap in. ``index/step`` is appended last, after
    everything else of the row is flushed, and flushed in turn: a row exists for readers once
    ``index/step`` covers it (:meth:`write`).

    Rows of :data:`_DIRECT_MIN` bytes or more (a multiple of :data:`DIRECT_IO_ALIGN`), and blob
    regions of a chunk or more, are written with ``O_DIRECT`` (:class:`DirectChunks`); a large blob
    region therefore starts at a chunk boundary of ``blob``. ``direct_io=False`` writes everything
    through HDF5 (buffered). :attr:`image_align` is the alignment this writer asks of the images
    (:meth:`~trajscope.recorders.storage.SlotPool.align_tensors`): a row whose bytes are aligned in
    the slot is written from there; any other is staged in an aligned buffer first.

    The file is in SWMR mode (single writer, multiple readers): readers can open it while training
    runs, and a writer killed at any moment leaves a file that opens (with ``swmr=True``) with every
    flushed row intact. SWMR forbids creating objects later, hence the fixed declared set.
    """

    def __init__(self, path: Path, declared: Iterable[tuple[str, str, tuple[int, ...]]],
                 attrs: dict[str, Any], *, direct_io: bool | None = None) -> None:
        import h5py

        self.path = path
        confine.check_replaceable(path)  # a symlink or special file there is refused, naming it
        path.unlink(missing_ok=True)  # a file from before (a directory there fails, naming it)
        try:
            # Objects of _DIRECT_MIN bytes or more start at multiples of _DIO: O_DIRECT needs that.
            # "w-" creates with O_EXCL: a symlink planted meanwhile fails the open, never followed.
            self._f = h5py.File(path, "w-", libver="latest", alignment_threshold=_DIRECT_MIN,
                                alignment_interval=_DIO)
            self._create(declared, attrs, direct_io)
        except (OSError, RuntimeError) as exc:
            for opened in ("_direct", "_f"):  # release what was opened before the failure
                with contextlib.suppress(Exception):
                    getattr(self, opened).close()
            self._reraise(exc)
        self._rows = 0
        self._blob_end = 0
        self._meta_end = 0

    def _reraise(self, exc: Exception) -> NoReturn:
        """Raise ``exc``, a failure of HDF5 or of a write, as a one-line ``OSError`` (HDF5's own text
        kept as its ``__cause__``)."""
        err = os_error(exc, self.path)
        if err is exc:
            raise exc
        raise err from exc

    def _create(self, declared: Iterable[tuple[str, str, tuple[int, ...]]], attrs: dict[str, Any],
                direct_io: bool | None) -> None:
        """The root attributes and every dataset of the new file, then SWMR mode."""
        f = self._f
        self._direct = DirectChunks(self.path, direct_io is not False)
        early = early_allocation() if self._direct.fd is not None else {}
        # Asked of the slots by AsyncWriter: tensors at aligned offsets go out without a copy.
        self.image_align = _DIO if early else 0
        for k, v in attrs.items():
            f.attrs[k] = v
        self._ds: dict[str, _Rows] = {}
        for key, dtype, shape in declared:
            if dtype not in H5_STORE:
                continue
            n = DTYPES[dtype][1]
            for s in shape:
                n *= s
            if n == 0 or n > _H5_MAX_ROW or key in self._ds:
                continue
            direct = bool(early) and n >= _DIRECT_MIN and n % _DIO == 0
            d = f.create_dataset(key, shape=(0, *shape), maxshape=(None, *shape), chunks=(1, *shape),
                                 dtype=H5_STORE[dtype], **(early if direct else {}))
            d.attrs["dtype"] = dtype
            self._ds[key] = _Rows(d, dtype, tuple(shape), direct, n)
        self._blob = f.create_dataset("blob", shape=(0,), maxshape=(None,), chunks=(_BLOB_CHUNK,),
                                      dtype="u1", **early)
        self._meta = f.create_dataset("meta", shape=(0,), maxshape=(None,), chunks=(1 << 16,),
                                      dtype="u1")
        # Filled with -1: a row whose step never reached the disk is no row (_h5_committed).
        self._i_step = f.create_dataset("index/step", shape=(0,), maxshape=(None,),
                                        chunks=(4096,), dtype="<i8", fillvalue=-1)
        self._i_meta = f.create_dataset("index/meta", shape=(0, 2), maxshape=(None, 2),
                                        chunks=(4096, 2), dtype="<i8")
        self._i_blob = f.create_dataset("index/blob", shape=(0, 2), maxshape=(None, 2),
                                        chunks=(4096, 2), dtype="<i8")
        f.swmr_mode = True
        f.flush()

    def write(self, image: StepImage) -> Path:
        """Append ``image`` as the next row; all or nothing for readers.

        Two flushes: the first puts the row's data, blob region, metadata, ``index/meta`` and
        ``index/blob`` on disk; only then is ``index/step`` extended (the commit) and flushed. One
        flush would not do: HDF5 still writes the new dataset extents when writing a data chunk
        failed (disk full), which would show readers a row whose bytes are missing.

        Raises:
            OSError: the write failed (``errno`` and text from HDF5's message where it has one;
                HDF5's full text is the exception's ``__cause__``). The extents are rolled back
                to the rows written before, so the row never becomes visible.
        """
        row, blob_end, meta_end = self._rows, self._blob_end, self._meta_end
        try:
            self._stage(image, row)
            self._f.flush()
            extend(self._i_step.id, (row + 1,))  # the commit
            put(self._i_step.id, (row,), np.array([image.step], dtype="<i8"))
            self._f.flush()
        except Exception as exc:
            self._blob_end, self._meta_end = blob_end, meta_end
            self._roll_back(row, meta_end)
            if not isinstance(exc, (OSError, RuntimeError)):
                raise
            self._reraise(exc)
        self._rows += 1
        return self.path

    def _stage(self, image: StepImage, row: int) -> None:
        """Everything of row ``row`` but its commit: dataset rows, blob region, metadata and its
        ``index/meta`` and ``index/blob`` entries."""
        rows: list[str] = []
        blob_entries: list[Entry] = []
        for e in image.entries:
            r = self._ds.get(e.key)
            # A row after a gap (a gradient absent from earlier rows: the parameter was frozen or
            # unused then) goes to the blob when the dataset allocates early: resizing over the
            # gap would allocate its unwritten chunks as holes that count in the file's size.
            if r is not None and r.dtype == e.dtype and r.shape == e.shape and not (r.direct and r.rows < row):
                self._write_row(r, row, image.array(e))
                rows.append(e.key)
            else:
                blob_entries.append(e)
        toc, b0, total = self._write_blob(image, blob_entries)
        meta = dict(image.meta)
        meta["hdf5"] = {"rows": rows, "blob": toc}
        mbytes = np.frombuffer(json.dumps(meta, allow_nan=True, separators=(",", ":")).encode(),
                               dtype=np.uint8)
        m0 = self._meta_end
        extend(self._meta.id, (m0 + len(mbytes),))
        put(self._meta.id, (m0,), mbytes)
        self._meta_end = m0 + len(mbytes)
        for d, value in ((self._i_meta, (m0, len(mbytes))), (self._i_blob, (b0, total))):
            extend(d.id, (row + 1, 2))
            put(d.id, (row, 0), np.array([value], dtype="<i8"))

    def _roll_back(self, row: int, meta_end: int) -> None:
        """Shrink the index and ``meta`` back to the ``row`` rows written before a failed write, so
        that no later flush (the one at close included) shows the failed row. Failures are
        ignored: the disk may still be full, and without its ``index/step`` entry on disk the row
        is invisible anyway."""
        shrink = ((self._i_step, (row,)), (self._i_meta, (row, 2)), (self._i_blob, (row, 2)),
                  (self._meta, (meta_end,)))
        for d, shape in shrink:
            with contextlib.suppress(Exception):
                extend(d.id, shape)
        with contextlib.suppress(Exception):
            self._f.flush()

    def _write_row(self, r: _Rows, row: int, data: np.ndarray) -> None:
        """Row ``row`` of ``r``'s dataset: ``data``, the tensor's raw bytes, as the row's chunk."""
        dsid = r.d.id
        if r.rows <= row:
            r.rows = row + 1
            extend(dsid, (r.rows, *r.shape))
        first = (row,) + (0,) * len(r.shape)
        if not (r.direct and self._direct.write(dsid, first, 1, r.nbytes, data)):
            dsid.write_direct_chunk(first, data)

    def _write_blob(self, image: StepImage, entries: list[Entry]) -> tuple[dict[str, list[Any]], int, int]:
        """Append ``entries`` to ``blob``; their table of contents (offsets relative to the row's
        start ``b0``), ``b0`` and the bytes appended.

        A region of at least one chunk starts at a chunk boundary and is staged whole chunks long
        (the tail zeroed) so that it goes out with ``O_DIRECT``; the next region starts after
        those chunks. Smaller regions follow the previous one directly.
        """
        toc: dict[str, list[Any]] = {}
        total = sum(e.end - e.begin for e in entries)
        if not total:
            for e in entries:
                toc[e.key] = [e.dtype, list(e.shape), 0, 0]
            return toc, self._blob_end, 0
        direct = total >= _BLOB_CHUNK and self._direct.fd is not None
        b0 = -(-self._blob_end // _BLOB_CHUNK) * _BLOB_CHUNK if direct else self._blob_end
        end = -(-total // _BLOB_CHUNK) * _BLOB_CHUNK if direct else total
        region = self._direct.staged(end)[:end] if direct else None
        blob = self._blob.id
        extend(blob, (b0 + total,))
        pos = 0
        for e in entries:
            n = e.end - e.begin
            if n and region is not None:
                region[pos : pos + n] = image.array(e)
            elif n:
                put(blob, (b0 + pos,), image.array(e))
            toc[e.key] = [e.dtype, list(e.shape), pos, n]
            pos += n
        if region is not None:
            region[total:] = 0
            if not self._direct.write(blob, (b0,), _BLOB_CHUNK, _BLOB_CHUNK, region):
                put(blob, (b0,), region[:total])
        self._blob_end = b0 + end
        return toc, b0, total

    def close(self) -> None:
        """Close the file (its last flush). Raises ``OSError`` with a one-line text if that fails."""
        self._direct.close()
        if self._f.id.valid:
            try:
                self._f.close()
            except (OSError, RuntimeError) as exc:
                self._reraise(exc)
