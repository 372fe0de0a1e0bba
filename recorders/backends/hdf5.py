"""The HDF5 storage: one file ``trajectory.h5``, one row per snapshot (``docs/format-hdf5.md``).

h5py is imported only inside the functions that use it, so that ``import trajscope.recorders``
(which imports this module through the backend registry) does not load it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trajscope import format as fmt
from trajscope.errors import RunFormatError
from trajscope.recorders.backends.base import DTYPES, Raw, Storage, int_view, register, stat_path

if TYPE_CHECKING:
    from trajscope.recorders.storage import Entry, StepImage

__all__ = ["HDF5Storage", "HDF5Writer", "H5_STORE"]


def _store_type(name: str) -> str:
    """How HDF5 stores dtype ``name``: a little-endian numpy type string (``"<f4"``).

    A dtype with an integer view in :data:`~trajscope.format.DTYPES` (float16, bfloat16, float8,
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


# --- reading -----------------------------------------------------------------------------------------


def _open_h5(path: Path) -> Any:
    """Open a run's HDF5 file read-only in SWMR mode.

    SWMR lets a reader open the file while the recorder still appends to it, and it is also how a
    file whose writer was killed opens (a plain open refuses it: "file is already open for write").
    """
    import h5py

    if not path.exists():
        raise RunFormatError(f"{path}: no such file")
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as exc:
        raise RunFormatError(f"{path}: cannot open as HDF5 ({exc})") from exc


def _h5_committed(f: Any, path: Path) -> np.ndarray:
    """Steps of the committed rows: a row counts once ``index/step`` covers it (written last)."""
    try:
        steps = f["index/step"]
        n = min(steps.shape[0], f["index/meta"].shape[0], f["index/blob"].shape[0])
        return np.asarray(steps[:n], dtype=np.int64)
    except KeyError as exc:
        raise RunFormatError(f"{path}: not a trajscope HDF5 file (missing {exc})") from exc


def _h5_tensor(arr: np.ndarray, dtype: str, where: str) -> torch.Tensor:
    if not hasattr(torch, dtype) or dtype not in DTYPES:
        raise RunFormatError(f"{where}: unknown dtype {dtype!r}")
    view = int_view(dtype)
    if view is not None:
        arr = arr.view(view)
    # (np.ascontiguousarray would turn a 0-d array into shape (1,))
    t = torch.from_numpy(arr if arr.flags.c_contiguous else arr.copy(order="C"))
    return t.view(getattr(torch, dtype)) if t.dtype != getattr(torch, dtype) else t


def _read_blob(f: Any, layout: dict[str, Any], b0: int, bl: int, where: str) -> dict[str, torch.Tensor]:
    """The tensors a row keeps in the ``blob`` dataset, by the row's table of contents."""
    tensors: dict[str, torch.Tensor] = {}
    blob = np.asarray(f["blob"][b0 : b0 + bl]) if bl else np.empty(0, np.uint8)
    for key, spec in layout.get("blob", {}).items():
        try:
            dtype, shape, off, nb = spec
            raw = blob[off : off + nb]
            if len(raw) != nb:
                raise ValueError("outside the row's blob")
            view = np.dtype(int_view(dtype) or dtype)
            arr = raw.copy().view(view).reshape(shape) if nb else np.empty(shape, view)
        except (TypeError, ValueError) as exc:
            raise RunFormatError(f"{where}: blob entry {key!r} is malformed ({exc})") from exc
        tensors[key] = _h5_tensor(arr, dtype, f"{where}: {key}")
    return tensors


def read_row(h5path: Path, step: int) -> Raw:
    """The stored form of the row holding ``step`` in the HDF5 file ``h5path`` (its last row for
    that step, should there be several)."""
    where = f"{h5path}/{fmt.step_name(step)}"
    with _open_h5(h5path) as f:
        steps = _h5_committed(f, h5path)
        rows = np.nonzero(steps == step)[0]
        if len(rows) == 0:
            raise RunFormatError(f"{where}: step {step} is not stored in this file")
        row = int(rows[-1])
        m0, ml = (int(v) for v in f["index/meta"][row])
        b0, bl = (int(v) for v in f["index/blob"][row])
        try:
            meta = json.loads(bytes(f["meta"][m0 : m0 + ml]).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunFormatError(f"{where}: row metadata is not valid JSON ({exc})") from exc
        layout = meta.pop("hdf5", None) if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("step") != step or not isinstance(layout, dict):
            raise RunFormatError(f"{where}: row metadata does not describe step {step}")
        tensors: dict[str, torch.Tensor] = {}
        for key in layout.get("rows", []):
            if key not in f:
                raise RunFormatError(f"{where}: dataset {key!r} named by the row is missing")
            d = f[key]
            if d.shape[0] <= row:
                raise RunFormatError(f"{where}: dataset {key!r} has no row {row}")
            arr = np.asarray(d[row : row + 1]).reshape(d.shape[1:])
            tensors[key] = _h5_tensor(arr, str(d.attrs.get("dtype", arr.dtype.name)), f"{where}: {key}")
        tensors.update(_read_blob(f, layout, b0, bl, where))
    return meta, tensors


@register
class HDF5Storage(Storage):
    """``trajectory.h5``: one row per snapshot (layout in ``docs/format-hdf5.md``)."""

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
            return sorted({int(s) for s in _h5_committed(f, self.file)})

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

    def disk_bytes(self) -> int:
        return self.file.stat().st_size if self.file.exists() else 0


# --- writing -----------------------------------------------------------------------------------------


class HDF5Writer:
    """The HDF5 storage (``trajectory.h5``, layout in ``docs/format-hdf5.md``).

    Every tensor declared when the file is created (parameters, gradients, buffers) gets an
    extendable dataset ``<kind>/<name>`` of shape ``(rows, *shape)``, chunked one row per chunk;
    a snapshot is one row, written as a raw chunk. Everything of variable layout (minibatch, RNG
    state, optimizer state, a tensor whose shape changed) goes to the 1-D byte dataset ``blob``
    with a table of contents in the row's JSON metadata (dataset ``meta``). ``index/step`` is
    appended last and the file flushed: a row exists for readers once ``index/step`` covers it.

    The file is in SWMR mode (single writer, multiple readers): readers can open it while training
    runs, and a writer killed at any moment leaves a file that opens (with ``swmr=True``) with every
    flushed row intact. SWMR forbids creating objects later, hence the fixed declared set.
    """

    def __init__(self, path: Path, declared: Iterable[tuple[str, str, tuple[int, ...]]],
                 attrs: dict[str, Any]) -> None:
        import h5py

        self.path = path
        self._f = h5py.File(path, "w", libver="latest")
        f = self._f
        for k, v in attrs.items():
            f.attrs[k] = v
        self._ds: dict[str, tuple[Any, str, tuple[int, ...]]] = {}
        for key, dtype, shape in declared:
            if dtype not in H5_STORE:
                continue
            n = DTYPES[dtype][1]
            for s in shape:
                n *= s
            if n == 0 or n > _H5_MAX_ROW or key in self._ds:
                continue
            d = f.create_dataset(key, shape=(0, *shape), maxshape=(None, *shape),
                                 chunks=(1, *shape), dtype=H5_STORE[dtype])
            d.attrs["dtype"] = dtype
            self._ds[key] = (d, dtype, tuple(shape))
        self._blob = f.create_dataset("blob", shape=(0,), maxshape=(None,), chunks=(1 << 18,),
                                      dtype="u1")
        self._meta = f.create_dataset("meta", shape=(0,), maxshape=(None,), chunks=(1 << 16,),
                                      dtype="u1")
        self._i_step = f.create_dataset("index/step", shape=(0,), maxshape=(None,),
                                        chunks=(4096,), dtype="<i8")
        self._i_meta = f.create_dataset("index/meta", shape=(0, 2), maxshape=(None, 2),
                                        chunks=(4096, 2), dtype="<i8")
        self._i_blob = f.create_dataset("index/blob", shape=(0, 2), maxshape=(None, 2),
                                        chunks=(4096, 2), dtype="<i8")
        f.swmr_mode = True
        f.flush()
        self._rows = 0
        self._blob_end = 0
        self._meta_end = 0

    def write(self, image: StepImage) -> Path:
        row = self._rows
        rows: list[str] = []
        blob_entries: list[Entry] = []
        for e in image.entries:
            declared = self._ds.get(e.key)
            if declared is not None and declared[1] == e.dtype and declared[2] == e.shape:
                d = declared[0]
                if d.shape[0] <= row:
                    d.resize(row + 1, axis=0)
                d.id.write_direct_chunk((row,) + (0,) * len(e.shape), image.array(e))
                rows.append(e.key)
            else:
                blob_entries.append(e)
        toc, b0, total = self._write_blob(image, blob_entries)
        meta = dict(image.meta)
        meta["hdf5"] = {"rows": rows, "blob": toc}
        mbytes = np.frombuffer(json.dumps(meta, allow_nan=True, separators=(",", ":")).encode(),
                               dtype=np.uint8)
        m0 = self._meta_end
        self._meta.resize(m0 + len(mbytes), axis=0)
        self._meta[m0:] = mbytes
        for d, value in ((self._i_meta, (m0, len(mbytes))), (self._i_blob, (b0, total))):
            d.resize(row + 1, axis=0)
            d[row] = value
        # The commit: a row exists for readers once index/step covers it (written last).
        self._i_step.resize(row + 1, axis=0)
        self._i_step[row] = image.step
        self._f.flush()
        self._rows += 1
        self._blob_end = b0 + total
        self._meta_end = m0 + len(mbytes)
        return self.path

    def _write_blob(self, image: StepImage, entries: list[Entry]) -> tuple[dict[str, list[Any]], int, int]:
        """Append ``entries`` to ``blob``; their table of contents (offsets relative to the row's
        start ``b0``), ``b0`` and the bytes appended."""
        toc: dict[str, list[Any]] = {}
        b0 = pos = self._blob_end
        total = sum(e.end - e.begin for e in entries)
        if total:
            self._blob.resize(b0 + total, axis=0)
            for e in entries:
                n = e.end - e.begin
                if n:
                    self._blob[pos : pos + n] = image.array(e)
                toc[e.key] = [e.dtype, list(e.shape), pos - b0, n]
                pos += n
        else:
            for e in entries:
                toc[e.key] = [e.dtype, list(e.shape), 0, 0]
        return toc, b0, total

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()
