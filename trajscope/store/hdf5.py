"""The HDF5 storage, read: one file ``trajectory.h5``, one row per snapshot (``docs/format.md``,
storage ``hdf5``). The writer is :class:`trajscope.recorders.backends.hdf5.HDF5Writer`.

The file may come from someone else (``docs/reliability.md`` §4): it must be a regular file (a
FIFO would block the open); every object read is reached through hard links only and must keep
its data in this file (no soft or external link, external storage or virtual dataset: HDF5 would
open other files, FIFOs included); and every read is sized before it is made, a row's shape
against the manifest and every row and byte region against the file's size.

h5py is imported only inside the functions that use it: a run stored as safetensors never loads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajscope import runformat as fmt
from trajscope.errors import RunFormatError
from trajscope.runformat import DTYPES, int_view
from trajscope.store.snapshot import is_nonneg_int
from trajscope.store.storage import FormatStorage, Raw, register, stat_path

__all__ = ["HDF5Storage", "read_row", "row_identities"]

Declared = dict[str, tuple[int, ...] | None]
"""Tensor key → the shape the manifest declares for one row of its dataset (``param/NAME`` and
``grad/NAME``: the parameter's shape), or None where the manifest bounds no shape (``buffer/NAME``:
a buffer may change shape during training, and the manifest records it as it was at the end)."""


class _Missing(RunFormatError):
    """The object a path names does not exist (:func:`_object`)."""


@dataclass
class _File:
    """An open ``trajectory.h5`` and its size, which bounds every read: a file written by trajscope
    holds every byte it stores, so no legitimate read needs more (:func:`_checked`)."""

    f: Any  # h5py.File
    path: Path
    size: int


def _open_h5(path: Path) -> Any:
    """Open a run's HDF5 file read-only in SWMR mode, after checking that it is a regular file;
    an ``h5py.File``, to be read through :func:`_checked`.

    SWMR lets a reader open the file while the recorder still appends to it, and it is also how a
    file whose writer was killed opens (a plain open refuses it: "file is already open for write").
    The check opens the file without blocking (:func:`trajscope.runformat.open_regular`: a FIFO is
    refused, not waited on); where ``/proc/self/fd`` exists HDF5 then opens that very descriptor's
    file, so a FIFO swapped in after the check is never opened either.

    Raises:
        RunFormatError: naming ``path``: missing, not a regular file, or not HDF5.
    """
    import h5py

    if not path.exists():
        raise RunFormatError(f"{path}: no such file")
    with fmt.open_regular(path, "HDF5 file") as fh:
        proc = f"/proc/self/fd/{fh.fileno()}"
        target = proc if os.path.exists(proc) else str(path)
        try:
            return h5py.File(target, "r", libver="latest", swmr=True)
        except OSError as exc:
            why = str(exc).replace(proc, str(path))
            raise RunFormatError(f"{path}: cannot open as HDF5 ({why})") from exc


def _checked(f: Any, path: Path) -> _File:
    """The file ``f`` opened from ``path`` (:func:`_open_h5`), with its size on disk: the size of
    the descriptor HDF5 reads through, not HDF5's own ``get_filesize``, which reports the end of
    file the superblock claims (in SWMR mode a small file may claim a terabyte)."""
    try:
        size = os.fstat(f.id.get_vfd_handle()).st_size
    except (OSError, ValueError, TypeError):  # a driver without a descriptor
        size = os.stat(path).st_size
    return _File(f, path, size)


def _object(h: _File, key: str, where: str) -> Any:
    """The group or dataset ``key``, reached the way HDF5 resolves the path (empty and ``.``
    components skipped) but one link at a time, each required to be a hard link, so that no link
    is followed out of the file (an external link may name a FIFO, or a file outside the run).

    Raises:
        RunFormatError: naming ``where`` and the object: missing, or a soft, external or
            user-defined link.
    """
    import h5py
    from h5py import h5l

    parts = [p for p in key.split("/") if p not in ("", ".")]
    node = h.f
    for i, part in enumerate(parts):
        name, raw = "/".join(parts[: i + 1]), part.encode("utf-8", "surrogatepass")
        if not isinstance(node, h5py.Group) or not node.id.links.exists(raw):
            raise _Missing(f"{where}: dataset {key!r} is missing")
        kind = node.id.links.get_info(raw).type
        if kind == h5l.TYPE_SOFT:
            target = node.id.links.get_val(raw).decode("utf-8", "replace")
            raise RunFormatError(f"{where}: {name!r} is a soft link (to {target!r}); trajscope reads "
                                 "datasets only under their own names")
        if kind == h5l.TYPE_EXTERNAL:
            file, obj = (v.decode("utf-8", "replace") for v in node.id.links.get_val(raw))
            raise RunFormatError(f"{where}: {name!r} is an external link (to {obj!r} in {file!r}); trajscope "
                                 f"reads nothing outside {h.path.name}")
        if kind != h5l.TYPE_HARD:
            raise RunFormatError(f"{where}: {name!r} is a user-defined link; trajscope follows none")
        node = node[raw]
    return node


def _dataset(h: _File, key: str, where: str) -> Any:
    """The dataset ``key`` (:func:`_object`), required to keep its data in the file: neither a
    virtual dataset nor one with external storage, whose reads HDF5 makes from other files.

    Raises:
        RunFormatError: naming ``where`` and the object: as :func:`_object`, or not a dataset, a
            virtual dataset, external storage, or a type numpy cannot hold.
    """
    import h5py

    outside = f"trajscope reads nothing outside {h.path.name}"
    node = _object(h, key, where)
    if not isinstance(node, h5py.Dataset):
        raise RunFormatError(f"{where}: {key!r} is not a dataset")
    if node.is_virtual:
        raise RunFormatError(f"{where}: {key!r} is a virtual dataset (its data is mapped from other "
                             f"files); {outside}")
    if node.external:
        files = ", ".join(repr(os.fsdecode(e[0])) for e in node.external)
        raise RunFormatError(f"{where}: {key!r} keeps its data in another file (external storage: "
                             f"{files}); {outside}")
    try:
        node.dtype  # noqa: B018 (h5py builds the numpy type here, and fails for types it cannot map)
    except (TypeError, ValueError) as exc:
        raise RunFormatError(f"{where}: {key!r} has an HDF5 type numpy cannot hold ({exc})") from None
    return node


def _check_chunks(h: _File, d: Any, key: str, where: str) -> None:
    """Refuse a compressed dataset whose chunks the file could not hold: HDF5 decompresses a whole
    chunk for any read of it, so a small file of highly compressed chunks would otherwise make a
    small read allocate the chunk's full size."""
    if d.chunks is None or not d.id.get_create_plist().get_nfilters():
        return
    chunk = math.prod(d.chunks) * d.dtype.itemsize
    if chunk > h.size:
        raise RunFormatError(f"{where}: dataset {key!r} is compressed in chunks of {chunk} bytes, more than "
                             f"the file holds ({h.size} bytes)")


