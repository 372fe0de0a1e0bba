"""Sharded snapshots (format version 3): a snapshot written in parts, one per writing rank, read whole.

A run trained with FSDP is recorded without gathering the model: every writing rank saves the
pieces of the parameters, gradients and optimizer state it holds. Rank 0 writes the step file
``steps/step_T.safetensors`` last, once every other part is on disk: the metadata, the unsharded
tensors (buffers, minibatch, RNG state), its own pieces, and in ``"shards"`` the other writing
ranks, whose parts are ``shards/step_T.rank_R.safetensors``. Each part indexes its pieces in
``"shard": {"rank", "boxes"}``; a box places a piece in its whole tensor, either by offset (an
FSDP2 DTensor shard) or as a slice of the flattened tensor (FSDP1).

:func:`assemble` reads the parts of such a snapshot and builds every sharded tensor whole,
checking that each part belongs to the step and rank its name says and that the pieces cover every
element exactly once, so that nothing above the storage reader knows a snapshot was sharded. Any
failure is one :class:`RunFormatError` naming the file, the tensor key and what was expected,
which makes only that step damaged. Specification: ``docs/format.md``, "Sharded runs".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trajscope import runformat as fmt
from trajscope.errors import RunFormatError
from trajscope.store.snapshot import is_nonneg_int
from trajscope.store.storage import Raw

__all__ = ["PartReader", "assemble", "part_files", "part_paths"]

PartReader = Callable[[Path], Raw]
"""Reads one safetensors file of a snapshot, header checked: (``trajscope`` metadata, tensors)."""


def part_paths(path: Path, meta: dict[str, Any]) -> list[tuple[int, Path]]:
    """(rank, file) of every part other than rank 0's of the snapshot whose step file is ``path``
    and whose metadata is ``meta``, by rank: the files ``RUN/shards/`` holds for the ranks its
    ``"shards"`` lists.

    Raises:
        RunFormatError: ``"shards"`` is not a list of distinct ranks ≥ 1, or the step not an integer.
    """
    ranks = meta.get("shards")
    if (not isinstance(ranks, list) or not all(is_nonneg_int(r) and r > 0 for r in ranks)
            or len(set(ranks)) != len(ranks) or not is_nonneg_int(meta.get("step"))):
        raise RunFormatError(f"{path}: snapshot 'shards' must be a list of distinct ranks >= 1 "
                             f"(got {ranks!r:.80})")
    where = path.parent.parent / fmt.SHARDS_DIR
    return [(r, where / fmt.shard_filename(meta["step"], r)) for r in sorted(ranks)]


def part_files(run_path: Path, steps: Collection[int]) -> list[Path]:
    """Every file of ``RUN/shards/`` named as a part of one of ``steps``, whatever its rank,
    found by listing the directory (without reading any step file: its step file may be gone)."""
    where = run_path / fmt.SHARDS_DIR
    try:
        names = sorted(os.listdir(where))
    except OSError:  # no shards/ (an unsharded run), or unreadable: nothing of it is counted
        return []
    wanted = set(steps)
    return [where / n for n in names if (p := fmt.parse_shard_filename(n)) is not None and p[0] in wanted]


@dataclass(frozen=True)
class _Box:
    """Where a piece lies in its whole tensor: ``offset`` (one start per dimension, the piece's
    shape as extent) or ``flat`` (the start of the piece in the flattened tensor)."""

    shape: tuple[int, ...]
    offset: tuple[int, ...] | None
    flat: int | None
    size: tuple[int, ...]
    """The piece's own shape."""

    def slices(self) -> tuple[slice, ...]:
        assert self.offset is not None
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.size, strict=True))

    def holds(self, index: int) -> bool:
        """Whether element ``index`` of the flattened whole tensor lies in this box."""
        if self.flat is not None:
            return self.flat <= index < self.flat + math.prod(self.size)
        assert self.offset is not None
        for dim, o, s in reversed(list(zip(self.shape, self.offset, self.size, strict=True))):
            index, i = divmod(index, dim)
            if not o <= i < o + s:
                return False
        return True


