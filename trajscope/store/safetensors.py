"""The safetensors storage, read: ``steps/step_XXXXXXXX.safetensors``, one file per snapshot (with
its parts in ``shards/`` for a sharded run: :mod:`trajscope.store.shards`).

Layout and header rules: ``docs/format.md``. The reader checks the header itself before handing the
bytes to the safetensors library, which validates the rest. The writer is
:class:`trajscope.recorders.backends.safetensors.SafetensorsWriter`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from trajscope import runformat as fmt
from trajscope.errors import RunFormatError
from trajscope.store import shards
from trajscope.store.snapshot import Snapshot, check_meta
from trajscope.store.storage import FormatStorage, Raw, register, stat_path

__all__ = ["SafetensorsStorage", "file_identity", "header_meta", "read_file"]


def header_meta(header: dict[str, Any], path: Path) -> dict[str, Any]:
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
    return check_meta(meta, path)


@register
class SafetensorsStorage(FormatStorage):
    """``steps/step_XXXXXXXX.safetensors``, one file per snapshot (renamed into place: complete)."""

    kind = fmt.STORAGE_SAFETENSORS

    @classmethod
    def read_location(cls, path: Path) -> Raw:
        """Read one snapshot file, checking its header before handing the bytes to safetensors; a
        sharded snapshot (its metadata lists ``"shards"``) is read with its parts and returned whole."""
        meta, tensors = read_file(path)
        if "shards" in meta or "shard" in meta:
            return shards.assemble(path, meta, tensors, read_file)
        return meta, tensors

    def steps(self) -> list[int]:
        d = self.run_path / fmt.STEPS_DIR
        if not d.is_dir():
            return []
        return sorted(s for s in (fmt.parse_step_filename(f.name) for f in d.iterdir()) if s is not None)

    def location(self, step: int) -> Path:
        return self.run_path / fmt.STEPS_DIR / fmt.step_filename(step)

    def stat(self, step: int) -> tuple[int, int]:
        return stat_path(self.location(step))

    def read_params(self, step: int) -> Snapshot:
        """Only the ``param/…`` tensors are read (lazily, through the same checked header)."""
        from safetensors import safe_open

        p = self.location(step)
        meta = header_meta(fmt.read_safetensors_header(p), p)
        if "shards" in meta:  # the parameters are in every part: read the snapshot whole
            meta, tensors = self.read_location(p)
            return Snapshot(step=meta["step"], kind=str(meta.get("kind", fmt.KIND_STEP)), params={
                fmt.check_name(k[len(fmt.PARAM):], f"{p}: tensor key param/…"): t
                for k, t in tensors.items() if k.startswith(fmt.PARAM)})
        try:
            with safe_open(str(p), framework="pt") as fh:
                params = {fmt.check_name(k[len(fmt.PARAM):], f"{p}: tensor key param/…"): fh.get_tensor(k)
                          for k in fh.keys() if k.startswith(fmt.PARAM)}
        except RunFormatError:
            raise
        except Exception as exc:
            raise RunFormatError(f"{p}: damaged safetensors file ({exc})") from exc
        return Snapshot(step=meta["step"], kind=str(meta.get("kind", fmt.KIND_STEP)), params=params)

    def identities(self, steps: list[int]) -> dict[int, str | None]:
        return {s: file_identity(self.location(s)) for s in steps}

    def disk_bytes(self) -> int:
        """The step files and the parts of their snapshots in ``shards/`` (a sharded run)."""
        total = 0
        steps = self.steps()
        for path in [*(self.location(s) for s in steps), *shards.part_files(self.run_path, steps)]:
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total


def read_file(path: Path) -> Raw:
    """The ``trajscope`` metadata and the tensors of one safetensors file of a snapshot (a step
    file, or a part of a sharded one), its header checked before the bytes go to safetensors."""
    import safetensors.torch

    header = fmt.read_safetensors_header(path)
    meta = header_meta(header, path)
    try:
        # Eager read of a regular file: mmap-based loading is slow on network filesystems.
        tensors = safetensors.torch.load(fmt.read_file_bytes(path, "snapshot"))
    except RunFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged buffers
        raise RunFormatError(f"{path}: damaged safetensors file ({exc})") from exc
    return meta, tensors


def file_identity(path: Path) -> str | None:
    """``file:<size>:<mtime_ns>:<digest>`` of a step file, None if it is missing or truncated (its
    header, or a tensor the header names, ends past the end of the file). The digest is of the
    header; for a sharded snapshot, of the header and the identities of its parts (in
    ``shards/``), and None when a part is missing or truncated."""
    own = _stat_header(path)
    if own is None:
        return None
    size, mtime, header, entries = own
    digest = hashlib.sha256(header)
    try:
        meta = json.loads(entries.get("__metadata__", {}).get("trajscope", "{}"))
        parts = shards.part_paths(path, meta) if isinstance(meta, dict) and "shards" in meta else []
    except (RunFormatError, ValueError, TypeError, AttributeError, RecursionError):
        return None
    for _, part in parts:  # one level only: a part's own metadata is never followed
        got = _stat_header(part)
        if got is None:
            return None
        digest.update(f"\0{got[0]}:{got[1]}:".encode() + hashlib.sha256(got[2]).digest())
    return f"file:{size}:{mtime}:{digest.hexdigest()[:16]}"


def _stat_header(path: Path) -> tuple[int, int, bytes, dict[str, Any]] | None:
    """(size, mtime in ns, header bytes, parsed header) of one safetensors file, None if it is
    missing or truncated."""
    try:
        with fmt.open_regular(path, "snapshot") as fh:
            st = os.fstat(fh.fileno())
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 <= n <= min(fmt.MAX_HEADER_BYTES, st.st_size - 8):
                return None
            header = fh.read(n)
        entries = json.loads(header)
        end = max((int(e["data_offsets"][1]) for k, e in entries.items() if k != "__metadata__"), default=0)
    except (RunFormatError, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return None
    if 8 + n + end > st.st_size:
        return None
    return st.st_size, st.st_mtime_ns, header, entries
