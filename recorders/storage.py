"""The recorder's write path: snapshot images, a bounded buffer pool, storage writers, a writer thread.

Why it is shaped this way (see ``docs/recording.md`` and ``docs/performance.md``):

* A recorded step must cost training little more than one copy of its bytes. So the training
  thread copies each tensor exactly once, straight into its final place in a preallocated buffer
  (a :class:`Slot`) laid out as the step's safetensors file (header included). The background
  writer then hands that buffer to the OS in one write, with ``O_DIRECT`` where the filesystem
  allows it: a buffered write costs a second full copy into the page cache (on the 2-core machine
  this was measured at ~30 ms of CPU for 15 MB, against ~1 ms for the direct write).
* Copies happen on the training thread, before ``optimizer.step`` mutates anything, so recording
  cannot change training; only I/O moves to the background thread.
* The pool holds ``max_pending`` slots. When all are waiting to be written, the training thread
  blocks in :meth:`SlotPool.acquire` (back-pressure): memory stays bounded by
  ``max_pending × bytes per step`` whatever the disk speed.
* A failed write is kept (:attr:`AsyncWriter.error`) and surfaced by the recorder at its next hook
  or at close; the writer keeps draining the queue so the training thread can never deadlock.

Only torch, numpy and the standard library are imported here; h5py only when an HDF5 writer is made.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajscope import format as fmt
from trajscope.errors import RecorderError

__all__ = [
    "Entry",
    "StepImage",
    "Slot",
    "SlotPool",
    "build_image",
    "SafetensorsWriter",
    "HDF5Writer",
    "AsyncWriter",
    "dtype_name",
]

_ALIGN = 4096  # O_DIRECT needs the buffer address, length and file offset aligned to the block size


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``: the dtype names of the manifest and the format."""
    return str(dtype).removeprefix("torch.")