@dataclass
class _Whole:
    """One sharded tensor being assembled: the whole tensor, which of its elements a piece has
    filled (flat, one byte each) and the boxes placed so far, by rank."""

    tensor: torch.Tensor
    covered: torch.Tensor
    placed: list[tuple[int, _Box]] = field(default_factory=list)

    def ranks(self) -> str:
        """``parts of ranks 0, 1``: the parts that hold a piece of the tensor, for a message."""
        ranks = ", ".join(str(r) for r, _ in self.placed)
        return f"parts of ranks {ranks}" if len(self.placed) > 1 else f"part of rank {ranks}"


def assemble(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor], read_part: PartReader) -> Raw:
    """The whole snapshot whose step file ``path`` holds ``meta`` and ``tensors`` (rank 0's part):
    every sharded tensor built whole from the pieces of every part, the unsharded tensors as they
    are, and the metadata without ``"shards"`` and ``"shard"`` (the snapshot as an unsharded run
    stores it). The other parts are read one at a time with ``read_part``.

    Raises:
        RunFormatError: one line naming the file and key at fault: ``path`` is a part and not a
            step file, a part is missing or damaged, holds another step or rank, a box is
            malformed or outside its tensor, the parts disagree on a tensor's dtype or shape, or
            an element of a tensor is in no part or in two.
    """
    shard = meta.get("shard")
    if "shards" not in meta:
        rank = shard.get("rank") if isinstance(shard, dict) else None
        raise RunFormatError(f"{path}: the part of rank {rank!r:.20} of a sharded snapshot, not a snapshot: "
                             f"read its step file, {fmt.STEPS_DIR}/{fmt.step_filename(meta['step'])}")
    parts = part_paths(path, meta)
    budget = _part_bytes(path, meta["step"], parts)
    wholes: dict[str, _Whole] = {}
    boxes = _boxes(path, meta, 0)
    rest = {k: t for k, t in tensors.items() if k not in boxes}  # the unsharded tensors
    _place_part(path, 0, boxes, tensors, wholes, budget)
    for rank, file in parts:
        pmeta, ptensors = read_part(file)
        _check_part_meta(file, rank, pmeta, meta)
        boxes = _boxes(file, pmeta, rank)
        clash = next((k for k in boxes if k in rest), None)
        if clash is not None:
            raise RunFormatError(f"{file}: {clash}: boxed in the part of rank {rank}, but {path} holds it whole")
        _place_part(file, rank, boxes, ptensors, wholes, budget)
        del ptensors  # one part in memory at a time
    for key, whole in wholes.items():
        _check_covered(path, key, whole)
        rest[key] = whole.tensor
    return {k: v for k, v in meta.items() if k not in ("shards", "shard")}, rest


def _part_bytes(path: Path, step: int, parts: list[tuple[int, Path]]) -> int:
    """The bytes of every file of the snapshot (no whole tensor can be larger when its pieces
    cover it exactly once: what bounds an allocation a damaged box asks for); a missing part raises."""
    total = 0
    for rank, file in [(0, path), *parts]:
        try:
            total += os.stat(file).st_size
        except OSError as exc:
            raise RunFormatError(f"{file}: missing ({exc.strerror}): the part of rank {rank} of step {step}, "
                                 f"which {path} lists in 'shards'") from None
    return total


def _check_part_meta(file: Path, rank: int, pmeta: dict[str, Any], meta: dict[str, Any]) -> None:
    """A part of another step, rank or kind than the step file's is refused, never mixed in."""
    if pmeta["step"] != meta["step"]:
        raise RunFormatError(f"{file}: holds a part of step {pmeta['step']}, expected step {meta['step']} "
                             "(its name's); refusing to mix up steps")
    kind, want = pmeta.get("kind", fmt.KIND_STEP), meta.get("kind", fmt.KIND_STEP)
    if kind != want:
        raise RunFormatError(f"{file}: holds a part of a {kind!r} snapshot, expected {want!r} (the step file's)")
    shard = pmeta.get("shard")
    got = shard.get("rank") if isinstance(shard, dict) else None
    if got != rank:
        raise RunFormatError(f"{file}: 'shard' names rank {got!r:.20}, expected rank {rank} (its name's)")


