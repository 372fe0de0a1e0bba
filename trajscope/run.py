"""Reading a run directory: :func:`open_run` returns a :class:`Run` with lazy snapshot access.

The format is specified in ``docs/format.md`` (HDF5 storage: ``docs/format-hdf5.md``); names and
encodings live in :mod:`trajscope.format`. Reading never executes or unpickles anything from the run
directory (a recorded ``batch_fn`` is a *name*, imported from the analyzing user's environment
exactly like the objective).

Snapshots are stored either as one safetensors file per step or as rows of one HDF5 file. A small
storage layer (:class:`Storage`, one subclass per format) turns either into the same raw form,
``(metadata, {key: tensor})``, from which :class:`Snapshot` is built by one function; everything
above it (``Run``, ``read_snapshot``, the analyzer) does not know which format it reads. A step's
location is a path in both cases: the file, or ``trajectory.h5/step_00000012`` for an HDF5 row,
which :func:`read_snapshot` understands.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajscope import format as fmt
from trajscope.errors import ObjectiveError, RunFormatError, one_line
from trajscope.objective import import_named

__all__ = ["Run", "Snapshot", "Storage", "open_run", "read_snapshot", "read_raw"]


@dataclass(frozen=True)
class Snapshot:
    """Everything recorded about x_t (CPU tensors, stored dtype).

    ``grads``, ``batch``, ``loss`` and ``rng`` are empty/None for the final state, which holds only
    parameters and buffers.
    """

    step: int
    kind: str
    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    batch: Any = None
    loss: float | None = None
    lr: list[float] = field(default_factory=list)
    training: bool | None = None
    micro_weights: list[float] | None = None
    """Set when the step consumed several micro-batches (gradient accumulation, data-parallel
    ranks): ``batch`` is then the list of micro-batches and f(x; z_t) = Σ_i w_i · loss(x; batch[i])."""
    batch_indices: Any = None
    """The stored sample indices when the run was recorded with ``batch_fn`` (``batch`` is rebuilt)."""
    optimizer_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per-parameter optimizer state (``optimizer_state=True`` runs), as the update at t used it."""

    @property
    def has_grad(self) -> bool:
        return self.kind == fmt.KIND_STEP

    def loss_fn(self, loss: Callable[[torch.nn.Module, Any], torch.Tensor]
                ) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
        """The minibatch loss f(x; z_t) of this step, as a function ``(model, batch) -> scalar``.

        For an ordinary step it is the objective's ``loss`` itself. For a step made of several
        micro-batches it is Σ_i w_i · loss(model, batch[i]) with the recorded weights: the loss
        whose gradient the optimizer consumed (e.g. the mean of the micro-batch losses for
        ``(loss / k).backward()`` accumulation, or the average over ranks under DDP). The
        micro-batches are evaluated in order, so recorded dropout RNG replays as in training.
        """
        if self.micro_weights is None:
            return loss
        weights = list(self.micro_weights)

        def weighted(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            if not isinstance(batch, (list, tuple)) or len(batch) != len(weights):
                raise RunFormatError(
                    f"step {self.step}: expected {len(weights)} micro-batches, got "
                    f"{type(batch).__name__}"
                )
            total: torch.Tensor | None = None
            for w, mb in zip(weights, batch):
                term = loss(model, mb) * w
                total = term if total is None else total + term
            assert total is not None
            return total

        return weighted


class Run:
    """A recorded run. Cheap to open: snapshots are read only when asked for."""

    def __init__(self, path: Path, manifest: dict[str, Any], steps: list[int],
                 storage: Storage | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.storage = storage if storage is not None else SafetensorsStorage(path)
        self.steps = steps
        """Steps with a snapshot on disk (recorded steps, plus the final state), ascending."""

    # --- manifest views ---------------------------------------------------------------------------

    @property
    def status(self) -> str:
        return str(self.manifest.get("status"))

    @property
    def objective(self) -> str | None:
        return self.manifest.get("objective")

    @property
    def final_step(self) -> int | None:
        fs = self.manifest.get("final_step")
        return fs if isinstance(fs, int) and fs in self.steps else None

    @property
    def trainable(self) -> list[str]:
        """Names of the parameters the optimizer updates (the coordinates of x)."""
        return [p["name"] for p in self.manifest["params"] if p.get("trainable", True)]

    @property
    def num_params(self) -> int:
        n = 0
        for p in self.manifest["params"]:
            if p.get("trainable", True):
                k = 1
                for s in p["shape"]:
                    k *= int(s)
                n += k
        return n

    @property
    def pairs(self) -> list[int]:
        """Start steps t of the analyzable pairs (t, t+1): both snapshots on disk, t not final."""
        have = set(self.steps)
        fs = self.final_step
        return [t for t in self.steps if t + 1 in have and t != fs]

    @cached_property
    def scalars(self) -> list[dict[str, Any]]:
        """The lines of ``scalars.jsonl`` (every optimizer step, recorded or not).

        A crash mid-write leaves at most the last line torn; that line is dropped. Any other line
        that is not a JSON object with an integer ``step`` raises.

        Raises:
            RunFormatError: naming the file and line.
        """
        path = self.path / fmt.SCALARS
        if not path.exists() and not path.is_symlink():
            return []
        return _read_scalars(path)

    def kind(self, step: int) -> str:
        return fmt.KIND_FINAL if step == self.final_step else fmt.KIND_STEP

    def step_path(self, step: int) -> Path:
        """Where the snapshot of ``step`` lives: its file, or ``trajectory.h5/step_…`` for HDF5.

        Either way :func:`read_snapshot` reads it.
        """
        return self.storage.location(step)

    # --- snapshots -------------------------------------------------------------------------------

    def snapshot(self, step: int) -> Snapshot:
        """Load the snapshot of ``step`` (eagerly read: mmap is slow on network filesystems)."""
        if step not in self.steps:
            raise RunFormatError(
                f"{self.path}: step {step} is not recorded (recorded: {_ranges(self.steps)})"
            )
        return _snapshot_from_raw(*self.storage.read_raw(step), where=self.step_path(step))

    def __iter__(self) -> Iterator[int]:
        return iter(self.steps)

    def __repr__(self) -> str:
        return (
            f"<trajscope.Run {str(self.path)!r} status={self.status} "
            f"steps={_ranges(self.steps)} pairs={len(self.pairs)}>"
        )

    def describe(self) -> str:
        """A readable multi-line summary (what ``trajscope info`` prints)."""
        m = self.manifest
        opt = m.get("optimizer", {})
        groups = opt.get("param_groups", [])
        hyper = ", ".join(
            f"{k}={v}" for k, v in (groups[0].items() if groups else []) if k != "params"
        )
        sched = m.get("schedule", {})
        n_disk = self.storage.disk_bytes()
        lines = [
            f"run        {self.path}",
            f"status     {self.status}  (format_version {m.get('format_version')}, "
            f"trajscope {m.get('trajscope_version')}, torch {m.get('libraries', {}).get('torch')})",
            f"objective  {self.objective or '(none recorded; pass --objective)'}",
            f"optimizer  {opt.get('class', '?')} ({len(groups)} group(s)): {hyper}",
            f"params     {len(m['params'])} tensors, {self.num_params:,} trainable values",
            f"schedule   {sched}",
            f"storage    {self.storage.kind}",
            f"steps      {m.get('num_steps')} optimizer steps, {len(self.steps)} snapshots "
            f"({_ranges(self.steps)}), {n_disk / 1e6:.1f} MB",
            f"pairs      {len(self.pairs)} analyzable (t, t+1)",
            f"final      {self.final_step if self.final_step is not None else '(none: run incomplete)'}",
        ]
        skipped = sum(1 for s in self.scalars if s.get("skipped"))
        if skipped:
            lines.append(f"skipped    {skipped} step(s) skipped by the optimizer (AMP)")
        if (self.path / fmt.ANALYSIS_DIR / "metrics.nc").exists():
            lines.append(f"analysis   {self.path / fmt.ANALYSIS_DIR / 'metrics.nc'}")
        return "\n".join(one_line(line) for line in lines)  # values from the run: no escapes


def read_snapshot(path: str | Path) -> Snapshot:
    """Read one snapshot: a safetensors step file, or an HDF5 row named ``trajectory.h5/step_…``.

    Raises:
        RunFormatError: if the snapshot is missing or damaged, its metadata malformed, a tensor
            name unusable, or the step it holds differs from the step in its file name.
    """
    p = Path(path)
    return _snapshot_from_raw(*read_raw(p), where=p)


def read_raw(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The stored form of one snapshot, whatever the format: (metadata, {key: CPU tensor}).

    Keys are the format's (``param/NAME``, ``grad/NAME``, ``buffer/NAME``, ``batch/I``,
    ``rng/…``, ``optim/NAME/KEY``); the metadata is the ``trajscope`` JSON object. This is what
    ``trajscope convert`` copies between formats.
    """
    p = Path(path)
    step = fmt.parse_step_name(p.name)
    if step is not None and p.parent.suffix == ".h5" and not p.exists():
        return _read_hdf5_raw(p.parent, step)
    return _read_safetensors_raw(p)


def _read_safetensors_raw(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read one snapshot file, checking its header before handing the bytes to safetensors."""
    import safetensors.torch

    header = fmt.read_safetensors_header(path)
    meta = _snapshot_meta(header, path)
    try:
        # Eager read of a regular file: mmap-based loading is slow on network filesystems.
        tensors = safetensors.torch.load(fmt.read_file_bytes(path, "snapshot"))
    except RunFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged buffers
        raise RunFormatError(f"{path}: damaged safetensors file ({exc})") from exc
    return meta, tensors


# --- HDF5 rows ---------------------------------------------------------------------------------------

_H5_INT_VIEW = {"float16": np.int16, "bfloat16": np.int16, "bool": np.uint8,
                "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}


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
    if not hasattr(torch, dtype) or dtype not in fmt.SAFETENSORS_DTYPES:
        raise RunFormatError(f"{where}: unknown dtype {dtype!r}")
    view = _H5_INT_VIEW.get(dtype)
    if view is not None:
        arr = arr.view(view)
    # (np.ascontiguousarray would turn a 0-d array into shape (1,))
    t = torch.from_numpy(arr if arr.flags.c_contiguous else arr.copy(order="C"))
    return t.view(getattr(torch, dtype)) if t.dtype != getattr(torch, dtype) else t


def _read_hdf5_raw(h5path: Path, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
        blob = np.asarray(f["blob"][b0 : b0 + bl]) if bl else np.empty(0, np.uint8)
        for key, spec in layout.get("blob", {}).items():
            try:
                dtype, shape, off, nb = spec
                raw = blob[off : off + nb]
                if len(raw) != nb:
                    raise ValueError("outside the row's blob")
                view = np.dtype(_H5_INT_VIEW.get(dtype, dtype))
                arr = raw.copy().view(view).reshape(shape) if nb else np.empty(shape, view)
            except (TypeError, ValueError) as exc:
                raise RunFormatError(f"{where}: blob entry {key!r} is malformed ({exc})") from exc
            tensors[key] = _h5_tensor(arr, dtype, f"{where}: {key}")
    return meta, tensors


# --- storages --------------------------------------------------------------------------------------


class Storage(abc.ABC):
    """How a run's snapshots are stored. Subclasses: one per format."""

    kind = ""

    def __init__(self, run_path: Path) -> None:
        self.run_path = run_path

    @abc.abstractmethod
    def steps(self) -> list[int]:
        """Steps with a complete snapshot, ascending."""

    @abc.abstractmethod
    def location(self, step: int) -> Path:
        """Where the snapshot of ``step`` is (a file, or a pseudo-path inside a container)."""

    def read_raw(self, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return read_raw(self.location(step))

    def read(self, step: int) -> Snapshot:
        """The whole snapshot of ``step``. Raises :class:`RunFormatError` if it is damaged."""
        return _snapshot_from_raw(*self.read_raw(step), where=self.location(step))

    def read_params(self, step: int) -> Snapshot:
        """The snapshot of ``step`` with its parameters only (x_0, x*): formats that can read
        part of a snapshot do so. Raises :class:`RunFormatError` if it is damaged."""
        full = self.read(step)
        return Snapshot(step=full.step, kind=full.kind, params=full.params)

    @abc.abstractmethod
    def stat(self, step: int) -> tuple[int, int]:
        """(mtime in ns, size in bytes) of what holds the snapshot of ``step``, or (-1, -1) if it
        is missing. Made without reading the snapshot; :meth:`unchanged` compares two."""

    def unchanged(self, then: tuple[int, int], now: tuple[int, int]) -> bool:
        """Whether a snapshot stat'ed as ``then`` and later as ``now`` still holds the same data."""
        return then == now

    @abc.abstractmethod
    def disk_bytes(self) -> int:
        """Bytes the snapshots occupy on disk."""


class SafetensorsStorage(Storage):
    """``steps/step_XXXXXXXX.safetensors``, one file per snapshot (renamed into place: complete)."""

    kind = fmt.STORAGE_SAFETENSORS

    def steps(self) -> list[int]:
        d = self.run_path / fmt.STEPS_DIR
        if not d.is_dir():
            return []
        return sorted(s for s in (fmt.parse_step_filename(f.name) for f in d.iterdir()) if s is not None)

    def location(self, step: int) -> Path:
        return self.run_path / fmt.STEPS_DIR / fmt.step_filename(step)

    def stat(self, step: int) -> tuple[int, int]:
        return _stat(self.location(step))

    def read_params(self, step: int) -> Snapshot:
        """Only the ``param/…`` tensors are read (lazily, through the same checked header)."""
        from safetensors import safe_open

        p = self.location(step)
        meta = _snapshot_meta(fmt.read_safetensors_header(p), p)
        try:
            with safe_open(str(p), framework="pt") as fh:
                params = {fmt.check_name(k[len(fmt.PARAM):], f"{p}: tensor key param/…"): fh.get_tensor(k)
                          for k in fh.keys() if k.startswith(fmt.PARAM)}
        except RunFormatError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors for a damaged buffer
            raise RunFormatError(f"{p}: damaged safetensors file ({exc})") from exc
        return Snapshot(step=meta["step"], kind=str(meta.get("kind", fmt.KIND_STEP)), params=params)

    def disk_bytes(self) -> int:
        total = 0
        for s in self.steps():
            try:
                total += self.location(s).stat().st_size
            except OSError:
                pass
        return total


class HDF5Storage(Storage):
    """``trajectory.h5``: one row per snapshot (layout in ``docs/format-hdf5.md``)."""

    kind = fmt.STORAGE_HDF5

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

    def read_raw(self, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return _read_hdf5_raw(self.file, step)

    def stat(self, step: int) -> tuple[int, int]:
        return _stat(self.file)

    def unchanged(self, then: tuple[int, int], now: tuple[int, int]) -> bool:
        """A container that only grew: a live recording appended rows, and rows already written
        never change."""
        return then == now or (then[1] >= 0 and now[1] >= then[1])

    def disk_bytes(self) -> int:
        return self.file.stat().st_size if self.file.exists() else 0


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)  # missing: the reader reports it as a damaged snapshot
    return (st.st_mtime_ns, st.st_size)


STORAGES: dict[str, type[Storage]] = {
    fmt.STORAGE_SAFETENSORS: SafetensorsStorage,
    fmt.STORAGE_HDF5: HDF5Storage,
}


# --- raw → Snapshot ---------------------------------------------------------------------------------

_BATCH_FNS: dict[str, Callable[[Any], Any]] = {}


def _import_batch_fn(spec: str, where: Path) -> Callable[[Any], Any]:
    """Import a recorded ``batch_fn`` by name from the analyzing user's environment (the same
    rules as objectives: dotted identifiers only, never code inside a run directory)."""
    if spec not in _BATCH_FNS:
        obj = import_named(spec, f"batch_fn (recorded in {where})")
        if not callable(obj):
            raise ObjectiveError(f"batch_fn {spec!r}: not callable")
        _BATCH_FNS[spec] = obj
    return _BATCH_FNS[spec]


def _snapshot_from_raw(meta: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                       where: Path) -> Snapshot:
    """Build a :class:`Snapshot` from the stored form (the same for every format)."""
    _check_meta(meta, where)
    params: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    rng: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    leaves: dict[int, torch.Tensor] = {}
    for key, t in tensors.items():
        prefix, _, name = key.partition("/")
        if prefix in ("param", "grad", "buffer", "rng", "optim"):
            fmt.check_name(name, f"{where}: tensor key {prefix}/…")
        if prefix == "param":
            params[name] = t
        elif prefix == "grad":
            grads[name] = t
        elif prefix == "buffer":
            buffers[name] = t
        elif prefix == "rng":
            rng[name] = t
        elif prefix == "optim":
            pname, _, skey = name.rpartition("/")
            optim.setdefault(pname, {})[skey] = t
        elif prefix == "batch" and name.isascii() and name.isdigit():
            leaves[int(name)] = t
    batch = None
    if "batch_tree" in meta:
        n = len(leaves)
        if sorted(leaves) != list(range(n)):
            raise RunFormatError(f"{where}: batch tensors are not numbered 0..{n - 1}")
        batch = fmt.unflatten_batch(meta["batch_tree"], [leaves[i] for i in range(n)],
                                    where=f"{where}: batch")
    micro = meta.get("micro_batches")
    weights = None
    if micro is not None:
        weights = micro.get("weights") if isinstance(micro, dict) else None
        if (not isinstance(weights, list) or not all(isinstance(w, (int, float)) for w in weights)
                or not isinstance(batch, list) or len(batch) != len(weights)):
            raise RunFormatError(
                f"{where}: 'micro_batches' must hold one weight per stored micro-batch"
            )
        weights = [float(w) for w in weights]
    indices = None
    if meta.get("batch_fn") and batch is not None:
        fn = _import_batch_fn(str(meta["batch_fn"]), where)
        indices = batch
        batch = [fn(ix) for ix in batch] if weights is not None else fn(batch)
    loss = meta.get("loss")
    return Snapshot(
        step=meta["step"],
        kind=meta.get("kind", fmt.KIND_STEP),
        params=params,
        grads=grads,
        buffers=buffers,
        rng=rng,
        batch=batch,
        loss=float(loss) if isinstance(loss, (int, float)) else None,
        lr=[float(x) for x in meta.get("lr", [])],
        training=meta.get("training"),
        micro_weights=weights,
        batch_indices=indices,
        optimizer_state=optim,
    )


def _snapshot_meta(header: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``trajscope`` metadata of a snapshot header, type-checked field by field."""
    raw = header.get("__metadata__", {}).get("trajscope")
    if raw is None:
        raise RunFormatError(f"{path}: not a trajscope snapshot (no 'trajscope' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RunFormatError(f"{path}: snapshot metadata is not valid JSON ({exc.msg})") from exc
    except RecursionError:
        raise RunFormatError(f"{path}: snapshot metadata is nested too deeply") from None
    return _check_meta(meta, path)


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """Type-check a snapshot's ``trajscope`` metadata field by field (every storage format)."""
    if not isinstance(meta, dict):
        raise RunFormatError(f"{path}: snapshot metadata is not a JSON object")
    step = meta.get("step")
    if not _is_nonneg_int(step):
        raise RunFormatError(f"{path}: snapshot metadata lacks an integer 'step' (got {step!r:.40})")
    named = fmt.parse_step_filename(path.name)
    if named is not None and named != step:
        raise RunFormatError(
            f"{path}: file is named for step {named} but holds step {step}; refusing to mix up steps"
        )
    if meta.get("kind", fmt.KIND_STEP) not in (fmt.KIND_STEP, fmt.KIND_FINAL):
        raise RunFormatError(f"{path}: snapshot 'kind' must be 'step' or 'final'")
    lr = meta.get("lr", [])
    if not isinstance(lr, list) or not all(_is_number(x) for x in lr):
        raise RunFormatError(f"{path}: snapshot 'lr' must be a list of numbers")
    if not (meta.get("loss") is None or _is_number(meta["loss"])):
        raise RunFormatError(f"{path}: snapshot 'loss' must be a number or null")
    if not (meta.get("training") is None or isinstance(meta["training"], bool)):
        raise RunFormatError(f"{path}: snapshot 'training' must be true, false or null")
    return meta


def _is_nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _read_scalars(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    limit = fmt.MAX_SCALARS_LINE_BYTES
    with fmt.open_regular(path, "scalars") as fh:
        try:
            nxt = fh.readline(limit + 1)
            i = 0
            while nxt:
                raw, nxt = nxt, fh.readline(limit + 1)
                i += 1
                torn = not nxt  # only the last line can be torn by a crash mid-write
                if len(raw) > limit and not raw.endswith(b"\n"):
                    raise RunFormatError(f"{path}:{i}: line longer than {limit} bytes")
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                    if torn:
                        break
                    why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
                    raise RunFormatError(f"{path}:{i}: invalid JSON ({why})") from None
                if not isinstance(rec, dict) or not _is_nonneg_int(rec.get("step")):
                    if torn:
                        break
                    raise RunFormatError(f"{path}:{i}: expected an object with an integer 'step'")
                out.append(rec)
        except OSError as exc:
            raise RunFormatError(f"{path}: cannot read ({exc.strerror})") from exc
    return out


def open_run(path: str | Path) -> Run:
    """Open a run directory written by :class:`trajscope.Recorder`.

    Raises:
        RunFormatError: if ``path`` is not a readable run of a format version this code knows.
    """
    p = Path(path)
    if not p.exists():
        raise RunFormatError(f"{p}: no such directory")
    if not p.is_dir():
        raise RunFormatError(f"{p}: not a directory (expected a trajscope run directory)")
    mpath = p / fmt.MANIFEST
    if not mpath.exists() and not mpath.is_symlink():
        raise RunFormatError(f"{p}: not a trajscope run ({fmt.MANIFEST} is missing)")
    raw = fmt.read_bounded(mpath, fmt.MAX_MANIFEST_BYTES, "manifest")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFormatError(f"{mpath}: invalid JSON ({exc})") from exc
    except RecursionError:
        raise RunFormatError(f"{mpath}: invalid JSON (nested too deeply)") from None
    validate_manifest(manifest, mpath)
    kind = manifest.get("storage") or fmt.STORAGE_SAFETENSORS
    if kind not in STORAGES:
        raise RunFormatError(
            f"{mpath}: storage {kind!r} is not one this trajscope reads ({', '.join(STORAGES)})"
        )
    storage = STORAGES[kind](p)
    try:
        steps = storage.steps()
    except OSError as exc:
        raise RunFormatError(f"{p}: cannot list snapshots ({exc.strerror})") from exc
    return Run(p, manifest, steps, storage)


_STATUSES = (fmt.STATUS_RECORDING, fmt.STATUS_COMPLETE, fmt.STATUS_CRASHED)


def validate_manifest(manifest: Any, mpath: Path) -> None:
    """Check the structure and types of a parsed manifest, so nothing downstream trips on it.

    Raises:
        RunFormatError: naming the manifest and the first field that is missing or malformed.
    """
    if not isinstance(manifest, dict):
        raise RunFormatError(f"{mpath}: expected a JSON object")
    version = manifest.get("format_version")
    if not _is_nonneg_int(version) or version < 1:
        raise RunFormatError(f"{mpath}: 'format_version' missing or not a positive integer")
    if version > fmt.FORMAT_VERSION:
        raise RunFormatError(
            f"{mpath}: format_version {version} is newer than this trajscope understands "
            f"({fmt.FORMAT_VERSION}); upgrade trajscope"
        )
    for key in ("params", "buffers"):
        entries = manifest.get(key, [] if key == "buffers" else None)
        if not isinstance(entries, list):
            raise RunFormatError(f"{mpath}: '{key}' must be a list of {{name, shape, dtype}} objects")
        seen: set[str] = set()
        for i, q in enumerate(entries):
            where = f"{mpath}: {key}[{i}]"
            if not isinstance(q, dict):
                raise RunFormatError(f"{where}: expected a {{name, shape, dtype}} object")
            name = fmt.check_name(q.get("name"), f"{where}.name")
            if name in seen:
                raise RunFormatError(f"{where}: duplicate name {name!r}")
            seen.add(name)
            shape = q.get("shape")
            if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
                raise RunFormatError(f"{where} ({name!r}): 'shape' must be a list of non-negative integers")
            if not isinstance(q.get("dtype", ""), str):
                raise RunFormatError(f"{where} ({name!r}): 'dtype' must be a string")
            if not isinstance(q.get("trainable", True), bool):
                raise RunFormatError(f"{where} ({name!r}): 'trainable' must be true or false")
    if manifest.get("status") not in _STATUSES:
        raise RunFormatError(f"{mpath}: 'status' must be one of {', '.join(_STATUSES)}")
    for key in ("final_step", "num_steps"):
        v = manifest.get(key)
        if not (v is None or _is_nonneg_int(v)):
            raise RunFormatError(f"{mpath}: '{key}' must be a non-negative integer or null")
    for key in ("objective", "trajscope_version", "storage", "created"):
        v = manifest.get(key)
        if not (v is None or isinstance(v, str)):
            raise RunFormatError(f"{mpath}: '{key}' must be a string or null")
    for key in ("libraries", "schedule", "optimizer"):
        if not isinstance(manifest.get(key, {}), dict):
            raise RunFormatError(f"{mpath}: '{key}' must be an object")
    groups = manifest.get("optimizer", {}).get("param_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise RunFormatError(f"{mpath}: 'optimizer.param_groups' must be a list of objects")


def _ranges(steps: list[int]) -> str:
    """Compact '0-9, 20-21' rendering of a sorted step list."""
    if not steps:
        return "none"
    parts = []
    start = prev = steps[0]
    for s in steps[1:] + [None]:  # type: ignore[list-item]
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(parts if len(parts) <= 6 else parts[:3] + ["…"] + parts[-2:])