def _index(h: _File) -> tuple[Any, Any, Any]:
    """``index/step``, ``index/meta`` and ``index/blob``: checked (shape, integer type, declared
    size against the file's) before any of them is read."""
    where = str(h.path)
    out = []
    for key, width in (("index/step", ()), ("index/meta", (2,)), ("index/blob", (2,))):
        try:
            d = _dataset(h, key, where)
        except _Missing:
            raise RunFormatError(f"{where}: not a trajscope HDF5 file (no dataset {key!r})") from None
        if d.ndim != 1 + len(width) or tuple(d.shape[1:]) != width or d.dtype.kind not in "iu":
            expected = "(rows, 2)" if width else "(rows,)"
            raise RunFormatError(f"{where}: {key!r} has shape {d.shape} of {d.dtype.str}, expected {expected} "
                                 "integers")
        nbytes = math.prod(d.shape) * d.dtype.itemsize
        if nbytes > h.size:
            raise RunFormatError(f"{where}: {key!r} declares {d.shape[0]} rows ({nbytes} bytes), more than the "
                                 f"file holds ({h.size} bytes)")
        _check_chunks(h, d, key, where)
        out.append(d)
    return out[0], out[1], out[2]


def _committed(index: tuple[Any, Any, Any]) -> np.ndarray:
    """Steps of the rows ``index/step`` covers (it is written last), -1 for a row whose step was
    never written: its commit did not finish (``index/step`` is filled with -1), so it is not a
    row for readers. ``index``: the datasets :func:`_index` checked."""
    steps, meta, blob = index
    n = min(steps.shape[0], meta.shape[0], blob.shape[0])
    return np.asarray(steps[:n], dtype=np.int64)