def _boxes(file: Path, meta: dict[str, Any], rank: int) -> dict[str, Any]:
    """The ``"boxes"`` of a part's ``"shard"`` index (rank 0: the step file's), checked to be the
    index of rank ``rank``, its keys usable names."""
    shard = meta.get("shard")
    if not (isinstance(shard, dict) and shard.get("rank") == rank and isinstance(shard.get("boxes"), dict)):
        raise RunFormatError(f"{file}: 'shard' must be {{\"rank\": {rank}, \"boxes\": {{KEY: BOX, ...}}}}")
    for key in shard["boxes"]:
        fmt.check_name(key, f"{file}: 'shard' box key")
    return shard["boxes"]


def _place_part(file: Path, rank: int, boxes: dict[str, Any], tensors: dict[str, torch.Tensor],
                wholes: dict[str, _Whole], budget: int) -> None:
    """Put every piece of one part, placed by its ``boxes``, into its whole tensor (made at its first
    piece); a part other than rank 0's holds nothing else."""
    if rank != 0:
        loose = next((k for k in tensors if k not in boxes), None)
        if loose is not None:
            raise RunFormatError(f"{file}: {loose}: a tensor that the part's 'shard' index does not box")
    for key, raw in boxes.items():
        piece = tensors.get(key)
        if piece is None:
            raise RunFormatError(f"{file}: {key}: boxed in 'shard', but the file holds no such tensor")
        box = _box(file, key, raw, piece)
        whole = wholes.get(key)
        if whole is None:
            whole = wholes[key] = _new_whole(file, key, box, piece.dtype, budget)
        _place(file, key, rank, box, piece, whole)


def _box(file: Path, key: str, raw: Any, piece: torch.Tensor) -> _Box:
    """The box ``raw`` of ``piece``, checked: well formed, of the piece's rank, inside its tensor."""
    what = f"{file}: {key}"
    shape = raw.get("shape") if isinstance(raw, dict) else None
    offset = raw.get("offset") if isinstance(raw, dict) else None
    flat = raw.get("flat") if isinstance(raw, dict) else None
    if (not isinstance(shape, list) or not all(is_nonneg_int(d) for d in shape)
            or (offset is None) == (flat is None)
            or not (offset is None or (isinstance(offset, list) and all(is_nonneg_int(o) for o in offset)))
            or not (flat is None or is_nonneg_int(flat))):
        raise RunFormatError(f'{what}: box must be {{"shape": [dims], "offset": [starts]}} or '
                             f'{{"shape": [dims], "flat": start}} (got {str(raw):.80})')
    size = tuple(piece.shape)
    box = _Box(tuple(shape), tuple(offset) if offset is not None else None, flat, size)
    if flat is not None:
        n = math.prod(shape)
        if piece.dim() != 1:
            raise RunFormatError(f"{what}: a flat box holds a 1-d piece, this one has shape {list(size)}")
        if flat + size[0] > n:
            raise RunFormatError(f"{what}: elements {flat}..{flat + size[0] - 1} of a tensor of {n} "
                                 f"(shape {shape}): the box lies outside the tensor")
        return box
    assert offset is not None
    if not len(offset) == len(shape) == piece.dim():
        raise RunFormatError(f"{what}: box of {len(shape)}-d shape {shape} with {len(offset)} offsets "
                             f"for a {piece.dim()}-d piece; expected one offset per dimension")
    # A piece of no element places nothing: where it says it lies is not checked (an empty shard
    # may sit at the end of its dimension).
    if piece.numel() and any(o + s > d for o, s, d in zip(offset, size, shape, strict=True)):
        raise RunFormatError(f"{what}: box at offset {offset} of extent {list(size)} lies outside the "
                             f"tensor's shape {shape}")
    return box


