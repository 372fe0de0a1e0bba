"""Names and encodings of the run directory, shared by the recorder and the reader.

This module is the executable half of ``docs/format.md``: every file name, tensor key prefix and
JSON field the two sides agree on is defined here once. It imports only the standard library so
that ``import trajscope.recorders`` stays light.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from trajscope.errors import RecorderError, RunFormatError

FORMAT_VERSION = 1
"""Version of the run-directory format written by this code (``format_version`` in the manifest)."""

MANIFEST = "trajscope.json"
SCALARS = "scalars.jsonl"
STEPS_DIR = "steps"
ANALYSIS_DIR = "analysis"

PARAM = "param/"
GRAD = "grad/"
BUFFER = "buffer/"
BATCH = "batch/"
RNG = "rng/"

STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"
STATUS_CRASHED = "crashed"

KIND_STEP = "step"
KIND_FINAL = "final"

MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on the JSON header
MAX_MANIFEST_BYTES = 64_000_000

_STEP_FILE = re.compile(r"^step_(\d{8,})\.safetensors$")


def step_filename(step: int) -> str:
    """File name of the snapshot of ``step`` inside ``steps/`` (zero-padded so names sort)."""
    return f"step_{step:08d}.safetensors"


def parse_step_filename(name: str) -> int | None:
    """The step number encoded in a snapshot file name, or None for any other file."""
    m = _STEP_FILE.match(name)
    return int(m.group(1)) if m else None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename.

    A reader (or a crash) therefore sees either the old file or the complete new one, never a
    prefix; and a file that another process has memory-mapped is never overwritten in place.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n").encode())


# --- batch trees --------------------------------------------------------------------------------
# A minibatch is any nesting of tuples, lists and str-keyed dicts whose leaves are tensors or JSON
# scalars. The tree's shape is stored as JSON in the snapshot metadata; tensor leaves are stored
# as ``batch/<i>`` in depth-first order. No pickle is involved in either direction.


def flatten_batch(batch: Any) -> tuple[Any, list[Any]]:
    """Split ``batch`` into a JSON tree description and its list of tensor leaves.

    Raises:
        RecorderError: for a leaf or key type that cannot be stored faithfully.
    """
    import torch  # local: keep this module importable without torch for the format tests

    leaves: list[Any] = []

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, torch.Tensor):
            leaves.append(node)
            return {"t": len(leaves) - 1}
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"v": node}
        if isinstance(node, tuple):
            return {"tuple": [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return {"list": [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]}
        if isinstance(node, dict):
            items = []
            for k, v in node.items():
                if not isinstance(k, str):
                    raise RecorderError(
                        f"batch{where}: dict keys must be str to be stored, got {type(k).__name__} {k!r}"
                    )
                items.append([k, walk(v, f"{where}[{k!r}]")])
            return {"dict": items}
        raise RecorderError(
            f"batch{where}: cannot store a {type(node).__name__}; a batch is a nesting of "
            "tuples, lists and str-keyed dicts of tensors, numbers, strings or None"
        )

    return walk(batch, ""), leaves


def unflatten_batch(tree: Any, leaves: list[Any], *, where: str = "batch") -> Any:
    """Inverse of :func:`flatten_batch`.

    Raises:
        RunFormatError: when the tree description is malformed or names a missing leaf.
    """
    if not isinstance(tree, dict) or len(tree) != 1:
        raise RunFormatError(f"{where}: malformed batch tree node {str(tree)[:80]!r}")
    (kind, val), = tree.items()
    if kind == "t":
        if not isinstance(val, int) or not 0 <= val < len(leaves):
            raise RunFormatError(f"{where}: batch tree names tensor {val!r}, which is not stored")
        return leaves[val]
    if kind == "v":
        return val
    if kind in ("tuple", "list") and isinstance(val, list):
        items = [unflatten_batch(v, leaves, where=f"{where}[{i}]") for i, v in enumerate(val)]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(val, list):
        out = {}
        for item in val:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise RunFormatError(f"{where}: malformed dict entry in batch tree")
            out[item[0]] = unflatten_batch(item[1], leaves, where=f"{where}[{item[0]!r}]")
        return out
    raise RunFormatError(f"{where}: unknown batch tree node kind {kind!r}")


# --- safetensors headers -------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Read and bound-check the JSON header of a safetensors file without touching the tensors.

    Raises:
        RunFormatError: if the file is truncated, its header is oversized or not valid JSON.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise RunFormatError(f"{path}: truncated safetensors file ({len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(fh.fileno()).st_size
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise RunFormatError(
                    f"{path}: safetensors header claims {n} bytes but the file has {size} "
                    f"(limit {MAX_HEADER_BYTES}); the file is truncated or corrupt"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise RunFormatError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFormatError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise RunFormatError(f"{path}: safetensors header is not a JSON object")
    return header
