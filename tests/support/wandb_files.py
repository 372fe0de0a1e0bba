"""Reading a W&B offline run back from its own files (``run-<id>.wandb``): the records W&B wrote,
parsed with W&B's own protobuf definitions. The file is a LevelDB-style log: a 7-byte header
(``:W&B``, magic, version), then 32 KiB blocks of records, each a 7-byte header (CRC32C, length,
type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list[Any]:
    """Every ``wandb_internal_pb2.Record`` in the offline run file ``path``, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """The rows ``run.log`` wrote, key → value."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def config(path: Path) -> dict[str, Any]:
    """The run's config as its records set it."""
    out: dict[str, Any] = {}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        items = rec.config.update if kind == "config" else rec.run.config.update if kind == "run" else []
        out.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return out
