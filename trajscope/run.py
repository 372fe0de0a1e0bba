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

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajscope import format as fmt
from trajscope.errors import ObjectiveError, RunFormatError

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
        """The lines of ``scalars.jsonl`` (every optimizer step, recorded or not)."""
        path = self.path / fmt.SCALARS
        if not path.exists():
            return []
        out = []
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if i == len(lines) - 1:  # a crash mid-write leaves at most the last line torn
                    break
                raise RunFormatError(f"{path}:{i + 1}: invalid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise RunFormatError(f"{path}:{i + 1}: expected an object with an integer 'step'")
            out.append(rec)
        return out

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
        return "\n".join(lines)


def read_snapshot(path: str | Path) -> Snapshot:
    """Read one snapshot: a safetensors step file, or an HDF5 row named ``trajectory.h5/step_…``.

    Raises:
        RunFormatError: if the snapshot is missing, damaged, or its metadata is malformed.
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
    raw_meta = header.get("__metadata__", {})
    try:
        meta = json.loads(raw_meta.get("trajscope", "{}")) if isinstance(raw_meta, dict) else {}
    except json.JSONDecodeError as exc:
        raise RunFormatError(f"{path}: snapshot metadata is not valid JSON ({exc.msg})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise RunFormatError(f"{path}: snapshot metadata lacks an integer 'step'")
    try:
        # Eager read: mmap-based loading is slow on network filesystems.
        tensors = safetensors.torch.load(path.read_bytes())
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


class Storage:
    """How a run's snapshots are stored. Subclasses: one per format."""

    kind = ""

    def __init__(self, run_path: Path) -> None:
        self.run_path = run_path

    def steps(self) -> list[int]:
        """Steps with a complete snapshot, ascending."""
        raise NotImplementedError

    def location(self, step: int) -> Path:
        raise NotImplementedError

    def read_raw(self, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return read_raw(self.location(step))

    def disk_bytes(self) -> int:
        raise NotImplementedError


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

    def disk_bytes(self) -> int:
        return self.file.stat().st_size if self.file.exists() else 0


STORAGES: dict[str, type[Storage]] = {
    fmt.STORAGE_SAFETENSORS: SafetensorsStorage,
    fmt.STORAGE_HDF5: HDF5Storage,
}


# --- raw → Snapshot ---------------------------------------------------------------------------------

_BATCH_FNS: dict[str, Callable[[Any], Any]] = {}


def _import_batch_fn(spec: str, where: Path) -> Callable[[Any], Any]:
    """Import a recorded ``batch_fn`` by name from the analyzing user's environment (cwd first)."""
    if spec in _BATCH_FNS:
        return _BATCH_FNS[spec]
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise RunFormatError(f"{where}: batch_fn {spec!r} is not 'module:function'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ObjectiveError(
            f"batch_fn {spec!r} (recorded in {where}): cannot import module {mod_name!r} ({exc}); "
            "run from the directory that holds it"
        ) from exc
    for part in fn_name.split("."):
        if not hasattr(obj, part):
            raise ObjectiveError(f"batch_fn {spec!r}: module {mod_name!r} has no attribute {fn_name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ObjectiveError(f"batch_fn {spec!r}: not callable")
    _BATCH_FNS[spec] = obj
    return obj


def _snapshot_from_raw(meta: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                       where: Path) -> Snapshot:
    """Build a :class:`Snapshot` from the stored form (the same for every format)."""
    if not isinstance(meta.get("step"), int):
        raise RunFormatError(f"{where}: snapshot metadata lacks an integer 'step'")
    params: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    rng: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    leaves: dict[int, torch.Tensor] = {}
    for key, t in tensors.items():
        prefix, _, name = key.partition("/")
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
        elif prefix == "batch" and name.isdigit():
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
        kind=str(meta.get("kind", fmt.KIND_STEP)),
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
    if not mpath.exists():
        raise RunFormatError(f"{p}: not a trajscope run ({fmt.MANIFEST} is missing)")
    if mpath.stat().st_size > fmt.MAX_MANIFEST_BYTES:
        raise RunFormatError(f"{mpath}: manifest larger than {fmt.MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFormatError(f"{mpath}: invalid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise RunFormatError(f"{mpath}: expected a JSON object")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise RunFormatError(f"{mpath}: 'format_version' missing or not an integer")
    if version > fmt.FORMAT_VERSION:
        raise RunFormatError(
            f"{mpath}: format_version {version} is newer than this trajscope understands "
            f"({fmt.FORMAT_VERSION}); upgrade trajscope"
        )
    params = manifest.get("params")
    if not isinstance(params, list) or not all(
        isinstance(q, dict) and isinstance(q.get("name"), str) and isinstance(q.get("shape"), list)
        for q in params
    ):
        raise RunFormatError(f"{mpath}: 'params' must be a list of {{name, shape, dtype}} objects")
    kind = manifest.get("storage", fmt.STORAGE_SAFETENSORS)
    if kind not in STORAGES:
        raise RunFormatError(
            f"{mpath}: storage {kind!r} is not one this trajscope reads ({', '.join(STORAGES)})"
        )
    storage = STORAGES[kind](p)
    return Run(p, manifest, storage.steps(), storage)


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
