"""Reading a run directory: :func:`open_run` returns a :class:`Run` with lazy snapshot access.

The format is specified in ``docs/format.md`` (HDF5 storage: ``docs/format-hdf5.md``); names and
encodings live in :mod:`trajscope.runformat`. Reading never executes or unpickles anything from the run
directory (a recorded ``batch_fn`` is a *name*, imported from the analyzing user's environment
exactly like the objective).

Snapshots are stored either as one safetensors file per step or as rows of one HDF5 file. The
storage readers (:mod:`trajscope.store.storage`: :class:`Storage`, one subclass per format)
turn either into the same raw form, ``(metadata, {key: tensor})``, from which :class:`Snapshot` is
built by one function (:func:`trajscope.store.snapshot.snapshot_from_raw`); everything
above it (``Run``, ``read_snapshot``, the analyzer) does not know which format it reads. A step's
location is a path in both cases: the file, or ``trajectory.h5/step_00000012`` for an HDF5 row,
which :func:`read_snapshot` understands.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from trajscope import runformat as fmt
from trajscope.errors import RunFormatError, one_line
from trajscope.store.safetensors import SafetensorsStorage
from trajscope.store.snapshot import Snapshot, is_nonneg_int, snapshot_from_raw
from trajscope.store.storage import STORAGES, Storage, read_raw

__all__ = ["Run", "open_run", "read_snapshot", "step_ranges", "validate_manifest"]


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
    def metadata(self) -> dict[str, Any]:
        """The user metadata given as ``Recorder(..., metadata={...})`` (empty if none)."""
        meta = self.manifest.get("metadata")
        return meta if isinstance(meta, dict) else {}

    @property
    def final_step(self) -> int | None:
        fs = self.manifest.get("final_step")
        return fs if isinstance(fs, int) and fs in self.steps else None

    @property
    def trainable(self) -> list[str]:
        """Names of the parameters the optimizer updated when recording started: the coordinates of
        x, except at a step that records its own set (:attr:`Snapshot.trainable`)."""
        return [p["name"] for p in self.manifest["params"] if p.get("trainable", True)]

    @property
    def grads_recorded(self) -> bool:
        """Whether the step snapshots store g_t: False for a run recorded with ``grads=False``
        (manifest ``"grads": false``), whose snapshots name the parameters with a gradient only."""
        return self.manifest.get("grads", True) is not False

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
    def pruned(self) -> frozenset[int]:
        """Steps whose snapshot file ``analyze --prune`` removed after every pair reading it was
        analyzed (``pruned.json``) and that are not on disk: their pairs exist only as persisted
        results.

        Raises:
            RunFormatError: ``pruned.json`` is not ``{"steps": [non-negative ints]}``.
        """
        path = self.path / fmt.PRUNED
        if not path.exists() and not path.is_symlink():
            return frozenset()
        raw = fmt.read_bounded(path, fmt.MAX_MANIFEST_BYTES, "pruned-steps list")
        try:
            steps = json.loads(raw.decode("utf-8")).get("steps")
        except (ValueError, AttributeError, RecursionError):
            steps = None
        if not isinstance(steps, list) or not all(is_nonneg_int(s) for s in steps):
            raise RunFormatError(f'{path}: expected {{"steps": [step, ...]}}')
        return frozenset(steps) - set(self.steps)

    @property
    def pruned_pairs(self) -> list[int]:
        """Start steps of the pairs that read a pruned snapshot (:attr:`pruned`)."""
        gone = self.pruned
        have, fs = set(self.steps) | gone, self.final_step
        return sorted(t for t in have if t + 1 in have and t != fs and (t in gone or t + 1 in gone))

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

    @cached_property
    def identity(self) -> str:
        """What tells this recording from another one in the same directory: 16 hex digits of the
        SHA-256 of the manifest without what the recorder rewrites while it records (its status,
        error, step counts, ``created``, which is the time of the latest write, and the optimizer
        groups' hyperparameters, which a schedule changes), so that a run growing into its final
        state keeps it. A run recorded anew with other settings, model or metadata gets another;
        one recorded anew with the same is told apart by its snapshots (:meth:`identities`)."""
        kept = {k: v for k, v in self.manifest.items() if k not in _WRITTEN_WHILE_RECORDING}
        optimizer = kept.get("optimizer")
        if isinstance(optimizer, dict):
            groups = optimizer.get("param_groups")
            kept["optimizer"] = {**optimizer, "param_groups": [
                g.get("params") for g in groups if isinstance(g, dict)] if isinstance(groups, list) else groups}
        blob = json.dumps(kept, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def identities(self, steps: Iterable[int]) -> dict[int, str | None]:
        """Step → a cheap identity of its snapshot, made without reading its tensors; None where
        it cannot be read (missing, truncated, unreadable).

        A step file (safetensors): its size, mtime (ns) and the SHA-256 of its header (tensor
        names, dtypes, offsets and the step's metadata: kind, lr, loss). Replacing, rewriting or
        recording the file anew gives it a new mtime; hashing every byte would cost a read of the
        whole snapshot (about 70 ms per 100 MB, where this costs about 50 µs). The inode is left
        out: a run copied or moved with its mtimes (``cp -a``, ``rsync -a``, ``shutil.copytree``)
        holds the same bytes and keeps its persisted pairs.
        An HDF5 row: the file's stat changes whenever a row is appended, so a row is identified
        by its row number and the SHA-256 of its index entries, its metadata (kind, lr, loss),
        the first and last bytes of its blob region (minibatch, RNG state) and its row of the
        smallest parameter dataset.
        """
        return self.storage.identities(sorted(set(steps)))

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
                f"{self.path}: step {step} is not recorded (recorded: {step_ranges(self.steps)})"
            )
        return snapshot_from_raw(*self.storage.read_raw(step), where=self.step_path(step))

    def __iter__(self) -> Iterator[int]:
        return iter(self.steps)

    def __repr__(self) -> str:
        return (
            f"<trajscope.Run {str(self.path)!r} status={self.status} "
            f"steps={step_ranges(self.steps)} pairs={len(self.pairs)}>"
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
        ]
        sharded = _sharding_line(m)
        if sharded is not None:
            lines.append(sharded)
        if not self.grads_recorded:
            lines.append("gradients  not stored (grads=False): the analysis recomputes g_t as c·G0; metrics "
                         "of g_{t+1}, g_{t-1} and grad_replay_error are NaN")
        lines += [
            f"steps      {m.get('num_steps')} optimizer steps, {len(self.steps)} snapshots "
            f"({step_ranges(self.steps)}), {n_disk / 1e6:.1f} MB",
            f"pairs      {len(self.pairs)} analyzable (t, t+1)"
            + (f", {len(self.pruned_pairs)} analyzed and pruned ({fmt.PRUNED})" if self.pruned else ""),
            f"final      {self.final_step if self.final_step is not None else '(none: run incomplete)'}",
        ]
        rows, bad = self._scalars_lenient()
        if bad:  # `info` describes a damaged run rather than refusing it, as `analyze` goes on
            lines.append(f"scalars    {len(bad)} unreadable line(s) ignored; first: {bad[0]}")
        skipped = sum(1 for s in rows if s.get("skipped"))
        if skipped:
            lines.append(f"skipped    {skipped} step(s) skipped by the optimizer (AMP)")
        if (self.path / fmt.ANALYSIS_DIR / fmt.METRICS_FILE).exists():
            lines.append(f"analysis   {self.path / fmt.ANALYSIS_DIR / fmt.METRICS_FILE}")
        note = self.incomplete_note()
        if note is not None:
            lines.append(note)
        return "\n".join(one_line(line) for line in lines)  # values from the run: no escapes

    def incomplete_note(self) -> str | None:
        """One line saying that and how the run is incomplete, None when its status is
        ``complete``: ``run is incomplete: status recording (the recorder is gone: crashed or
        killed), last recorded step 41, no final state``. Whether the recorder of a ``recording``
        run lives is asked of its recording lock (:func:`trajscope.runformat.recorder_alive`),
        so a live recording is told from a dead one."""
        if self.status == fmt.STATUS_COMPLETE:
            return None
        if self.status == fmt.STATUS_RECORDING:
            alive = fmt.recorder_alive(self.path)
            why = ("the recorder is alive" if alive else "the recorder is gone: crashed or killed"
                   if alive is False else "no recording lock tells whether the recorder is alive")
        else:  # crashed: a write failed (the manifest's error says which), or the loop raised
            error = self.manifest.get("error")
            why = (f"recording stopped: {one_line(error, 300)}" if isinstance(error, str) and error
                   else "the training loop raised an exception")
        last = f"last recorded step {self.steps[-1]}" if self.steps else "no step recorded"
        final = "no final state" if self.final_step is None else f"final state at step {self.final_step}"
        return f"run is incomplete: status {self.status} ({why}), {last}, {final}"


    def _scalars_lenient(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The readable lines of ``scalars.jsonl`` and a message per line (or for the whole
        file) that could not be read."""
        path = self.path / fmt.SCALARS
        if not path.exists() and not path.is_symlink():
            return [], []
        bad: list[str] = []
        try:
            return _read_scalars(path, bad), bad
        except RunFormatError as exc:  # the file as a whole: a FIFO, an over-long line
            return [], [str(exc)]


def _sharding_line(m: dict[str, Any]) -> str | None:
    """``sharded    fsdp2, parts from ranks 0, 1 of 2 (mesh 2)`` for a run trained sharded (the
    manifest's ``distributed.sharding``), None for any other; the fields are shown as recorded."""
    dist = m.get("distributed")
    if not isinstance(dist, dict) or not dist.get("sharding"):
        return None
    ranks = dist.get("shard_ranks")
    mesh = dist.get("mesh")
    shape, names = (mesh.get("shape"), mesh.get("dim_names")) if isinstance(mesh, dict) else (None, None)
    line = (f"sharded    {dist['sharding']}, parts from ranks "
            f"{', '.join(map(str, ranks)) if isinstance(ranks, list) else '?'} of {dist.get('world_size', '?')}")
    if isinstance(shape, list):
        line += f" (mesh {'x'.join(map(str, shape))}" + (f": {', '.join(map(str, names))})"
                                                        if isinstance(names, list) else ")")
    policy = dist.get("mixed_precision")
    if isinstance(policy, dict) and policy:
        line += ", mixed precision " + ", ".join(f"{k} {v}" for k, v in policy.items())
    version = m.get("format_version")
    if isinstance(version, int) and version < fmt.SHARDED_FORMAT_VERSION:
        line += "; snapshots stored whole (converted)"
    return line


def read_snapshot(path: str | Path) -> Snapshot:
    """Read one snapshot: a safetensors step file (a sharded one with its parts, which lie in the
    run's ``shards/``), or an HDF5 row named ``trajectory.h5/step_…``.

    Raises:
        RunFormatError: if the snapshot is missing or damaged, its metadata malformed, a tensor
            name unusable, or the step it holds differs from the step in its file name.
    """
    p = Path(path)
    return snapshot_from_raw(*read_raw(p), where=p)


def _read_scalars(path: Path, bad: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of ``scalars.jsonl``, dropping a torn last line. A bad line raises, or with
    ``bad`` given is skipped and its message appended there."""
    out: list[dict[str, Any]] = []

    def reject(message: str) -> None:
        if bad is None:
            raise RunFormatError(message)
        bad.append(message)

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
                except (ValueError, RecursionError) as exc:  # also an int of too many digits
                    if torn:
                        break
                    why = (exc.msg if isinstance(exc, json.JSONDecodeError)
                           else one_line(exc, 200) if type(exc) is ValueError else type(exc).__name__)
                    reject(f"{path}:{i}: invalid JSON ({why})")
                    continue
                if not isinstance(rec, dict) or not is_nonneg_int(rec.get("step")):
                    if torn:
                        break
                    reject(f"{path}:{i}: expected an object with an integer 'step'")
                    continue
                out.append(_decode_nonfinite(rec))
        except OSError as exc:
            raise RunFormatError(f"{path}: cannot read ({exc.strerror})") from exc
    return out


_NONFINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _decode_nonfinite(rec: dict[str, Any]) -> dict[str, Any]:
    """Read a non-finite number written as the string ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"`` (strict JSON has no such numbers) in a value or a list of values; the bare
    ``NaN``/``Infinity`` tokens of older files are parsed by ``json`` itself."""

    def num(v: Any) -> Any:
        return _NONFINITE.get(v, v) if isinstance(v, str) else v

    return {k: [num(x) for x in v] if isinstance(v, list) else num(v) for k, v in rec.items()}


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
    except ValueError as exc:  # an integer of more digits than Python converts (sys.int_info)
        raise RunFormatError(f"{mpath}: invalid manifest ({exc})") from None
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
    if not isinstance(version, int) or not is_nonneg_int(version) or version < 1:
        raise RunFormatError(f"{mpath}: 'format_version' missing or not a positive integer")
    if version > fmt.SHARDED_FORMAT_VERSION:
        raise RunFormatError(
            f"{mpath}: format_version {version} is newer than this trajscope understands "
            f"({fmt.SHARDED_FORMAT_VERSION}); upgrade trajscope"
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
            if not isinstance(shape, list) or not all(is_nonneg_int(d) for d in shape):
                raise RunFormatError(f"{where} ({name!r}): 'shape' must be a list of non-negative integers")
            if not isinstance(q.get("dtype", ""), str):
                raise RunFormatError(f"{where} ({name!r}): 'dtype' must be a string")
            if not isinstance(q.get("trainable", True), bool):
                raise RunFormatError(f"{where} ({name!r}): 'trainable' must be true or false")
    if manifest.get("status") not in _STATUSES:
        raise RunFormatError(f"{mpath}: 'status' must be one of {', '.join(_STATUSES)}")
    for key in ("final_step", "num_steps"):
        v = manifest.get(key)
        if not (v is None or is_nonneg_int(v)):
            raise RunFormatError(f"{mpath}: '{key}' must be a non-negative integer or null")
    for key in ("objective", "trajscope_version", "storage", "created"):
        v = manifest.get(key)
        if not (v is None or isinstance(v, str)):
            raise RunFormatError(f"{mpath}: '{key}' must be a string or null")
    if not isinstance(manifest.get("grads", True), bool):
        raise RunFormatError(f"{mpath}: 'grads' must be true or false")
    for key in ("libraries", "schedule", "optimizer"):
        if not isinstance(manifest.get(key, {}), dict):
            raise RunFormatError(f"{mpath}: '{key}' must be an object")
    groups = manifest.get("optimizer", {}).get("param_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise RunFormatError(f"{mpath}: 'optimizer.param_groups' must be a list of objects")


_WRITTEN_WHILE_RECORDING = frozenset({"status", "error", "num_steps", "final_step", "created"})
"""Manifest fields the recorder rewrites as the run goes on: left out of :attr:`Run.identity`."""


def step_ranges(steps: list[int]) -> str:
    """Compact '0-9, 20-21' rendering of a sorted step list."""
    if not steps:
        return "none"
    parts = []
    start = prev = steps[0]
    for s in [*steps[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(parts if len(parts) <= 6 else parts[:3] + ["…"] + parts[-2:])