def _h5_committed(f: Any, path: Path) -> np.ndarray:
    """:func:`_committed` of the file ``f`` opened from ``path`` (:func:`_open_h5`)."""
    return _committed(_index(_checked(f, path)))


def _torn(raw: bytes) -> bool:
    """Whether a row's metadata bytes were never written: empty (``index/meta`` unwritten) or all
    NUL (a ``meta`` chunk whose write failed reads as its fill value)."""
    return not raw.strip(b"\0")


def _region(h: _File, key: str, off: int, length: int, where: str) -> np.ndarray:
    """Bytes ``off`` to ``off + length`` of the byte dataset ``key`` (``meta`` or ``blob``), read
    only after the range is checked against the file's size and the dataset's length."""
    what = f"the row's {'metadata' if key == 'meta' else key} region ({length} bytes at {off})"
    if off < 0 or length < 0:
        raise RunFormatError(f"{where}: {what} is malformed (negative)")
    if length > h.size:
        raise RunFormatError(f"{where}: {what} is larger than the file ({h.size} bytes)")
    d = _dataset(h, key, where)
    if d.ndim != 1 or d.dtype.itemsize != 1 or d.dtype.kind not in "iu":
        raise RunFormatError(f"{where}: {key!r} has shape {d.shape} of {d.dtype.str}, expected bytes (uint8)")
    if off + length > d.shape[0]:
        raise RunFormatError(f"{where}: {what} lies outside {key!r} ({d.shape[0]} bytes)")
    _check_chunks(h, d, key, where)
    if not length:
        return np.empty(0, np.uint8)
    return np.asarray(d[off : off + length]).view(np.uint8)


def _storage_dtype(name: str) -> np.dtype[Any]:
    """How HDF5 stores torch dtype ``name`` (``docs/format.md``, Dtypes): little-endian, with
    float16, bfloat16, float8 and bool as the unsigned integer of the same width."""
    _, size, view = DTYPES[name]
    if view is not None:
        return np.dtype("u1" if size == 1 else f"<u{size}")
    return np.dtype(name).newbyteorder("<")


def _dtype_attr(d: Any, key: str, where: str) -> str:
    """The torch dtype named by a row dataset's ``dtype`` attribute (absent: the dataset's own
    type), checked to be one scalar string before it is read (an attribute may declare any size)."""
    from h5py import h5a

    if not h5a.exists(d.id, b"dtype"):
        return str(d.dtype.name)
    attr = h5a.open(d.id, b"dtype")
    if attr.shape != () or attr.dtype.kind not in "OSU" or attr.dtype.itemsize > fmt.MAX_NAME_CHARS:
        raise RunFormatError(f"{where}: dataset {key!r}: its 'dtype' attribute is not a dtype name")
    value = d.attrs["dtype"]
    name = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if name not in DTYPES or not hasattr(torch, name):
        raise RunFormatError(f"{where}: dataset {key!r}: unknown dtype {name!r}")
    return name


