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
OPTIM = "optim/"
"""Optimizer state of a parameter: ``optim/<param name>/<state key>`` (e.g. ``exp_avg``)."""

STORAGE_SAFETENSORS = "safetensors"
STORAGE_HDF5 = "hdf5"
STORAGES = (STORAGE_SAFETENSORS, STORAGE_HDF5)
"""Values of the manifest's ``storage`` field (how the snapshots are stored)."""

HDF5_FILE = "trajectory.h5"
"""The single HDF5 file of a run stored with ``storage: hdf5`` (layout: ``docs/format-hdf5.md``)."""

STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"
STATUS_CRASHED = "crashed"

KIND_STEP = "step"
KIND_FINAL = "final"

MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on the JSON header
MAX_MANIFEST_BYTES = 64_000_000

_STEP_FILE = re.compile(r"^step_(\d{8,})\.safetensors$")
_STEP_NAME = re.compile(r"^step_(\d{8,})$")


def step_filename(step: int) -> str:
    """File name of the snapshot of ``step`` inside ``steps/`` (zero-padded so names sort)."""
    return f"step_{step:08d}.safetensors"


def parse_step_filename(name: str) -> int | None:
    """The step number encoded in a snapshot file name, or None for any other file."""
    m = _STEP_FILE.match(name)
    return int(m.group(1)) if m else None


def step_name(step: int) -> str:
    """Storage-neutral name of a step (``step_00000012``): the file stem for safetensors, and the
    last component of the pseudo-path ``trajectory.h5/step_00000012`` that names a row of an HDF5
    run (see :func:`parse_step_name`)."""
    return f"step_{step:08d}"


def parse_step_name(name: str) -> int | None:
    """Inverse of :func:`step_name`, or None for any other name."""
    m = _STEP_NAME.match(name)
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


# --- safetensors encoding (writer side) ------------------------------------------------------------
# The recorder lays a snapshot out in memory exactly as its safetensors file (so the background
# writer issues one write per step and no serialisation copy exists); this is the part of the
# safetensors spec it needs. Reading always goes through the safetensors library, which validates.

SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "int64": ("I64", 8),
    "uint64": ("U64", 8),
    "float32": ("F32", 4),
    "int32": ("I32", 4),
    "uint32": ("U32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int16": ("I16", 2),
    "uint16": ("U16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
}
"""torch dtype name → (safetensors dtype code, bytes per element)."""

HEADER_ALIGN = 8
"""The JSON header is space-padded so the data section starts 8-byte aligned (as safetensors does),
which keeps every tensor aligned to its element size when tensors are ordered by element size."""


def safetensors_layout(specs: list[tuple[str, str, tuple[int, ...]]]) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], int]:
    """Order tensors and assign their byte ranges in the data section.

    Args:
        specs: ``(key, torch dtype name, shape)`` per tensor, in the caller's order.

    Returns:
        ``(key, dtype, shape, begin, end)`` per tensor (offsets relative to the data section),
        sorted by element size, largest first, then by key, so each tensor's offset is a multiple
        of its element size and the same tensors always give the same file; and the data
        section's total size. safetensors forbids holes, so there
        is no padding between tensors.

    Raises:
        RecorderError: for a dtype safetensors cannot store, or a duplicate key.
    """
    seen: set[str] = set()
    sized = []
    for i, (key, dtype, shape) in enumerate(specs):
        if key in seen:
            raise RecorderError(f"tensor key {key!r} appears twice in one snapshot")
        seen.add(key)
        if dtype not in SAFETENSORS_DTYPES:
            raise RecorderError(
                f"{key}: dtype {dtype} cannot be stored (supported: {', '.join(SAFETENSORS_DTYPES)})"
            )
        size = SAFETENSORS_DTYPES[dtype][1]
        n = size
        for d in shape:
            n *= int(d)
        sized.append((-size, key, i, dtype, tuple(int(d) for d in shape), n))
    sized.sort()  # canonical order: the same tensors always give the same bytes
    out = []
    offset = 0
    for _, key, _, dtype, shape, n in sized:
        out.append((key, dtype, shape, offset, offset + n))
        offset += n
    return out, offset


def safetensors_header(layout: list[tuple[str, str, tuple[int, ...], int, int]],
                       metadata: dict[str, str]) -> bytes:
    """The 8-byte length prefix plus the padded JSON header for ``layout``.

    ``len(result)`` is the offset of the data section in the file; it is a multiple of
    :data:`HEADER_ALIGN`.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    for key, dtype, shape, begin, end in layout:
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype][0], "shape": list(shape),
                       "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    raw += b" " * (-(8 + len(raw)) % HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw
