"""Names and encodings of the run directory, shared by the recorder and the reader.

This module is the executable half of ``docs/format.md``: every file name, tensor key prefix and
JSON field the two sides agree on is defined here once. It imports only the standard library so
that ``import trajscope.recorders`` stays light.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import struct
import unicodedata
from pathlib import Path
from typing import IO, Any

from trajscope.errors import RecorderError, RunFormatError

FORMAT_VERSION = 2
"""``format_version`` of a run whose snapshots are whole (written by one process each)."""
SHARDED_FORMAT_VERSION = 3
"""``format_version`` of a sharded run (FSDP: a snapshot in parts, the others in ``shards/``); readers
implement it, writers write it only for a sharded run, so that older readers refuse only those."""

MANIFEST = "trajscope.json"
SCALARS = "scalars.jsonl"
STEPS_DIR = "steps"
ANALYSIS_DIR = "analysis"
METRICS_FILE = "metrics.nc"
"""The analysis result inside ``analysis/``: the metrics Dataset (netCDF)."""
PAIRS_DIR = "pairs"
"""Per-pair results inside ``analysis/``, kept so that an interrupted analysis resumes."""
LOCK_FILE = ".lock"
"""Inside ``analysis/``: held by the one analysis that may write there."""
REPORT_DIR = "report"
"""The default report directory of ``trajscope report RUN_DIR`` (figures and ``index.html``)."""
PRUNED = "pruned.json"
"""In the run directory: ``{"steps": [...]}``, the steps whose snapshot files ``analyze --prune``
removed once every pair that reads them was analyzed (``trajscope.analysis.prune``)."""
SHARDS_DIR = "shards"
"""In a sharded run: the parts of each snapshot that ranks other than 0 write (:func:`shard_filename`)."""
RECORDING_LOCK = ".recording.lock"
"""Held (``flock``, exclusive) by a live recorder from start to close: a command that rewrites a
run tells a live recording from one whose recorder died before it could close the run
(:func:`recorder_alive`)."""

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

# The limits of the run directory: one table for both sides. A reader refuses what exceeds one; the
# recorder checks the same names when it records (the metadata and the manifest at Recorder(...) and
# start, a batch at rec.batch, a snapshot header, parameter names), so that it never writes a run
# that a reader refuses.
MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on the JSON header
MAX_MANIFEST_BYTES = 64_000_000
MAX_SCALARS_LINE_BYTES = 1_000_000  # one scalars.jsonl line is ~100 bytes
MAX_NAME_CHARS = 1024  # parameter/buffer names, tensor keys
MAX_BATCH_DEPTH = 64  # nesting of a stored batch tree
MAX_METADATA_DEPTH = 64  # nesting of the manifest's user metadata: readers parse JSON recursively

_STEP_FILE, _STEP_NAME = re.compile(r"^step_(\d{8,})\.safetensors$"), re.compile(r"^step_(\d{8,})$")
_SHARD_FILE = re.compile(r"^step_(\d{8,})\.rank_(\d{5,})\.safetensors$")


def step_filename(step: int) -> str:
    """File name of the snapshot of ``step`` inside ``steps/`` (zero-padded so names sort)."""
    return f"step_{step:08d}.safetensors"


def parse_step_filename(name: str) -> int | None:
    """The step number encoded in a snapshot file name, or None for any other file."""
    m = _STEP_FILE.match(name)
    return int(m.group(1)) if m else None


def shard_filename(step: int, rank: int) -> str:
    """File name, inside ``shards/``, of rank ``rank``'s part of the snapshot of ``step``."""
    return f"step_{step:08d}.rank_{rank:05d}.safetensors"


def parse_shard_filename(name: str) -> tuple[int, int] | None:
    """(step, rank) of a :func:`shard_filename`, or None for any other file."""
    m = _SHARD_FILE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def step_name(step: int) -> str:
    """Storage-neutral name of a step (``step_00000012``): the file stem for safetensors, and the
    last component of the pseudo-path ``trajectory.h5/step_00000012`` that names a row of an HDF5
    run (see :func:`parse_step_name`)."""
    return f"step_{step:08d}"


def parse_step_name(name: str) -> int | None:
    """Inverse of :func:`step_name`, or None for any other name."""
    m = _STEP_NAME.match(name)
    return int(m.group(1)) if m else None