def _h5_tensor(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """``arr`` as a tensor of torch dtype ``dtype`` (a name in :data:`DTYPES`), bits reinterpreted."""
    view = int_view(dtype)
    if view is not None:
        arr = arr.view(view)
    # (np.ascontiguousarray would turn a 0-d array into shape (1,))
    t = torch.from_numpy(arr if arr.flags.c_contiguous else arr.copy(order="C"))
    return t.view(getattr(torch, dtype)) if t.dtype != getattr(torch, dtype) else t


def _read_dataset_row(h: _File, key: Any, row: int, where: str, declared: Declared | None) -> torch.Tensor:
    """Row ``row`` of the dataset ``key``, read after checking that the manifest declares the
    tensor and its row shape, that the dataset stores the type its ``dtype`` attribute names, and
    that the row fits in the file: a dataset declaring a row of many gigabytes in a small file is
    refused before anything is allocated for it."""
    if not isinstance(key, str):
        raise RunFormatError(f"{where}: row metadata names a dataset by a {type(key).__name__}, not a string")
    shape = None
    if declared is not None:
        if key not in declared:
            raise RunFormatError(f"{where}: dataset {key!r} is not a parameter, gradient or buffer the "
                                 "manifest declares")
        shape = declared[key]
    d = _dataset(h, key, where)
    if d.ndim < 1 or d.shape[0] <= row:
        raise RunFormatError(f"{where}: dataset {key!r} has no row {row}")
    if shape is not None and tuple(d.shape[1:]) != shape:
        raise RunFormatError(f"{where}: dataset {key!r} has rows of shape {list(d.shape[1:])}, the manifest "
                             f"declares {list(shape)}")
    dtype = _dtype_attr(d, key, where)
    if d.dtype != _storage_dtype(dtype):
        raise RunFormatError(f"{where}: dataset {key!r} stores {d.dtype.str}, expected "
                             f"{_storage_dtype(dtype).str} for {dtype}")
    return _h5_tensor(_row_of(h, d, key, row, where), dtype)


def _row_of(h: _File, d: Any, key: str, row: int, where: str) -> np.ndarray:
    """Row ``row`` of dataset ``d``, read after checking that the row fits in the file."""
    nbytes = math.prod(d.shape[1:]) * d.dtype.itemsize
    if nbytes > h.size:
        raise RunFormatError(f"{where}: dataset {key!r}: a row is {nbytes} bytes, more than the file holds "
                             f"({h.size} bytes)")
    _check_chunks(h, d, key, where)
    return np.asarray(d[row : row + 1]).reshape(d.shape[1:])


def _blob_entry(blob: np.ndarray, key: str, spec: Any, where: str) -> torch.Tensor:
    """One tensor of a row's blob region, by its table-of-contents entry ``[dtype, shape, offset,
    nbytes]``: the shape's size must be exactly ``nbytes`` and lie inside the region before
    anything is allocated."""
    try:
        if not (isinstance(spec, list) and len(spec) == 4):
            raise ValueError("expected [dtype, shape, offset, nbytes]")
        dtype, shape, off, nb = spec
        if not (isinstance(dtype, str) and dtype in DTYPES and hasattr(torch, dtype)):
            raise ValueError(f"unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(is_nonneg_int(s) for s in shape)):
            raise ValueError("the shape is not a list of non-negative integers")
        if not (is_nonneg_int(off) and is_nonneg_int(nb)):
            raise ValueError("offset and nbytes must be non-negative integers")
        need = math.prod(shape) * DTYPES[dtype][1]
        if need != nb:
            raise ValueError(f"shape {shape} of {dtype} is {need} bytes, the entry says {nb}")
        if off + nb > len(blob):
            raise ValueError("outside the row's blob")
        view = np.dtype(int_view(dtype) or dtype)
        arr = blob[off : off + nb].copy().view(view).reshape(shape)
    except (TypeError, ValueError) as exc:
        raise RunFormatError(f"{where}: blob entry {key!r} is malformed ({exc})") from exc
    return _h5_tensor(arr, dtype)


def _row_meta(h: _File, index_meta: Any, row: int, step: int, where: str) -> dict[str, Any]:
    """Row ``row``'s JSON object from ``meta``, checked to describe ``step`` (``hdf5`` included)."""
    m0, ml = (int(v) for v in index_meta[row])
    raw = _region(h, "meta", m0, ml, where).tobytes() if ml else b""
    if _torn(raw):
        raise RunFormatError(f"{where}: the row of step {step} was not completely written (its "
                             "metadata is missing: the write failed or was cut off); the step is damaged")
    try:
        meta = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFormatError(f"{where}: row metadata is not valid JSON ({exc})") from exc
    except RecursionError:
        raise RunFormatError(f"{where}: row metadata is nested too deeply") from None
    layout = meta.get("hdf5") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("step") != step or not isinstance(layout, dict):
        raise RunFormatError(f"{where}: row metadata does not describe step {step}")
    if not isinstance(layout.get("rows", []), list) or not isinstance(layout.get("blob", {}), dict):
        raise RunFormatError(f"{where}: row metadata's 'hdf5' is malformed (expected 'rows': a list, "
                             "'blob': an object)")
    return meta


def read_row(h5path: Path, step: int) -> Raw:
    """The stored form of the row holding ``step`` in the HDF5 file ``h5path`` (its last row for
    that step, should there be several). Its datasets are checked against the manifest beside
    ``h5path`` (:func:`_declared_of`) and everything read against the file's size, before reading.

    Raises:
        RunFormatError: the step is not stored, or its row or the file is damaged or hostile.
    """
    where = f"{h5path}/{fmt.step_name(step)}"
    declared = _declared_of(h5path.parent)
    with _open_h5(h5path) as f:
        h = _checked(f, h5path)
        index = _index(h)
        rows = np.nonzero(_committed(index) == step)[0]
        if len(rows) == 0:
            raise RunFormatError(f"{where}: step {step} is not stored in this file")
        row = int(rows[-1])
        meta = _row_meta(h, index[1], row, step, where)
        layout = meta.pop("hdf5")
        tensors = {key: _read_dataset_row(h, key, row, where, declared) for key in layout.get("rows", [])}
        b0, bl = (int(v) for v in index[2][row])
        entries = layout.get("blob", {})
        blob = _region(h, "blob", b0, bl, where) if entries else np.empty(0, np.uint8)
        for key, spec in entries.items():
            tensors[key] = _blob_entry(blob, key, spec, where)
    return meta, tensors


SAMPLE_BYTES = 4096  # bytes of a row's blob region hashed from each end (row_identities)


def row_identities(h5path: Path, steps: list[int]) -> dict[int, str | None]:
    """Step → ``row:<row>:<digest>`` of its last committed row (:func:`read_row`'s): SHA-256 of its index
    entries, metadata, first and last :data:`SAMPLE_BYTES` of blob region and row of the smallest
    parameter dataset; None where it cannot be read. Read once through the reader's checks."""
    try:
        with _open_h5(h5path) as f:
            h = _checked(f, h5path)
            index = _index(h)
            at = _committed(index)
            rows = {int(s): r for r, s in enumerate(at) if s >= 0}  # a step's last row is the one read
            entries = np.concatenate([np.asarray(index[1][:len(at)]), np.asarray(index[2][:len(at)])], axis=1)
            small = _smallest_param(h)
            return {step: _row_identity(h, rows.get(step), entries, small) for step in steps}
    except Exception:  # noqa: BLE001 - h5py raises many types for a damaged file: nothing to compare
        return dict.fromkeys(steps)


def _smallest_param(h: _File) -> tuple[str, Any] | None:
    """The parameter dataset with the fewest bytes per row (the first such by name), checked."""
    import h5py

    try:
        group = _object(h, fmt.PARAM.rstrip("/"), str(h.path))
    except _Missing:
        return None
    names = list(group.keys())
    if any(not isinstance(group.get(k, getlink=True), h5py.HardLink) for k in names):
        raise RunFormatError(f"{h.path}: a parameter is a link")
    params = [(k, _dataset(h, fmt.PARAM + k, str(h.path))) for k in names if isinstance(group[k], h5py.Dataset)]
    return min(params, key=lambda kd: kd[1].nbytes // max(kd[1].shape[0], 1), default=None)


def _row_identity(h: _File, row: int | None, entries: np.ndarray, small: tuple[str, Any] | None) -> str | None:
    if row is None or row >= len(entries) or min(entries[row]) < 0 or entries[row][1] > fmt.MAX_HEADER_BYTES:
        return None
    m0, ml, b0, bl = (int(v) for v in entries[row])
    where = f"{h.path}/row {row}"
    try:
        digest = hashlib.sha256(f"{row}:{m0}:{ml}:{b0}:{bl}\0".encode())
        digest.update(_region(h, "meta", m0, ml, where).tobytes())
        for off in (b0, b0 + max(bl - SAMPLE_BYTES, 0)):  # its first and last bytes
            digest.update(_region(h, "blob", off, min(bl, SAMPLE_BYTES), where).tobytes())
        if small is not None and small[1].shape[0] > row:
            digest.update(_row_of(h, small[1], small[0], row, where).tobytes())
    except RunFormatError:
        return None
    return f"row:{row}:{digest.hexdigest()[:16]}"


_DECLARED: dict[str, tuple[tuple[int, int, int], Declared | None]] = {}
"""Manifest path → (its identity: inode, mtime, size; what it declares), so that reading row after
row parses the manifest once."""


def _declared_of(run_dir: Path) -> Declared | None:
    """The row datasets the manifest in ``run_dir`` declares, keyed by tensor key, or None when the
    directory holds no manifest (a lone HDF5 file: only its own sizes bound what is read).

    Raises:
        RunFormatError: the manifest cannot be read or is malformed (as :func:`open_run` says).
    """
    from trajscope.store.run import validate_manifest

    mpath = run_dir / fmt.MANIFEST
    try:
        st = os.stat(mpath)
    except OSError:
        return None
    ident = (st.st_ino, st.st_mtime_ns, st.st_size)
    cached = _DECLARED.get(str(mpath))
    if cached is not None and cached[0] == ident:
        return cached[1]
    try:
        manifest = json.loads(fmt.read_bounded(mpath, fmt.MAX_MANIFEST_BYTES, "manifest").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RunFormatError(f"{mpath}: invalid manifest ({type(exc).__name__})") from None
    validate_manifest(manifest, mpath)
    declared: Declared = {}
    for q in manifest["params"]:
        shape = tuple(int(s) for s in q["shape"])
        declared[fmt.PARAM + q["name"]] = declared[fmt.GRAD + q["name"]] = shape
    for q in manifest.get("buffers", []):
        declared[fmt.BUFFER + q["name"]] = None
    _DECLARED[str(mpath)] = (ident, declared)
    return declared


@register
class HDF5Storage(FormatStorage):
    """``trajectory.h5``: one row per snapshot (layout in ``docs/format.md``)."""

    kind = fmt.STORAGE_HDF5

    @classmethod
    def claims(cls, path: Path) -> bool:
        """The pseudo-path :meth:`location` hands out: ``<file>.h5/step_XXXXXXXX``, which is not
        itself a file."""
        return fmt.parse_step_name(path.name) is not None and path.parent.suffix == ".h5" and not path.exists()

    @classmethod
    def read_location(cls, path: Path) -> Raw:
        step = fmt.parse_step_name(path.name)
        if step is None:
            raise RunFormatError(f"{path}: not a row of an HDF5 run (expected FILE.h5/step_XXXXXXXX)")
        return read_row(path.parent, step)

    @property
    def file(self) -> Path:
        return self.run_path / fmt.HDF5_FILE

    def steps(self) -> list[int]:
        if not self.file.exists():
            return []  # killed before the file was created
        with _open_h5(self.file) as f:
            return sorted({int(s) for s in _h5_committed(f, self.file) if s >= 0})

    def uncommitted_rows(self) -> int:
        """Rows ``index/step`` covers without a step: left by a write that failed or was cut off
        between extending ``index/step`` and writing it (ignored by every reader)."""
        if not self.file.exists():
            return 0
        with _open_h5(self.file) as f:
            return int((_h5_committed(f, self.file) < 0).sum())

    def location(self, step: int) -> Path:
        return self.file / fmt.step_name(step)

    def read_raw(self, step: int) -> Raw:
        return read_row(self.file, step)

    def stat(self, step: int) -> tuple[int, int]:
        return stat_path(self.file)

    def unchanged(self, then: tuple[int, int], now: tuple[int, int]) -> bool:
        """A container that only grew: a live recording appended rows, and rows already written
        never change."""
        return then == now or (then[1] >= 0 and now[1] >= then[1])

    def identities(self, steps: list[int]) -> dict[int, str | None]:
        return row_identities(self.file, steps)

    def disk_bytes(self) -> int:
        return self.file.stat().st_size if self.file.exists() else 0
