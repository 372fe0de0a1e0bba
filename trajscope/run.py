"""Reading a run directory: :func:`open_run` returns a :class:`Run` with lazy snapshot access.

The format is specified in ``docs/format.md``; names and encodings live in
:mod:`trajscope.format`. Reading never executes or unpickles anything from the run directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from trajscope import format as fmt
from trajscope.errors import RunFormatError

__all__ = ["Run", "Snapshot", "open_run"]


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

    @property
    def has_grad(self) -> bool:
        return self.kind == fmt.KIND_STEP


class Run:
    """A recorded run. Cheap to open: snapshots are read only when asked for."""

    def __init__(self, path: Path, manifest: dict[str, Any], steps: list[int]) -> None:
        self.path = path
        self.manifest = manifest
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
        return self.path / fmt.STEPS_DIR / fmt.step_filename(step)

    # --- snapshots -------------------------------------------------------------------------------

    def snapshot(self, step: int) -> Snapshot:
        """Load the snapshot of ``step`` (eagerly read: mmap is slow on network filesystems)."""
        if step not in self.steps:
            raise RunFormatError(
                f"{self.path}: step {step} is not recorded (recorded: {_ranges(self.steps)})"
            )
        return read_snapshot(self.step_path(step))

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
        n_disk = sum(self.step_path(s).stat().st_size for s in self.steps)
        lines = [
            f"run        {self.path}",
            f"status     {self.status}  (format_version {m.get('format_version')}, "
            f"trajscope {m.get('trajscope_version')}, torch {m.get('libraries', {}).get('torch')})",
            f"objective  {self.objective or '(none recorded; pass --objective)'}",
            f"optimizer  {opt.get('class', '?')} ({len(groups)} group(s)): {hyper}",
            f"params     {len(m['params'])} tensors, {self.num_params:,} trainable values",
            f"schedule   {sched}",
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


def read_snapshot(path: Path) -> Snapshot:
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
        tensors = safetensors.torch.load(path.read_bytes())
    except Exception as exc:  # safetensors raises its own error types for damaged buffers
        raise RunFormatError(f"{path}: damaged safetensors file ({exc})") from exc
    params: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    rng: dict[str, torch.Tensor] = {}
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
        elif prefix == "batch" and name.isdigit():
            leaves[int(name)] = t
    batch = None
    if "batch_tree" in meta:
        n = len(leaves)
        if sorted(leaves) != list(range(n)):
            raise RunFormatError(f"{path}: batch tensors are not numbered 0..{n - 1}")
        batch = fmt.unflatten_batch(meta["batch_tree"], [leaves[i] for i in range(n)],
                                    where=f"{path}: batch")
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
    steps_dir = p / fmt.STEPS_DIR
    steps = sorted(
        s for s in (fmt.parse_step_filename(f.name) for f in steps_dir.iterdir()) if s is not None
    ) if steps_dir.is_dir() else []
    return Run(p, manifest, steps)


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