# numpy has no bfloat16 or float8: such tensors are copied through a same-width integer view.
_COPY_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float8_e4m3fn: torch.uint8,
    torch.float8_e5m2: torch.uint8,
    torch.bool: torch.uint8,
}
_NP_VIEW: dict[str, Any] = {
    "float64": np.float64, "int64": np.int64, "uint64": np.uint64,
    "float32": np.float32, "int32": np.int32, "uint32": np.uint32,
    "float16": np.int16, "bfloat16": np.int16, "int16": np.int16, "uint16": np.uint16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.uint8,
    "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8,
}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a :class:`StepImage` (absolute byte offsets into the slot)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class StepImage:
    """One snapshot, laid out in a slot exactly as its safetensors file.

    ``slot.buf[:size]`` is the complete file: the header (``header_len`` bytes, metadata included)
    followed by the tensors at ``entries``. ``event`` is a CUDA event to wait for before reading the
    buffer when some tensor was copied from a GPU without blocking.
    """

    step: int
    kind: str
    meta: dict[str, Any]
    slot: Slot
    header_len: int
    size: int
    entries: list[Entry]
    event: Any = None

    def wait(self) -> None:
        """Block until every device→host copy into the slot has finished."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def view(self) -> memoryview:
        """The file image, ``size`` bytes."""
        return memoryview(self.slot.array)[: self.size]

    def array(self, entry: Entry) -> np.ndarray:
        """The raw bytes of one tensor (a uint8 view into the slot)."""
        return self.slot.array[entry.begin : entry.end]

    def tensor(self, entry: Entry) -> torch.Tensor:
        """One tensor as a torch view into the slot (valid until the slot is reused)."""
        raw = self.slot.buf[entry.begin : entry.end]
        return raw.view(getattr(torch, entry.dtype)).view(entry.shape)


class Slot:
    """A reusable, page-aligned host buffer holding one step image.

    Reusing the buffer matters as much as avoiding copies: a fresh 15 MB allocation per step costs
    page faults that are slower than the copy itself. It grows (never shrinks) when a step needs
    more room, e.g. a larger batch.
    """

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self.capacity = 0
        self._raw = torch.empty(0, dtype=torch.uint8)
        self.buf = self._raw
        self.array: np.ndarray = self.buf.numpy()

    def ensure(self, size: int) -> None:
        if size <= self.capacity:
            return
        cap = max(size, int(self.capacity * 1.25))
        cap += -cap % _ALIGN
        raw = torch.empty(cap + _ALIGN, dtype=torch.uint8, pin_memory=self.pin)
        off = -raw.data_ptr() % _ALIGN
        self._raw = raw
        self.buf = raw[off : off + cap]
        self.array = self.buf.numpy()
        self.capacity = cap


class SlotPool:
    """``size`` slots; :meth:`acquire` blocks while all of them wait to be written (back-pressure)."""

    def __init__(self, size: int, pin: bool = False) -> None:
        if size < 1:
            raise RecorderError(f"max_pending={size!r}: expected an int >= 1")
        self._free: queue.Queue[Slot] = queue.Queue()
        for _ in range(size):
            self._free.put(Slot(pin))
        self.size = size

    def acquire(self) -> Slot:
        return self._free.get()

    def release(self, slot: Slot) -> None:
        self._free.put(slot)


def _copy_into(slot: Slot, e: Entry, src: torch.Tensor) -> bool:
    """Copy ``src`` into its place ``e`` in the slot. True if the copy may still be in flight.

    CPU tensors are copied by numpy (single-threaded memcpy, GIL released): torch's parallel copy
    fights the background thread for cores and was measured several times slower under load.
    GPU tensors go to pinned memory without blocking (the writer waits on an event).
    """
    src = src.detach()
    if src.device.type == "cpu":
        view = _COPY_VIEW.get(src.dtype)
        s = src.view(view) if view is not None else src
        if s.is_neg():
            s = s.resolve_neg()
        dst = slot.array[e.begin : e.end].view(_NP_VIEW[e.dtype]).reshape(e.shape)
        np.copyto(dst, s.numpy(), casting="no")
        return False
    dst_t = slot.buf[e.begin : e.end].view(getattr(torch, e.dtype)).view(e.shape)
    if src.device.type == "cuda" and dst_t.is_pinned():
        dst_t.copy_(src, non_blocking=True)
        return True
    dst_t.copy_(src)
    return False


def build_image(slot: Slot, step: int, kind: str, meta: dict[str, Any],
                tensors: Sequence[tuple[str, torch.Tensor]]) -> StepImage:
    """Lay ``tensors`` out in ``slot`` as a safetensors file with ``meta`` and copy them in.

    This is the one copy a recorded step costs on the training thread.
    """
    specs = []
    for key, t in tensors:
        if t.layout != torch.strided:
            raise RecorderError(f"step {step}: tensor {key!r} has layout {t.layout}; only dense "
                                "(strided) tensors can be recorded")
        specs.append((key, dtype_name(t.dtype), tuple(t.shape)))
    layout, data_len = fmt.safetensors_layout(specs)
    header = fmt.safetensors_header(
        layout, {"trajscope": json.dumps(meta, allow_nan=True, separators=(",", ":"))}
    )
    h = len(header)
    size = h + data_len
    slot.ensure(size)
    slot.array[:h] = np.frombuffer(header, dtype=np.uint8)
    by_key = dict(tensors)
    entries = []
    in_flight = False
    for key, dtype, shape, begin, end in layout:
        e = Entry(key, dtype, shape, h + begin, h + end)
        entries.append(e)
        if end > begin:
            in_flight |= _copy_into(slot, e, by_key[key])
    event = None
    if in_flight:
        event = torch.cuda.Event()
        event.record()
    return StepImage(step=step, kind=kind, meta=meta, slot=slot, header_len=h, size=size,
                     entries=entries, event=event)


# --- writers ---------------------------------------------------------------------------------------


class SafetensorsWriter:
    """One file per snapshot, ``steps/step_XXXXXXXX.safetensors``, written to a temp name and renamed.

    A reader, or a process killed mid-write, sees either no file or the complete one. Data goes out
    with ``O_DIRECT`` (no page-cache copy) when ``direct_io`` allows and the filesystem supports it,
    else through an ordinary buffered write.
    """

    def __init__(self, run_dir: Path, *, direct_io: bool | None = None,
                 steps_dir: Path | None = None) -> None:
        self.dir = steps_dir if steps_dir is not None else run_dir / fmt.STEPS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        # None: try O_DIRECT and fall back silently; False: never; True: try, fall back too (some
        # filesystems, tmpfs among them, reject it), but the attempt is what the user asked for.
        self._direct = bool(getattr(os, "O_DIRECT", 0)) and direct_io is not False

    def path(self, step: int) -> Path:
        return self.dir / fmt.step_filename(step)

    def write(self, image: StepImage) -> Path:
        path = self.path(image.step)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        data = image.view()
        try:
            if not (self._direct and self._write_direct(tmp, data)):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with _suppress_oserror():
                tmp.unlink()
            raise
        return path

    def _write_direct(self, tmp: Path, data: memoryview) -> bool:
        """Write ``data`` with O_DIRECT; False (nothing written) where the filesystem refuses it."""
        n_aligned = len(data) - len(data) % _ALIGN
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
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
        pass


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


_H5_STORE: dict[str, str] = {
    # torch dtype → how HDF5 stores it. float16/bfloat16/float8 and bool keep their exact bits in
    # an unsigned integer of the same width; the dataset's "dtype" attribute names the real type.
    "float64": "<f8", "float32": "<f4", "int64": "<i8", "int32": "<i4", "int16": "<i2",
    "int8": "i1", "uint8": "u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
    "float16": "<u2", "bfloat16": "<u2", "bool": "u1", "float8_e4m3fn": "u1", "float8_e5m2": "u1",
}
_H5_MAX_ROW = 1 << 30  # a row is one HDF5 chunk (limit 4 GiB); larger tensors go to the blob


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
            if dtype not in _H5_STORE:
                continue
            n = fmt.SAFETENSORS_DTYPES[dtype][1]
            for s in shape:
                n *= s
            if n == 0 or n > _H5_MAX_ROW or key in self._ds:
                continue
            d = f.create_dataset(key, shape=(0, *shape), maxshape=(None, *shape),
                                 chunks=(1, *shape), dtype=_H5_STORE[dtype])
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
        toc: dict[str, list[Any]] = {}
        b0 = pos = self._blob_end
        total = sum(e.end - e.begin for e in blob_entries)
        if total:
            self._blob.resize(b0 + total, axis=0)
            for e in blob_entries:
                n = e.end - e.begin
                if n:
                    self._blob[pos : pos + n] = image.array(e)
                toc[e.key] = [e.dtype, list(e.shape), pos - b0, n]
                pos += n
        else:
            for e in blob_entries:
                toc[e.key] = [e.dtype, list(e.shape), 0, 0]
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

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()


# --- the background writer -------------------------------------------------------------------------


@dataclass
class WriteError:
    """A failed write: which step, where, and the exception."""

    step: int
    where: str
    exc: BaseException

    def message(self) -> str:
        reason = self.exc.strerror if isinstance(self.exc, OSError) and self.exc.strerror else str(self.exc)
        return f"step {self.step}: writing {self.where} failed ({type(self.exc).__name__}: {reason})"


@dataclass
class AsyncWriter:
    """Writes :class:`StepImage` s with ``write`` on a background thread (or inline if not ``threaded``).

    ``submit`` never copies: the image's slot is owned by the writer until written, then returned
    to the pool. After the first failure nothing more is written (later rows could not be trusted
    to be consecutive with a broken file); submitted images are still released.
    """

    write: Callable[[StepImage], Path]
    where: Callable[[int], str]
    pool: SlotPool
    threaded: bool = True
    error: WriteError | None = None
    written: int = 0
    bytes_written: int = 0
    write_seconds: float = 0.0  # time spent writing (on the writer thread when threaded)
    write_cpu_seconds: float = 0.0  # CPU time of that thread spent writing
    _q: queue.Queue[StepImage | None] = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.threaded:
            self._thread = threading.Thread(target=self._run, name="trajscope-writer", daemon=True)
            self._thread.start()

    def submit(self, image: StepImage) -> None:
        if self.threaded:
            self._q.put(image)
        else:
            self._write_one(image)

    def _write_one(self, image: StepImage) -> None:
        try:
            if self.error is None:
                t0, c0 = time.perf_counter(), time.thread_time()
                image.wait()
                self.write(image)
                self.write_seconds += time.perf_counter() - t0
                self.write_cpu_seconds += time.thread_time() - c0
                self.written += 1
                self.bytes_written += image.size
        except BaseException as exc:  # noqa: BLE001 - kept and raised on the training thread
            self.error = WriteError(image.step, self.where(image.step), exc)
        finally:
            self.pool.release(image.slot)

    def _run(self) -> None:
        while True:
            image = self._q.get()
            if image is None:
                return
            self._write_one(image)

    def flush(self) -> None:
        """Wait until every submitted image is written (or has failed)."""
        if self.threaded:
            # Holding every slot means no image is queued or being written.
            slots = [self.pool.acquire() for _ in range(self.pool.size)]
            for s in slots:
                self.pool.release(s)

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None
