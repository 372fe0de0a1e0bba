"""Sharded training (FSDP): every writing rank records its own shard, and nothing is gathered.

Under FSDP a rank holds a shard of each parameter, of its gradient (after reduce-scatter) and of
its optimizer state. Gathering them every recorded step would cost training an all-gather of the
model; instead each rank writes the pieces it holds, with an index that places each piece in its
tensor, as ``torch.distributed.checkpoint`` does for sharded state dicts. The reader reassembles
whole tensors (``docs/format.md``, "Sharded runs"). What this module decides:

* **Which layouts** (:func:`detect`): FSDP2 (``fully_shard``: DTensor parameters ``Shard(0)`` on one
  mesh dimension, ``Replicate`` on any others, as HSDP has) and FSDP1 with ``use_orig_params=True``
  (each parameter a slice of its flat parameter). Anything else that splits the model across
  ranks is refused with one :class:`RecorderError`: tensor parallelism (a DTensor placement other
  than those, or DTensors with no FSDP), FSDP1 without ``use_orig_params`` or hybrid, and pipeline
  parallelism or any layout in which ranks hold different models (:func:`check_same_model`).
* **Who writes**: the ranks of one replica (coordinate 0 on every ``Replicate`` mesh dimension; all
  ranks under plain FSDP). Rank 0 writes the snapshot file ``steps/step_T.safetensors`` (the batch,
  the buffers, the metadata and its own pieces); every other writer writes
  ``shards/step_T.rank_R.safetensors``.
* **When a step is complete** (:class:`PartSync`): the writers vote on their own gloo group after
  each part is on disk; rank 0 writes its file, the step's marker, only when every part is. A dead
  rank fails the vote, so its step never appears, and the steps before it stay whole.
* **The clip's true norm**: the pre-clip and consumed gradient norms are summed over the shards
  (:meth:`Sharding.gather`), so a clip under FSDP2 is recorded as in one process; FSDP1's own
  ``clip_grad_norm_`` is recorded from its return value (:meth:`Sharding.watch_clip`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from trajscope import runformat as fmt
from trajscope.errors import RecorderError
from trajscope.recorders.distributed import collective_device

if TYPE_CHECKING:
    from trajscope.recorders.storage import StepImage

__all__ = ["PartSync", "Sharding", "check_same_model", "clean_name", "detect"]

Entries = list[tuple[str, torch.Tensor]]

SUPPORTED = ("FSDP2 (fully_shard, with or without a replicate mesh dimension: HSDP) and FSDP1 "
             "(FullyShardedDataParallel with use_orig_params=True, FULL_SHARD or SHARD_GRAD_OP)")
VOTE_TIMEOUT = datetime.timedelta(minutes=10)
"""How long a writer waits for the others' parts of a step (a slow shared filesystem) before it
fails the step."""
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """``name`` without the path components FSDP1 and activation checkpointing insert
    (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``): the plain model's name, which
    the analyzer's objective uses."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


