"""Sharded runs made by hand: a run recorded in one process, its snapshots rewritten in the form an
FSDP recording has (format version 3, ``docs/format.md`` "Sharded runs"), so that the reader's
reassembly can be compared with the snapshots it came from, bit for bit.

Importable as ``support.sharded`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from support.rundirs import edit_manifest, load_raw, save_raw
from trajscope import runformat as fmt

SHARDED_PREFIXES = (fmt.PARAM, fmt.GRAD, fmt.OPTIM)


def split(t: torch.Tensor, ranks: int, flat: bool) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """``t`` in ``ranks`` pieces with their boxes: along dim 0 by offset (FSDP2), or as slices of
    the flattened tensor (FSDP1). Uneven sizes as ``torch.tensor_split`` makes them (a piece may be
    empty). A 0-d tensor is held whole by rank 0."""
    shape = list(t.shape)
    if t.dim() == 0:
        return [(t.clone(), {"shape": shape, "offset": []})]
    out, start = [], 0
    for piece in torch.tensor_split(t.reshape(-1) if flat else t, ranks, dim=0):
        box = {"shape": shape, "flat": start} if flat else {"shape": shape, "offset": [start] + [0] * (t.dim() - 1)}
        out.append((piece.clone(), box))
        start += piece.shape[0]
    return out


def shard_run(run: Path, *, ranks: int = 2, flat: bool = False) -> Path:
    """Rewrite every snapshot of the safetensors run ``run`` in place as a sharded snapshot of
    ``ranks`` writers: each ``param/``, ``grad/`` and ``optim/`` tensor split by :func:`split`,
    rank 0's pieces and every other tensor in the step file, rank r's pieces in
    ``shards/step_T.rank_R.safetensors``; the manifest says format version 3 and how it was
    sharded. Returns ``run``."""
    (run / fmt.SHARDS_DIR).mkdir(exist_ok=True)
    for file in sorted((run / fmt.STEPS_DIR).iterdir()):
        step = fmt.parse_step_filename(file.name)
        if step is None:
            continue
        tensors, meta = load_raw(file)
        parts: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks)]
        boxes: list[dict[str, Any]] = [{} for _ in range(ranks)]
        for key, t in tensors.items():
            if not key.startswith(SHARDED_PREFIXES):
                parts[0][key] = t
                continue
            for rank, (piece, box) in enumerate(split(t, ranks, flat)):
                parts[rank][key], boxes[rank][key] = piece, box
        for rank in range(1, ranks):
            save_raw(run / fmt.SHARDS_DIR / fmt.shard_filename(step, rank), parts[rank],
                     {"step": step, "kind": meta.get("kind", fmt.KIND_STEP),
                      "shard": {"rank": rank, "boxes": boxes[rank]}})
        # rank 0's file last, as the recorder writes it: the step is complete once it is there
        save_raw(file, parts[0], {**meta, "shards": list(range(1, ranks)),
                                  "shard": {"rank": 0, "boxes": boxes[0]}})
    edit_manifest(run, lambda m: m.update(
        format_version=fmt.SHARDED_FORMAT_VERSION,
        distributed={"world_size": ranks, "writer_rank": 0, "sharding": "fsdp1" if flat else "fsdp2",
                     "shard_ranks": list(range(ranks)), "mesh": {"shape": [ranks], "dim_names": None},
                     "mixed_precision": None}))
    return run


def part_file(run: Path, step: int, rank: int) -> Path:
    return run / fmt.SHARDS_DIR / fmt.shard_filename(step, rank)


def manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / fmt.MANIFEST).read_text())
