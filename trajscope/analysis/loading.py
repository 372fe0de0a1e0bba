"""Snapshot references, the per-process cache of recently read snapshots, and their wire form.

The analyzer names every snapshot a pair needs by one picklable value, :class:`SnapshotRef`:
the run's storage, the step, whether the parameters alone are wanted, and what the storage said
of it when the graph was built (``stat``: mtime in ns and size in bytes). Whoever resolves a
reference (a shared load task, or the pair task itself in a process pool) asks the storage to read
it, so this module never knows the format. A reference resolved after the snapshot changed on
disk raises; a damaged snapshot resolves to a :class:`health.BadSnapshot` value, so that only the
pairs needing it are skipped.

Resolved snapshots are kept in a small per-process LRU cache: a window's boundary snapshots are
the next window's first ones, and the same reference resolved by several pair tasks of one process
is read once. The parameters alone of a step whose whole snapshot is cached (x_0 while pair 0 runs)
are served from it, and a whole snapshot read while its parameters alone are cached shares their
tensors: one copy of x_0 either way. Cached snapshots are :class:`ShippedSnapshot` objects, which
pickle their tensors as plain arrays (one memcpy each way, about ten times cheaper than torch's own
tensor pickling) when a cluster moves a loaded snapshot between workers.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trajscope.analysis import health
from trajscope.errors import AnalysisError, RunFormatError
from trajscope.store import Snapshot
from trajscope.store.trees import tree_map

if TYPE_CHECKING:
    from trajscope.store import Storage

__all__ = ["SnapshotRef", "ShippedSnapshot", "ship", "resolved", "on_device"]

Loaded = Snapshot | health.BadSnapshot
Stat = tuple[int, int]

_RECENT_SNAPSHOTS = 4
"""Snapshots kept per process: enough for a window boundary and the shared x_0 and x* parameters,
few enough that memory stays bounded whatever the run length."""

# Keyed by (location, mtime, size, parameters only, wrapper prefix stripped from its names): a
# rewritten snapshot is never served stale, nor one named for another model (trajscope.store.unwrap).
_CacheKey = tuple[str, int, int, bool, str]
_recent: collections.OrderedDict[_CacheKey, Snapshot] = collections.OrderedDict()
_recent_lock = threading.Lock()


class SnapshotRef:
    """Where one snapshot is: ``storage`` (a run's :class:`trajscope.store.storage.Storage`, which holds
    only a path), ``step``, ``params_only`` and the ``stat`` taken when the reference was made.

    Made by the driver without reading anything; pickles as these four small values.
    """

    __slots__ = ("storage", "step", "params_only", "stat")

    def __init__(self, storage: Storage, step: int, params_only: bool, stat: Stat) -> None:
        self.storage, self.step, self.params_only, self.stat = storage, step, params_only, stat

    @classmethod
    def of(cls, storage: Storage, step: int, *, params_only: bool = False) -> SnapshotRef:
        """A reference to the snapshot of ``step`` as it is on disk now (stat only)."""
        return cls(storage, step, params_only, storage.stat(step))

    def __reduce__(self) -> tuple[Any, ...]:
        return (SnapshotRef, (self.storage, self.step, self.params_only, self.stat))

    def __repr__(self) -> str:
        what = "params of " if self.params_only else ""
        return f"<SnapshotRef {what}{self.storage.location(self.step)} stat={self.stat}>"

    def resolve(self, pin: bool = False) -> Loaded:
        """The snapshot (from this process's cache when recently read), or its damage as a
        :class:`health.BadSnapshot`. ``pin`` page-locks the tensors of a snapshot read now.

        Raises:
            AnalysisError: if the snapshot changed on disk since the reference was made.
        """
        now, snap = _read_cached(self, pin)
        if isinstance(snap, Snapshot) and not self.storage.unchanged(self.stat, now):
            raise AnalysisError(
                f"{self.storage.location(self.step)}: the snapshot file changed during the analysis; re-run it"
            )
        return snap


def resolved(value: Any) -> Any:
    """``value`` with a :class:`SnapshotRef` resolved (a loaded snapshot or None as it is)."""
    return value.resolve() if isinstance(value, SnapshotRef) else value


def _read_cached(ref: SnapshotRef, pin: bool) -> tuple[Stat, Loaded]:
    stat = ref.storage.stat(ref.step)
    key = (str(ref.storage.location(ref.step)), *stat, ref.params_only, getattr(ref.storage, "strip_prefix", ""))
    with _recent_lock:
        snap = _recent.get(key)
        if snap is None and ref.params_only:  # the whole snapshot is here: its parameters, not a copy
            whole = _recent.get((*key[:3], False, key[4]))
            if whole is not None:
                return stat, ship(Snapshot(step=whole.step, kind=whole.kind, params=whole.params))
        if snap is not None:
            _recent.move_to_end(key)
            return stat, snap
    loaded = _read(ref)
    if isinstance(loaded, health.BadSnapshot):
        return stat, loaded
    shipped = ship(_pinned(loaded) if pin else loaded)
    with _recent_lock:
        if not ref.params_only:
            shipped = _sharing_params(shipped, _recent.get((*key[:3], True, key[4])))
        _recent[key] = shipped
        while len(_recent) > _RECENT_SNAPSHOTS:
            _recent.popitem(last=False)
    return stat, shipped


def _sharing_params(whole: ShippedSnapshot, params: Snapshot | None) -> ShippedSnapshot:
    """``whole`` with the parameter tensors of ``params`` (the same file's parameters, cached
    alone) where they are laid out alike, so that the copy just read is freed."""
    if params is None:
        return whole
    def alike(a: Any, b: Any) -> bool:
        return bool(a.stride() == b.stride() and a.device == b.device and a.is_pinned() == b.is_pinned())

    same = {n: params.params[n] if n in params.params and alike(params.params[n], t) else t
            for n, t in whole.params.items()}
    return ship(dataclasses.replace(whole, params=same))


def _read(ref: SnapshotRef) -> Loaded:
    """Read through the storage; damage is local (see :mod:`trajscope.analysis.health`): a damaged
    snapshot comes back as its error, not raised."""
    try:
        return ref.storage.read_params(ref.step) if ref.params_only else ref.storage.read(ref.step)
    except RunFormatError as exc:
        return health.BadSnapshot(ref.step, str(exc))


# --- tensors on the way to the probe -------------------------------------------------------------


def _map_tensors(snap: Snapshot, fn: Callable[[Any], Any]) -> Snapshot:
    """``snap`` with ``fn`` applied to every tensor of its parameters, gradients, buffers and batch
    (RNG states stay as they are: torch's RNG API wants them on the CPU)."""
    import torch

    def walk(x: Any) -> Any:
        return tree_map(fn, x, leaf=torch.Tensor)

    return dataclasses.replace(snap, params=walk(snap.params), grads=walk(snap.grads),
                               buffers=walk(snap.buffers), batch=walk(snap.batch))


def _pinned(snap: Snapshot) -> Snapshot:
    """Page-locked copies, so that host→device copies are DMA transfers issued without blocking."""
    return _map_tensors(snap, lambda t: t.pin_memory())


def on_device(snap: Loaded | None, device: str) -> Loaded | None:
    """The snapshot's tensors on ``device`` (asynchronous from page-locked memory)."""
    if not isinstance(snap, Snapshot) or device == "cpu":
        return snap
    return _map_tensors(snap, lambda t: t.to(device, non_blocking=t.is_pinned()))


# --- wire form between processes -----------------------------------------------------------------


class ShippedSnapshot(Snapshot):
    """A :class:`Snapshot` that pickles its tensors as numpy arrays (one memcpy each way).

    Only its pickled form differs: in-process schedulers hand the object itself to the tasks.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {f.name: _to_wire(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return (_from_fields, (fields,))


def ship(snap: Snapshot) -> ShippedSnapshot:
    if isinstance(snap, ShippedSnapshot):
        return snap
    return ShippedSnapshot(**{f.name: getattr(snap, f.name) for f in dataclasses.fields(snap)})


def _from_fields(fields: dict[str, Any]) -> ShippedSnapshot:
    return ShippedSnapshot(**{k: _from_wire(v) for k, v in fields.items()})


class _Array:
    """Wire form of a CPU tensor: a numpy array plus what numpy cannot say (bf16, fp8)."""

    __slots__ = ("array", "dtype", "shape")

    def __init__(self, array: Any, dtype: str | None, shape: tuple[int, ...] | None) -> None:
        self.array, self.dtype, self.shape = array, dtype, shape

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Array, (self.array, self.dtype, self.shape))


def _to_wire(value: Any) -> Any:
    import torch

    def encode(tensor: torch.Tensor) -> _Array:
        t = tensor.detach().cpu().contiguous()
        try:
            return _Array(t.numpy(), None, None)
        except TypeError:  # no numpy dtype (bfloat16, float8): ship the raw bytes
            return _Array(t.reshape(-1).view(torch.uint8).numpy(), str(t.dtype), tuple(t.shape))

    return tree_map(encode, value, leaf=torch.Tensor)


def _from_wire(value: Any) -> Any:
    import torch

    def decode(a: _Array) -> torch.Tensor:
        t = torch.from_numpy(a.array)
        if a.dtype is not None and a.shape is not None:  # set together (see _to_wire)
            t = t.view(getattr(torch, a.dtype.removeprefix("torch."))).reshape(a.shape)
        return t

    return tree_map(decode, value, leaf=_Array)
