"""Data-parallel support: who writes, and gathering every rank's minibatch to rank 0.

Under DDP each rank computes the gradient of its own minibatch and the gradients are averaged, so
the step the optimizer takes is a step on the *global* batch: the union of the ranks' batches, with
loss (1/W)·Σ_r f(x; z_r). Rank 0 writes the run; at recorded steps every rank sends its micro-
batches (and their losses) to rank 0, which stores them as the step's micro-batches with their
weights divided by W. The replay then evaluates exactly the loss whose gradient DDP applied.

Each micro-batch travels with the RNG states its forward pass began with, so the replay evaluates
every rank's micro-batch from its own state (dropout replays under DDP on the CPU; a CUDA state is
that of the rank's own device).

Only tensors cross ranks (no pickle): each rank packs its batch leaves and RNG states into one byte
tensor and describes them in JSON, which travels as another byte tensor.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from trajscope import runformat as fmt

__all__ = ["collective_device", "gather_micro_batches", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) outside distributed training."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where a tensor sent through the default process group lives: NCCL moves only CUDA tensors;
    gloo and mpi take CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pack(micro: list[dict[str, Any]], rngs: list[dict[str, torch.Tensor] | None],
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tree, leaves = fmt.flatten_batch([m["batch"] for m in micro])
    # The RNG states follow the batch leaves: [[device key, leaf index], …] per micro-batch.
    rng_index = []
    for rng in rngs:
        rng_index.append([[key, len(leaves) + i] for i, key in enumerate(rng or {})])
        leaves += list((rng or {}).values())
    specs = []
    chunks = []
    offset = 0
    for leaf in leaves:
        t = leaf.detach().to(device).contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8,
                                                                             device=device)
        n = raw.numel()
        pad = -n % 8  # keep every leaf 8-byte aligned so rank 0 can view it in place
        specs.append([str(t.dtype).removeprefix("torch."), list(t.shape), offset, n])
        chunks.append(raw)
        if pad:
            chunks.append(torch.zeros(pad, dtype=torch.uint8, device=device))
        offset += n + pad
    desc = {
        "tree": tree,
        "leaves": specs,
        "weights": [m["weight"] for m in micro],
        "losses": [m["loss"] for m in micro],
        "rng": rng_index,
    }
    js = torch.frombuffer(bytearray(json.dumps(desc, allow_nan=True).encode()),
                          dtype=torch.uint8).to(device)
    data = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=device)
    return js, data


def _unpack(js: torch.Tensor, data: torch.Tensor) -> list[tuple[dict[str, Any], dict[str, torch.Tensor] | None]]:
    desc = json.loads(bytes(js.cpu().numpy()).decode())
    data = data.cpu()
    leaves = []
    for dtype, shape, offset, n in desc["leaves"]:
        raw = data[offset : offset + n]
        leaves.append(raw.view(getattr(torch, dtype)).reshape(shape) if n else
                      torch.empty(shape, dtype=getattr(torch, dtype)))
    rngs = [{key: leaves[i].clone() for key, i in index} or None for index in desc["rng"]]
    n_batch = len(leaves) - sum(len(index) for index in desc["rng"])
    batches = fmt.unflatten_batch(desc["tree"], leaves[:n_batch])
    return [
        ({"batch": b, "weight": w, "loss": loss}, rng)
        for b, w, loss, rng in zip(batches, desc["weights"], desc["losses"], rngs, strict=True)
    ]


def gather_micro_batches(micro: list[dict[str, Any]], rngs: list[dict[str, torch.Tensor] | None]
                         ) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor] | None]] | None:
    """Collective: every rank passes its micro-batches and the RNG states their forward passes
    began with (None where not seen); rank 0 gets all ranks', in rank order.

    Each item is ``{"batch", "weight", "loss"}`` with ``loss`` a float or None. Returned weights are
    the ranks' weights divided by the world size (DDP averages gradients). Other ranks get None.
    """
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    device = collective_device()
    js, data = _pack(micro, rngs, device)
    sizes = torch.tensor([js.numel(), data.numel()], dtype=torch.int64, device=device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    max_js = int(max(s[0] for s in all_sizes))
    max_data = int(max(s[1] for s in all_sizes))

    def padded(t: torch.Tensor, n: int) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.uint8, device=device)
        out[: t.numel()] = t
        return out

    js_list = [torch.empty(max_js, dtype=torch.uint8, device=device) for _ in range(world)] if rank == 0 else None
    data_list = [torch.empty(max_data, dtype=torch.uint8, device=device) for _ in range(world)] if rank == 0 else None
    dist.gather(padded(js, max_js), js_list, dst=0)
    dist.gather(padded(data, max_data), data_list, dst=0)
    if rank != 0:
        return None
    assert js_list is not None and data_list is not None
    out: list[dict[str, Any]] = []
    out_rngs: list[dict[str, torch.Tensor] | None] = []
    for r in range(world):
        n_js, n_data = (int(v) for v in all_sizes[r])
        for item, rng in _unpack(js_list[r][:n_js], data_list[r][:n_data]):
            item["weight"] = item["weight"] / world
            out.append(item)
            out_rngs.append(rng)
    return out, out_rngs
