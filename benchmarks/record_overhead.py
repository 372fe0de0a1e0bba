"""What recording costs training: the issue's reference workload, with and without the recorder.

Workload: an MLP 512-1024-1024-10 (1.59M parameters), batch 1024, plain SGD, on the CPU. Each
configuration trains in blocks of ``--steps`` timed steps (after 2 untimed warm-up steps that let
the recorder allocate its buffers), and the blocks of all configurations are interleaved in a
shuffled order, round after round, in one process, so machine noise hits every configuration
alike. A block's time includes waiting for the writer to finish the block's snapshots
(``Recorder.flush``): asynchronous work is not hidden past the end of the timed region.

Reported per configuration (medians over rounds):

* ``ratio``: block time / the plain block of the same round;
* ``added ms/recorded step``: (time − plain time) per recorded step;
* ``copy ms`` / ``wait ms`` / ``write ms`` per snapshot (``Recorder.stats``): training-thread copy,
  training-thread wait for a free buffer (back-pressure), background write;
* bytes per recorded step;

and the physical floor: one plain in-memory copy (``numpy.copyto`` into a preallocated buffer) of
the tensors a recorded step holds (parameters, gradients, the minibatch).

Run: ``python benchmarks/record_overhead.py [--rounds 5] [--steps 20] [--json out.json]``.
Numbers and their discussion: ``docs/performance.md``, section "Recording overhead".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trajscope.recorders import At, Recorder

WARMUP = 2
NEVER = At([10**12])  # attached, rec.batch called every step, nothing ever recorded

COPY_FLOOR = {"copy floor": True}  # marker: no recorder, just the floor's copy at every step

CONFIGS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "copy floor": COPY_FLOOR,
    "idle safetensors": {"schedule": NEVER},
    "every=1 safetensors": {"every": 1},
    "every=10 window=2 safetensors": {"every": 10, "window": 2},
    "idle hdf5": {"schedule": NEVER, "format": "hdf5"},
    "every=1 hdf5": {"every": 1, "format": "hdf5"},
    "every=10 window=2 hdf5": {"every": 10, "window": 2, "format": "hdf5"},
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10))


def run_block(cfg: dict[str, Any] | None, model: nn.Module, opt: torch.optim.Optimizer,
              data: tuple[torch.Tensor, torch.Tensor], steps: int, workdir: Path
              ) -> tuple[float, dict[str, float], int]:
    """Train WARMUP + ``steps`` steps; return (timed seconds, recorder stats, recorded steps)."""
    x, y = data
    rec = None
    hook = None
    if cfg is COPY_FLOOR:
        # The physical floor measured inside training: one plain copy of the step's bytes into a
        # preallocated buffer, at the moment the recorder copies (the optimizer's pre-step hook).
        copier = _FloorCopy(model, data)
        hook = opt.register_step_pre_hook(lambda *_: copier.copy())
    elif cfg is not None:
        rec = Recorder(workdir / "run", model, opt, overwrite=True, **cfg)
        rec.start()
    recorded_before = 0
    t0 = 0.0
    for i in range(WARMUP + steps):
        if i == WARMUP:
            if rec is not None:
                rec.flush()
                recorded_before = rec.stats.snapshots
                base = (rec.stats.copy_seconds, rec.stats.wait_seconds, rec.stats.write_seconds)
            t0 = time.perf_counter()
            c0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if rec is not None:
            rec.batch((x, y), loss=loss)
        opt.step()
    if rec is not None:
        rec.flush()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if hook is not None:
        hook.remove()
    stats: dict[str, float] = {"cpu_s": cpu}
    recorded = 0
    if rec is not None:
        s = rec.stats
        recorded = s.snapshots - recorded_before
        stats |= {
            "copy_s": s.copy_seconds - base[0],
            "wait_s": s.wait_seconds - base[1],
            "write_s": s.write_seconds - base[2],
            "bytes_per_snapshot": s.bytes / max(s.snapshots, 1),
        }
        rec.close()
        shutil.rmtree(workdir / "run")
        os.sync()  # let the kernel settle buffered writes outside any timed region
    elif cfg is COPY_FLOOR:
        recorded = steps
    return elapsed, stats, recorded


class _FloorCopy:
    """Copies parameters, gradients and the minibatch into one preallocated buffer (numpy)."""

    def __init__(self, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.params = list(model.parameters())
        self.data = data
        total = sum(p.numel() * p.element_size() for p in self.params) * 2
        total += sum(t.numel() * t.element_size() for t in data)
        self.buf = np.empty(total, dtype=np.uint8)
        self.buf[:] = 0  # touch the pages once, as the recorder's reused buffers are

    def copy(self) -> None:
        srcs = [p.detach() for p in self.params] + [p.grad for p in self.params] + list(self.data)
        off = 0
        for t in srcs:
            a = t.numpy()
            np.copyto(self.buf[off : off + a.nbytes].view(a.dtype).reshape(a.shape), a)
            off += a.nbytes


def physical_floor(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
                   repeats: int = 50) -> tuple[float, float, int]:
    """Median seconds of one in-memory copy of a recorded step's tensors (per-tensor copies into
    one preallocated buffer, and a single flat memcpy of the same byte count), and that count."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = data
    F.cross_entropy(model(x), y).backward()
    tensors = [p.detach() for p in model.parameters()] + [p.grad for p in model.parameters()] + [x, y]
    sizes = [t.numel() * t.element_size() for t in tensors]
    total = sum(sizes)
    dst = np.empty(total, dtype=np.uint8)
    views = []
    off = 0
    for t, n in zip(tensors, sizes):
        views.append((dst[off : off + n].view(t.numpy().dtype).reshape(t.shape), t.numpy()))
        off += n
    flat_src = np.random.default_rng(0).integers(0, 255, total, dtype=np.uint8)
    per_tensor, flat = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d, s in views:
            np.copyto(d, s)
        per_tensor.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.copyto(dst, flat_src)
        flat.append(time.perf_counter() - t0)
    del opt
    return statistics.median(per_tensor), statistics.median(flat), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per block (multiple of 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--dir", type=Path, default=None, help="where runs are written (a local disk)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    ap.add_argument("--json", type=Path, default=None, help="write every measurement here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",")]
    if "plain" not in names:
        names.insert(0, "plain")
    workdir = Path(tempfile.mkdtemp(prefix="trajscope-bench-", dir=args.dir))
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(1024, 512, generator=g), torch.randint(0, 10, (1024,), generator=g))
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    n_params = sum(p.numel() for p in model.parameters())
    floor_s, flat_s, floor_bytes = physical_floor(make_model(), data)
    print(f"model {n_params:,} parameters; batch 1024; torch threads {torch.get_num_threads()}; "
          f"runs in {workdir}")
    print(f"physical floor: {floor_bytes / 1e6:.2f} MB per recorded step; one copy "
          f"{floor_s * 1e3:.2f} ms (per tensor), {flat_s * 1e3:.2f} ms (one flat memcpy)")

    rng = random.Random(args.seed)
    blocks: dict[str, list[float]] = {n: [] for n in names}
    extra: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    recorded: dict[str, int] = {}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    # one untimed block per configuration first: first-touch costs (file creation, page cache)
    for n in names:
        run_block(CONFIGS[n], model, opt, data, 10, workdir)
    for r in range(args.rounds):
        order = names[:]
        rng.shuffle(order)
        this_round = {}
        for n in order:
            t, stats, rec_steps = run_block(CONFIGS[n], model, opt, data, args.steps, workdir)
            blocks[n].append(t)
            extra[n].append(stats)
            recorded[n] = rec_steps
            this_round[n] = t
        for n in names:
            ratios[n].append(this_round[n] / this_round["plain"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {this_round[n] / args.steps * 1e3:.0f} ms/step" for n in names))
    shutil.rmtree(workdir, ignore_errors=True)

    plain = statistics.median(blocks["plain"])
    print()
    print(f"plain: {plain / args.steps * 1e3:.1f} ms/step (median of {args.rounds} blocks of "
          f"{args.steps} steps)")
    print()
    print("| configuration | wall ratio (median) | wall ratio range | best-block ratio | "
          "CPU ratio | added ms / recorded step | copy ms | wait ms | write ms | "
          "MB / recorded step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    summary = {}
    for n in names:
        if n == "plain":
            continue
        med = statistics.median(ratios[n])
        k = recorded.get(n, 0)
        added = (statistics.median(blocks[n]) - plain) / k * 1e3 if k else float("nan")
        per = {key: statistics.median(e.get(key, 0.0) for e in extra[n]) for key in
               ("cpu_s", "copy_s", "wait_s", "write_s", "bytes_per_snapshot")}
        rec_k = k if n != "copy floor" else 0
        copy_ms = per["copy_s"] / rec_k * 1e3 if rec_k else 0.0
        wait_ms = per["wait_s"] / rec_k * 1e3 if rec_k else 0.0
        write_ms = per["write_s"] / rec_k * 1e3 if rec_k else 0.0
        mb = per["bytes_per_snapshot"] / 1e6 if rec_k else 0.0
        cpu_ratio = statistics.median(
            e["cpu_s"] / p["cpu_s"] for e, p in zip(extra[n], extra["plain"]))
        best = min(blocks[n]) / min(blocks["plain"])
        summary[n] = {"ratio": med, "ratios": ratios[n], "best_block_ratio": best,
                      "cpu_ratio": cpu_ratio, "added_ms_per_recorded_step": added,
                      "recorded_steps_per_block": k, "copy_ms": copy_ms, "wait_ms": wait_ms,
                      "write_ms": write_ms, "mb_per_recorded_step": mb}
        print(f"| {n} | {med:.3f} | {min(ratios[n]):.3f}–{max(ratios[n]):.3f} | {best:.3f} | "
              f"{cpu_ratio:.3f} | " + (f"{added:.1f}" if k else "–") + f" | {copy_ms:.2f} | "
              f"{wait_ms:.2f} | {write_ms:.2f} | " + (f"{mb:.2f}" if rec_k else "–") + " |")
    print()
    print(f"floor: {floor_s * 1e3:.2f} ms per recorded step; 2x floor = {2 * floor_s * 1e3:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps({
            "threads": torch.get_num_threads(), "steps_per_block": args.steps,
            "rounds": args.rounds, "plain_ms_per_step": plain / args.steps * 1e3,
            "floor_ms": floor_s * 1e3, "flat_copy_ms": flat_s * 1e3, "floor_bytes": floor_bytes,
            "blocks_s": blocks, "summary": summary,
        }, indent=2))


if __name__ == "__main__":
    main()
