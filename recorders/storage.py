"""The recorder's write path: snapshot images, a bounded buffer pool, a writer thread.

The writers of each storage format live in :mod:`trajscope.recorders.backends`; this module is
what every format shares.

Why it is shaped this way (see ``docs/recording.md`` and ``docs/performance.md``):

* A recorded step must cost training little more than one copy of its bytes. So the training
  thread copies each tensor exactly once, straight into its final place in a preallocated buffer
  (a :class:`Slot`) laid out as the step's safetensors file (header included). The background
  writer then hands that buffer to the OS in one write, with ``O_DIRECT`` where the filesystem
  allows it: a buffered write costs a second full copy into the page cache (measurements in
  ``docs/performance.md``). The HDF5 writer writes tensor by tensor, also with ``O_DIRECT``, and
  has its slots lay the tensors out aligned instead (:meth:`SlotPool.align_tensors`).
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

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajscope import runformat as fmt
from trajscope.errors import RecorderError, one_line
from trajscope.recorders.backends.base import DIRECT_IO_ALIGN, DTYPES, bits_dtype, dtype_name

__all__ = [
    "Entry",
    "StepImage",
    "Slot",
    "SlotPool",
    "build_image",
    "AsyncWriter",
    "dtype_name",
]

_ALIGN = DIRECT_IO_ALIGN

# Tensors are copied through their bits (numpy has no bfloat16 or float8): the same-width integer
# views of trajscope.runformat.DTYPES, as torch dtypes (source side) and numpy dtypes (slot side).
_COPY_VIEW: dict[torch.dtype, torch.dtype] = {
    getattr(torch, name): getattr(torch, view) for name, (_, _, view) in DTYPES.items() if view is not None
}
_NP_VIEW: dict[str, Any] = {name: bits_dtype(name).type for name in DTYPES}


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
    """One snapshot, laid out in a slot exactly as its safetensors file (or, in a slot with
    ``align``, as its tensors each at an aligned offset: see :meth:`SlotPool.align_tensors`).

    ``slot.buf[:size]`` is the complete file: the header (``header_len`` bytes, metadata included)
    followed by the tensors at ``entries``; an aligned image has no header (``header_len`` 0) and
    gaps between its tensors. ``event`` is a CUDA event to wait for before reading the buffer when
    some tensor was copied from a GPU without blocking.
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
        return self.slot.array.data[: self.size]  # (1-D uint8: the buffer itself)

    def array(self, entry: Entry) -> np.ndarray:
        """The raw bytes of one tensor (a uint8 view into the slot)."""
        return self.slot.array[entry.begin : entry.end]

    def tensor(self, entry: Entry) -> torch.Tensor:
        """One tensor as a torch view into the slot (valid until the slot is reused)."""
        raw = self.slot.buf[entry.begin : entry.end]
        return raw.view(getattr(torch, entry.dtype)).view(entry.shape)


class Slot:
    """A reusable, page-aligned host buffer holding one step image.

    Reusing the buffer matters as much as avoiding copies: a fresh multi-megabyte allocation per step costs
    page faults that are slower than the copy itself. It grows (never shrinks) when a step needs
    more room, e.g. a larger batch.
    """

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self.align = 0  # > 0: images are laid out with aligned tensors (SlotPool.align_tensors)
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
        self._slots = [Slot(pin) for _ in range(size)]
        for slot in self._slots:
            self._free.put(slot)
        self.size = size

    def align_tensors(self, align: int) -> None:
        """Lay the images built in these slots out for a writer that sends tensors to disk straight
        from the slot with ``O_DIRECT`` (:attr:`HDF5Writer.image_align`): every tensor of ``align``
        bytes or more starts at a multiple of ``align``, and no safetensors header is built. 0
        restores the safetensors layout."""
        for slot in self._slots:
            slot.align = align

    def acquire(self) -> Slot:
        return self._free.get()

    def release(self, slot: Slot) -> None:
        self._free.put(slot)


def _copy_into(slot: Slot, e: Entry, src: torch.Tensor) -> bool:
    """Copy ``src`` into its place ``e`` in the slot. True if the copy may still be in flight.

    CPU tensors are copied by numpy (single-threaded memcpy, GIL released): torch's parallel copy
    fights the background thread for cores and is slower under load (``docs/performance.md``).
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
    if slot.align:
        layout, size = _aligned(layout, slot.align)
        h = 0
        slot.ensure(size)
    else:
        header = fmt.safetensors_header(
            layout, {"trajscope": json.dumps(meta, allow_nan=True, separators=(",", ":"))}
        )
        h = len(header)
        if h - 8 > fmt.MAX_HEADER_BYTES:  # past it, every reader refuses the file
            raise RecorderError(
                f"step {step}: the snapshot's header would be {h - 8} bytes, more than the "
                f"{fmt.MAX_HEADER_BYTES} bytes a reader accepts; it holds the batch's numbers and strings "
                "(its tensors are stored apart): pass large data as tensors"
            )
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


def _aligned(layout: list[tuple[str, str, tuple[int, ...], int, int]], align: int
             ) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], int]:
    """``layout`` (the safetensors order) moved so that every tensor of ``align`` bytes or more
    starts at a multiple of ``align``; the new layout and its end."""
    out = []
    pos = 0
    for key, dtype, shape, begin, end in layout:
        n = end - begin
        if n >= align:
            pos += -pos % align
        out.append((key, dtype, shape, pos, pos + n))
        pos += n
    return out, pos


# --- the background writer -------------------------------------------------------------------------


@dataclass
class WriteError:
    """A failed write: which step, the file (its path), and the exception."""

    step: int
    where: str
    exc: BaseException

    def message(self) -> str:
        """One line naming the file, the step and the cause, e.g. ``runs/a/trajectory.h5: writing
        step 12 failed (No space left on device)``. A storage library's longer text stays in the
        exception (and its ``__cause__``), which the recorder chains to its error."""
        exc = self.exc
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        return f"{self.where}: writing step {self.step} failed ({one_line(' '.join(str(reason).split()), 300)})"


@dataclass
class AsyncWriter:
    """Writes :class:`StepImage` s with ``write`` on a background thread (or inline if not ``threaded``).

    ``submit`` never copies: the image's slot is owned by the writer until written, then returned
    to the pool. After the first failure nothing more is written (later rows could not be trusted
    to be consecutive with a broken file); submitted images are still released, each handed to
    ``after_error`` when given (a sharded run's writer keeps voting, :mod:`~trajscope.recorders.sharded`).
    """

    write: Callable[[StepImage], Path]
    where: Callable[[int], str]
    pool: SlotPool
    threaded: bool = True
    after_error: Callable[[StepImage], None] | None = None
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

    def copy_and_submit(self, step: int, kind: str, meta: dict[str, Any], tensors: Sequence[tuple[str, torch.Tensor]],
                        stats: Any) -> None:
        """Copy a snapshot into a free slot (:func:`build_image`; blocks while every slot waits to be
        written: back-pressure) and queue it; the wait, the copy and the bytes are added to ``stats``
        (a :class:`~trajscope.recorders.stats.RecorderStats`)."""
        t0 = time.perf_counter()
        slot = self.pool.acquire()
        t1 = time.perf_counter()
        try:
            image = build_image(slot, step, kind, meta, tensors)
        except BaseException:
            self.pool.release(slot)
            raise
        stats.wait_seconds += t1 - t0
        stats.copy_seconds += time.perf_counter() - t1
        stats.snapshots += 1
        stats.bytes += image.size
        self.submit(image)

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
            elif self.after_error is not None:
                self.after_error(image)
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