def recorder_alive(run_dir: Path) -> bool | None:
    """Whether a live recorder holds ``run_dir``'s :data:`RECORDING_LOCK`: True, False, or None when
    it cannot be told (no lock file, as in runs recorded without one, or no ``flock``)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(run_dir / RECORDING_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename.

    A reader (or a crash) therefore sees either the old file or the complete new one, never a
    prefix; and a file that another process has memory-mapped is never overwritten in place.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # O_EXCL | O_NOFOLLOW: a file or symlink already sitting at the temp name (a leftover, or one
    # planted in a shared run directory) is removed, never written through.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileExistsError:
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: no half-written temporary left, and the error names the file
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise named(exc, path) from exc


def named(exc: OSError, path: Path) -> OSError:
    """``exc`` itself when it names a file, else the same error naming ``path`` (a failed
    ``write``/``fsync`` on an open file names none)."""
    return exc if exc.filename else OSError(exc.errno, exc.strerror or str(exc), str(path))


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


def unflatten_batch(tree: Any, leaves: list[Any], *, where: str = "batch", _depth: int = 0) -> Any:
    """Inverse of :func:`flatten_batch`.

    Raises:
        RunFormatError: when the tree description is malformed, nested deeper than
            :data:`MAX_BATCH_DEPTH`, or names a missing leaf.
    """
    if _depth > MAX_BATCH_DEPTH:
        raise RunFormatError(f"{where}: batch tree nested deeper than {MAX_BATCH_DEPTH} levels")
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
        items = [unflatten_batch(v, leaves, where=f"{where}[{i}]", _depth=_depth + 1)
                 for i, v in enumerate(val)]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and isinstance(val, list):
        out = {}
        for item in val:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise RunFormatError(f"{where}: malformed dict entry in batch tree")
            out[item[0]] = unflatten_batch(item[1], leaves, where=f"{where}[{item[0]!r}]",
                                           _depth=_depth + 1)
        return out
    raise RunFormatError(f"{where}: unknown batch tree node kind {kind!r}")


# --- safetensors headers -------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Read and bound-check the JSON header of a safetensors file without touching the tensors.

    The header length is checked against :data:`MAX_HEADER_BYTES` and the file size before it is
    read, and every tensor entry's byte range is checked against the data section, so a truncated
    file is reported here (naming the first tensor that does not fit) rather than by safetensors.

    Raises:
        RunFormatError: if the file is not a readable regular file, is truncated, or its header is
            oversized, not valid JSON, or not a safetensors header.
    """
    with open_regular(path, "safetensors file") as fh:
        try:
            head = fh.read(8)
            if len(head) < 8:
                raise RunFormatError(f"{path}: truncated safetensors file ({len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(fh.fileno()).st_size
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise RunFormatError(f"{path}: safetensors header claims {n} bytes but the file has {size} "
                                     f"(limit {MAX_HEADER_BYTES}); the file is truncated or corrupt")
            raw = fh.read(n)
        except OSError as exc:
            raise RunFormatError(f"{path}: cannot read ({exc.strerror})") from exc
    if len(raw) != n:
        raise RunFormatError(f"{path}: file shrank while being read (truncated)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFormatError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    except RecursionError:
        raise RunFormatError(f"{path}: safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise RunFormatError(f"{path}: safetensors header is not a JSON object")
    check_safetensors_header(header, size - 8 - n, path)
    return header


def check_safetensors_header(header: dict[str, Any], data_len: int, path: Path) -> None:
    """Check the structure of a parsed safetensors header against a data section of ``data_len``
    bytes: string metadata, and for each tensor a dtype, a shape of non-negative ints and a byte
    range inside the data section. Raises :class:`RunFormatError` naming the first entry that breaks it."""
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in entry.items()):
                raise RunFormatError(f"{path}: safetensors '__metadata__' must map strings to strings")
            continue
        what = f"{path}: tensor {key[:200]!r}"
        if not isinstance(entry, dict):
            raise RunFormatError(f"{what}: header entry is not an object")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(entry.get("dtype"), str):
            raise RunFormatError(f"{what}: header entry lacks a string 'dtype'")
        if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
            raise RunFormatError(f"{what}: 'shape' must be a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_nonneg_int(o) for o in offsets) or offsets[0] > offsets[1]):
            raise RunFormatError(f"{what}: 'data_offsets' must be [begin, end] with 0 <= begin <= end")
        if offsets[1] > data_len:
            raise RunFormatError(f"{what} needs bytes {offsets[0]}..{offsets[1]} of the data section, "
                                 f"which has only {data_len}: the file is truncated")


def _is_nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# --- reading untrusted files ---------------------------------------------------------------------
# Everything under a run directory may have been copied from elsewhere, damaged, or planted. These
# helpers refuse anything but regular files (a FIFO or device would block or never end), bound
# sizes before reading, and keep names from being anything but plain labels.


def open_regular(path: Path, what: str = "file") -> IO[bytes]:
    """Open ``path`` for binary reading if it is a regular file (symlinks to one are followed).

    Opening never blocks: a FIFO planted under a run directory is refused, not waited on.

    Raises:
        RunFormatError: if ``path`` cannot be opened or is not a regular file.
    """
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise RunFormatError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "special file"
            raise RunFormatError(f"{path}: expected a regular file ({what}), found a {kind}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: Path, limit: int, what: str = "file") -> bytes:
    """All bytes of regular file ``path``, refusing (before reading) a file larger than ``limit``.

    Raises:
        RunFormatError: if the file is not a readable regular file or exceeds ``limit`` bytes.
    """
    with open_regular(path, what) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise RunFormatError(f"{path}: {what} is {size} bytes, larger than the limit {limit}")
            data = fh.read(limit + 1)
        except OSError as exc:
            raise RunFormatError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    if len(data) > limit:
        raise RunFormatError(f"{path}: {what} grew past the limit {limit} bytes while being read")
    return data


def read_file_bytes(path: Path, what: str = "file") -> bytes:
    """All bytes of regular file ``path`` (step files: their size is their data); raises
    :class:`RunFormatError` if it is not a readable regular file."""
    with open_regular(path, what) as fh:
        try:
            return fh.read()
        except OSError as exc:
            raise RunFormatError(f"{path}: cannot read {what} ({exc.strerror})") from exc


def check_name(name: Any, where: str) -> str:
    """Return ``name`` if it is usable as a parameter/buffer name, else raise.

    Names from a run directory are only ever dict keys and coordinate labels, never paths, so
    ``..``, ``/`` and absolute-looking names are harmless and allowed (PyTorch allows ``/`` in
    module names). What is refused is what breaks storage or display: an empty or very long name,
    control characters (NUL, newlines, ANSI escapes), format characters (bidi overrides,
    zero-width), surrogates, private-use and unassigned code points.

    Raises:
        RunFormatError: naming ``where`` and the offending character.
    """
    if not isinstance(name, str):
        raise RunFormatError(f"{where}: expected a string name, got {type(name).__name__}")
    if not name:
        raise RunFormatError(f"{where}: empty name")
    if len(name) > MAX_NAME_CHARS:
        raise RunFormatError(f"{where}: name of {len(name)} characters (limit {MAX_NAME_CHARS})")
    for i, ch in enumerate(name):
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise RunFormatError(
                f"{where}: name {name[:80]!r} contains character U+{ord(ch):04X} "
                f"(category {cat}) at position {i}; names must be printable text"
            )
    return name


# --- safetensors encoding (writer side) ------------------------------------------------------------
# The recorder lays a snapshot out in memory exactly as its safetensors file (so the background
# writer issues one write per step and no serialisation copy exists); this is the part of the
# safetensors spec it needs. Reading always goes through the safetensors library, which validates.

DTYPES: dict[str, tuple[str, int, str | None]] = {
    "float64": ("F64", 8, None),
    "int64": ("I64", 8, None),
    "uint64": ("U64", 8, None),
    "float32": ("F32", 4, None),
    "int32": ("I32", 4, None),
    "uint32": ("U32", 4, None),
    "float16": ("F16", 2, "int16"),
    "bfloat16": ("BF16", 2, "int16"),
    "int16": ("I16", 2, None),
    "uint16": ("U16", 2, None),
    "int8": ("I8", 1, None),
    "uint8": ("U8", 1, None),
    "bool": ("BOOL", 1, "uint8"),
    "float8_e4m3fn": ("F8_E4M3", 1, "uint8"),
    "float8_e5m2": ("F8_E5M2", 1, "uint8"),
}
"""The one dtype table of every storage format: torch dtype name → (safetensors dtype code, bytes
per element, same-width integer view). The view is set for the dtypes whose bits are copied and
stored through an integer of the same width (numpy has no bfloat16 or float8; float16 and bool
follow the same rule, so HDF5 stores all of them as unsigned integers with a ``dtype``
attribute); ``None`` means the dtype's own numpy type. The storage backends
(:mod:`trajscope.recorders.backends`) derive their maps from it."""



def int_view(name: str) -> str | None:
    """The same-width integer dtype whose bits stand for ``name`` (``"bfloat16"`` → ``"int16"``),
    or None for a dtype numpy holds as itself and for names not in :data:`DTYPES`."""
    entry = DTYPES.get(name)
    return entry[2] if entry is not None else None


SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {k: (code, size) for k, (code, size, _) in DTYPES.items()}
"""torch dtype name → (safetensors dtype code, bytes per element), a view of :data:`DTYPES`."""

HEADER_ALIGN = 8
"""The JSON header is space-padded so the data section starts 8-byte aligned (as safetensors does),
which keeps every tensor aligned to its element size when tensors are ordered by element size."""


def safetensors_layout(specs: list[tuple[str, str, tuple[int, ...]]]) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], int]:  # noqa: E501
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