def _new_whole(file: Path, key: str, box: _Box, dtype: torch.dtype, budget: int) -> _Whole:
    """The empty whole tensor of ``box.shape``, refused when it is larger than every file of the
    snapshot together (its pieces could not cover it)."""
    n = math.prod(box.shape)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes > budget:
        raise RunFormatError(f"{file}: {key}: a tensor of shape {list(box.shape)} ({nbytes} bytes), larger "
                             f"than every file of the snapshot together ({budget} bytes): its parts cannot "
                             "cover it")
    return _Whole(torch.empty(box.shape, dtype=dtype), torch.zeros(n, dtype=torch.bool))


def _place(file: Path, key: str, rank: int, box: _Box, piece: torch.Tensor, whole: _Whole) -> None:
    """Copy ``piece`` into ``whole`` where ``box`` says, refusing a dtype or shape other than the
    first part's and an element an earlier piece filled."""
    first = whole.placed[0] if whole.placed else None
    if first is not None and piece.dtype != whole.tensor.dtype:
        raise RunFormatError(f"{file}: {key}: dtype {str(piece.dtype).removeprefix('torch.')}, expected "
                             f"{str(whole.tensor.dtype).removeprefix('torch.')} (the part of rank {first[0]})")
    if first is not None and box.shape != tuple(whole.tensor.shape):
        raise RunFormatError(f"{file}: {key}: box of the tensor's shape {list(box.shape)}, expected "
                             f"{list(whole.tensor.shape)} (the part of rank {first[0]})")
    if not piece.numel():  # places nothing (its box is not checked either)
        whole.placed.append((rank, box))
        return
    if box.flat is not None:
        region = whole.covered[box.flat:box.flat + piece.numel()]
        target = whole.tensor.view(-1)[box.flat:box.flat + piece.numel()]
    else:
        region = whole.covered.view(box.shape)[box.slices()]
        target = whole.tensor[box.slices()]
    if bool(region.any()):
        index = _first_flat_index(box, region)
        other = next((r for r, b in whole.placed if b.holds(index)), "?")
        raise RunFormatError(f"{file}: {key}: element {index} of {whole.covered.numel()} is in the parts of "
                             f"ranks {other} and {rank}; expected every element in exactly one part")
    target.copy_(piece)
    region.fill_(True)
    whole.placed.append((rank, box))


def _first_flat_index(box: _Box, region: torch.Tensor) -> int:
    """The index in the flattened whole tensor of the first filled element of ``region``, the
    view of ``box`` in the coverage."""
    local = [int(i) for i in torch.nonzero(region)[0]]
    if box.flat is not None:
        return box.flat + local[0]
    assert box.offset is not None
    index = 0
    for dim, o, i in zip(box.shape, box.offset, local, strict=True):
        index = index * dim + o + i
    return index


def _check_covered(path: Path, key: str, whole: _Whole) -> None:
    """Refuse a whole tensor that an element of is in no part: name the first run of them. (Found by
    reductions over the coverage, one byte per element: a list of the gaps' indices could be eight
    bytes per element of a tensor most of which is missing.)"""
    if bool(whole.covered.all()):
        return
    covered = whole.covered.to(torch.uint8)
    n, start = covered.numel(), int(torch.argmin(covered))  # the first gap: argmin gives the first minimum
    after = covered[start:]
    run = int(torch.argmax(after)) if bool(after.any()) else after.numel()  # up to the next covered element
    missing = n - int(covered.sum())
    span = f"element {start} of {n} is" if run == 1 else f"elements {start}..{start + run - 1} of {n} are"
    more = f", and {missing - run} more after them" if missing > run else ""
    raise RunFormatError(f"{path}: {key}: {span} in no part{more} ({whole.ranks()})")