@dataclass
class Sharding:
    """How a sharded model's tensors are split, seen from this rank.

    Attributes:
        kind: ``"fsdp2"`` or ``"fsdp1"``.
        rank, world: this process's rank and the world size.
        writers: the ranks that write a part of each snapshot, rank 0 first.
        mesh: ``{"shape", "dim_names"}`` of the device mesh (FSDP1: one dimension, the world).
        mixed_precision: the FSDP mixed-precision policy's dtypes, None without one.
        shapes: FSDP1: id(parameter) → its global shape, for every parameter FSDP flattened.
        flat: FSDP1: id(parameter) → where its slice starts in the flattened tensor; a parameter
            with no element on this rank has no entry.
        group: the writers' gloo group (:class:`PartSync`), made at :meth:`connect`.
    """

    kind: str
    rank: int
    world: int
    writers: list[int]
    mesh: dict[str, Any]
    mixed_precision: dict[str, str] | None
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    flat: dict[int, int] = field(default_factory=dict)
    group: Any = None
    clip: dict[str, Any] | None = None
    """FSDP1: the clip fields of the last ``clip_grad_norm_`` of the step (:meth:`watch_clip`)."""
    _clipper: Any = None

    @property
    def writes(self) -> bool:
        return self.rank in self.writers

    def manifest(self) -> dict[str, Any]:
        """The manifest's ``distributed`` fields beyond ``world_size`` and ``writer_rank``."""
        return {"sharding": self.kind, "shard_ranks": self.writers, "mesh": self.mesh,
                "mixed_precision": self.mixed_precision}

    def global_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        """The shape of the whole tensor ``p`` is a piece of (a DTensor's shape is already that)."""
        return self.shapes.get(id(p), tuple(p.shape))

    def connect(self) -> None:
        """Collective on the default group (every rank, in the same order): the writers' group."""
        self.group = torch.distributed.new_group(self.writers, backend="gloo", timeout=VOTE_TIMEOUT)

    def disconnect(self) -> None:
        """Destroy the writers' group once this rank's writer thread is done with it, rather than
        leave it to the default group's teardown, which can abort a process whose gloo threads
        still hold the group."""
        group, self.group = self.group, None
        if group is not None and self.writes and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group(group)

    def watch_clip(self, model: torch.nn.Module) -> None:
        """FSDP1: record the clip of the root's ``clip_grad_norm_`` (FSDP1's gradients reach the
        parameters without the post-accumulate-grad hooks that measure the pre-clip norm).

        Its return value is the pre-clip total norm over every shard, and it scales every gradient by
        c = min(1, max_norm / (norm + 1e-6)): a uniform clip, recorded in :attr:`clip` when c < 1.
        The method is wrapped on the instance only, and restored by :meth:`unwatch_clip`.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = next((m for m in model.modules() if isinstance(m, FullyShardedDataParallel)), None)
        if self.kind != "fsdp1" or root is None:
            return
        original = root.clip_grad_norm_

        def clip_grad_norm_(max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
            total = original(max_norm, norm_type)
            c = min(1.0, float(max_norm) / (float(total) + 1e-6))
            norm = {"grad_norm_preclip": float(total)} if float(norm_type) == 2.0 else {}
            self.clip = {**norm, "clip_factor": c, "clip_uniform": True} if c < 1.0 else None
            return total

        root.clip_grad_norm_ = clip_grad_norm_  # type: ignore[method-assign]
        self._clipper = root

    def unwatch_clip(self) -> None:
        root, self._clipper = self._clipper, None
        if root is not None and "clip_grad_norm_" in vars(root):
            del root.clip_grad_norm_

    def parts(self, tensors: Entries, owners: dict[str, torch.Tensor], meta: dict[str, Any]
              ) -> tuple[Entries, dict[str, Any]]:
        """The entries and metadata this rank writes for a snapshot of ``tensors`` (with ``meta``).

        A sharded tensor (a DTensor; under FSDP1 a parameter's slice, or a gradient or optimizer
        state of one, ``owners`` naming the parameter of each such key) is replaced by its local
        piece, placed by a box in ``meta["shard"]``. Rank 0 keeps everything else and the
        metadata, and lists the other writers in ``meta["shards"]``; another writer keeps only its
        pieces, with the step and kind.
        """
        out: Entries = []
        boxes: dict[str, dict[str, Any]] = {}
        for key, t in tensors:
            piece = self._piece(key, t, owners.get(key))
            if piece is None:
                if self.rank == 0:
                    out.append((key, t))
                continue
            local, box = piece
            out.append((key, local))
            boxes[key] = box
        shard = {"rank": self.rank, "boxes": boxes}
        if self.rank == 0:
            return out, {**meta, "shards": [r for r in self.writers if r != 0], "shard": shard}
        return out, {"step": meta["step"], "kind": meta["kind"], "shard": shard}

    def _piece(self, key: str, t: torch.Tensor, owner: torch.Tensor | None
               ) -> tuple[torch.Tensor, dict[str, Any]] | None:
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local = t.to_local()
            _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            return local, {"shape": list(t.shape), "offset": [int(o) for o in offset]}
        if owner is not None and id(owner) in self.shapes:  # FSDP1: a slice of the flattened tensor
            # (empty where no element of the parameter is on this rank)
            return t.reshape(-1), {"shape": list(self.shapes[id(owner)]), "flat": self.flat.get(id(owner), 0)}
        return None

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` (a 1-D float64 tensor), stacked in rank order; collective."""
        dist = torch.distributed
        mine = values.detach().to(collective_device(), torch.float64)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return torch.stack(every).to(values.device)

    def owners(self, params: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Key → parameter for the keys whose tensor is a piece of a parameter's shape: under FSDP1
        a slice that is not a DTensor (its parameter places it; optimizer states are not sliced
        alike, and are refused for FSDP1 at start)."""
        if self.kind != "fsdp1":
            return {}
        return {k + n: p for n, p in params for k in (fmt.PARAM, fmt.GRAD)}

    def counts(self, p: torch.Tensor) -> bool:
        """Whether this rank's piece of ``p``'s gradient counts in a norm summed over every rank:
        a sharded piece on a writer (one replica), an unsharded tensor on rank 0 only."""
        from torch.distributed.tensor import DTensor

        sharded = isinstance(p, DTensor) or id(p) in self.shapes
        return self.writes if sharded else self.rank == 0


# --- which layout ----------------------------------------------------------------------------------


def detect(model: torch.nn.Module, storage: str) -> Sharding | None:
    """The sharding of ``model`` (None when its parameters are whole on every rank).

    Raises:
        RecorderError: a layout that is not supported (tensor parallelism, FSDP1 without
            ``use_orig_params``, a mesh over part of the world), or HDF5 storage for a sharded run.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    sharding = _fsdp2(model) or _fsdp1(model)
    if sharding is not None and storage != fmt.STORAGE_SAFETENSORS:
        raise RecorderError(f"format={storage!r}: a sharded ({sharding.kind}) run is recorded in safetensors "
                            "storage (each rank writes its own files); convert it afterwards with "
                            "`trajscope convert RUN --to hdf5`")
    return sharding


def _fsdp2(model: torch.nn.Module) -> Sharding | None:
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # a torch without FSDP2
        return None
    params = [(n, p) for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if not params:
        return None
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        raise RecorderError(f"parameter {params[0][0]!r} is a DTensor but the model has no FSDP (fully_shard) "
                            f"module: tensor parallelism is not supported; supported: {SUPPORTED}")
    mesh = params[0][1].device_mesh
    for name, p in params:
        kinds = [type(pl) for pl in p.placements]
        if (p.device_mesh != mesh or kinds.count(Shard) != 1 or any(k not in (Shard, Replicate) for k in kinds)
                or next(pl for pl in p.placements if type(pl) is Shard).dim != 0):
            raise RecorderError(
                f"parameter {name!r} is placed {tuple(p.placements)} on {p.device_mesh}: only FSDP's own "
                f"sharding (Shard(0) on one mesh dimension, Replicate on the others, one mesh for all) can "
                f"be recorded; tensor parallelism is not supported. Supported: {SUPPORTED}")
    world = torch.distributed.get_world_size()
    if mesh.size() != world:
        raise RecorderError(f"the FSDP mesh {tuple(mesh.shape)} covers {mesh.size()} of the {world} ranks "
                            f"(pipeline parallelism?): not supported; supported: {SUPPORTED}")
    shard_dim = [type(pl) for pl in params[0][1].placements].index(Shard)
    index: list[Any] = [0] * mesh.ndim
    index[shard_dim] = slice(None)
    writers = [int(r) for r in mesh.mesh[tuple(index)].reshape(-1).tolist()]
    if 0 not in writers:
        raise RecorderError(f"rank 0 is not in the FSDP mesh's first replica {writers}: not supported")
    return Sharding("fsdp2", torch.distributed.get_rank(), world, writers,
                    {"shape": list(mesh.shape), "dim_names": list(mesh.mesh_dim_names or []) or None},
                    _policy(_fsdp2_policy(model)))


def _fsdp2_policy(model: torch.nn.Module) -> Any:
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            state = getattr(m, "_get_fsdp_state", None)
            return getattr(state(), "_mp_policy", None) if state is not None else None
    return None


def _fsdp1(model: torch.nn.Module) -> Sharding | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    except ImportError:
        return None
    wrapped = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    if not wrapped:
        return None
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    for m in wrapped:
        if not getattr(m, "_use_orig_params", False):
            raise RecorderError("FullyShardedDataParallel without use_orig_params=True: its parameters are "
                                "flattened and cannot be named; wrap with use_orig_params=True, or use FSDP2 "
                                f"(fully_shard). Supported: {SUPPORTED}")
        size = m.process_group.size() if m.process_group is not None else world
        if m.sharding_strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP,
                                       ShardingStrategy.NO_SHARD) or size != world:
            raise RecorderError(f"FullyShardedDataParallel with {m.sharding_strategy.name} over {size} of "
                                f"{world} ranks: not supported; supported: {SUPPORTED}")
    s = Sharding("fsdp1", rank, world, list(range(world)), {"shape": [world], "dim_names": None},
                 _policy(wrapped[0].mixed_precision))
    for m in wrapped:
        handle = getattr(m, "_handle", None)
        if handle is None:
            continue
        fp = handle.flat_param
        for p, shape, info in zip(fp._params, fp._shapes, fp._shard_param_infos, strict=True):
            s.shapes[id(p)] = tuple(shape)
            if info.in_shard:
                s.flat[id(p)] = int(info.intra_param_start_idx)
    return s


def _policy(policy: Any) -> dict[str, str] | None:
    """The dtypes of an FSDP mixed-precision policy (FSDP2 ``MixedPrecisionPolicy``, FSDP1
    ``MixedPrecision``), None when it sets none."""
    if policy is None:
        return None
    out = {k: str(v).removeprefix("torch.") for k in ("param_dtype", "reduce_dtype", "output_dtype", "buffer_dtype")
           if isinstance(v := getattr(policy, k, None), torch.dtype)}
    return out or None


def layout(model: torch.nn.Module, params: list[tuple[str, torch.Tensor]], storage: str,
           optimizer_state: bool) -> Sharding | None:
    """The first half of a recorder's start on every rank of a distributed run (collectives, in the
    same order on every rank): the layout (:func:`detect`), the same model on every rank
    (:func:`check_same_model`), the writers' group; FSDP1's clip watched (:meth:`Sharding.watch_clip`)."""
    s = detect(model, storage)
    if s is not None and optimizer_state and s.kind == "fsdp1":
        raise RecorderError("optimizer_state=True under FSDP1: not supported (its states are flat slices); "
                            "use FSDP2 (fully_shard), or record without the optimizer state")
    check_same_model((n, s.global_shape(p) if s is not None else tuple(p.shape)) for n, p in params)
    if s is not None:
        s.connect()
        s.watch_clip(model)
    return s


def open_ranks(s: Sharding | None, open_storage: Callable[[], None], run_dir: Any) -> None:
    """The second half: ``open_storage`` on rank 0 (the run directory), whose outcome every rank
    learns; then ``open_storage`` on the other writers (their part writers, into the directory
    rank 0 prepared)."""
    rank0 = torch.distributed.get_rank() == 0
    try:
        if rank0:
            open_storage()
    except BaseException:
        agree(False, "")
        raise
    agree(True, f"{run_dir}: rank 0 could not start recording (its error says why)")
    if s is not None and s.writes and not rank0:
        open_storage()


def check_same_model(names: Iterable[tuple[str, tuple[int, ...]]]) -> None:
    """Collective on the default group: refuse when the ranks hold different models (pipeline
    parallelism, or any layout that gives each rank its own part), by comparing a digest of
    (name, global shape) of every parameter."""
    dist = torch.distributed
    digest = hashlib.sha256(json.dumps([[n, list(s)] for n, s in names]).encode()).digest()
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(collective_device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    other = [r for r, d in enumerate(every) if not torch.equal(d, mine)]
    if other:
        raise RecorderError(f"ranks {other} hold a model with other parameters (names or shapes) than rank "
                            f"{dist.get_rank()}'s: pipeline parallelism and other layouts that give each rank "
                            f"its own part of the model are not supported; supported: data parallelism (DDP) "
                            f"and {SUPPORTED}")


def agree(ok: bool, what: str) -> None:
    """Collective on the default group: raise on every rank when ``ok`` is False on any (``what``
    says what failed, e.g. rank 0 could not create the run)."""
    dist = torch.distributed
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    if not int(t.item()):
        raise RecorderError(what)


# --- the writers' vote -----------------------------------------------------------------------------


@dataclass
class PartSync:
    """The write of one rank's part of each snapshot, and the vote that completes the step.

    Every writer calls :meth:`write` for the same snapshots in the same order (on its writer
    thread). A rank other than 0 writes its part, then votes; rank 0 votes, then writes its file
    (the marker) only if every part was written. After a failure a rank keeps voting no
    (:meth:`refuse`), so the others stop too rather than wait for it.
    """

    sharding: Sharding
    write_part: Callable[[StepImage], Any]

    def write(self, image: StepImage) -> Any:
        if self.sharding.rank == 0:
            self._vote(True, image.step)
            return self.write_part(image)
        try:
            out = self.write_part(image)
        except BaseException:
            self._vote(False, image.step)
            raise
        self._vote(True, image.step)
        return out

    def refuse(self, image: StepImage) -> None:
        """Vote no for ``image`` (this rank stopped writing after an earlier failure)."""
        try:
            self._vote(False, image.step)
        except RecorderError:
            pass

    def _vote(self, ok: bool, step: int) -> None:
        dist = torch.distributed
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)  # the group is gloo: a CPU tensor
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.sharding.group)
        except RuntimeError as exc:  # a rank died, or timed out
            raise RecorderError(f"step {step}: the writing ranks {self.sharding.writers} did not all answer "
                                f"({' '.join(str(exc).split())[:200]}); the step is not recorded") from exc
        if not int(t.item()):
            raise RecorderError(f"step {step}: another rank failed to write its part of the snapshot; "
                                "recording stopped on every rank")
