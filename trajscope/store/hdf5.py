"""The HDF5 storage, read: one file ``trajectory.h5``, one row per snapshot (``docs/format.md``,
storage ``hdf5``). The writer is :class:`trajscope.recorders.backends.hdf5.HDF5Writer`.

h5py is imported only inside the functions that use it: a run stored as safetensors never loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajscope import runformat as fmt
from trajscope.errors import RunFormatError
from trajscope.runformat import DTYPES, int_view
from trajscope.store.storage import FormatStorage, Raw, register, stat_path

__all__ = ["HDF5Storage", "read_row"]


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
    """Steps of the rows ``index/step`` covers (it is written last), -1 for a row whose step was
    never written: its commit did not finish (``index/step`` is filled with -1), so it is not a
    row for readers (:func:`committed_steps`)."""
    try:
        steps = f["index/step"]
        n = min(steps.shape[0], f["index/meta"].shape[0], f["index/blob"].shape[0])
        return np.asarray(steps[:n], dtype=np.int64)
    except KeyError as exc:
        raise RunFormatError(f"{path}: not a trajscope HDF5 file (missing {exc})") from exc


def _torn(raw: bytes) -> bool:
    """Whether a row's metadata bytes were never written: empty (``index/meta`` unwritten) or all
    NUL (a ``meta`` chunk whose write failed reads as its fill value)."""
    return not raw.strip(b"\0")


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
        raw = bytes(f["meta"][m0 : m0 + ml]) if ml > 0 else b""
        if _torn(raw):
            raise RunFormatError(f"{where}: the row of step {step} was not completely written (its "
                                 "metadata is missing: the write failed or was cut off); the step is damaged")
        try:
            meta = json.loads(raw.decode())
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

    def disk_bytes(self) -> int:
        return self.file.stat().st_size if self.file.exists() else 0
