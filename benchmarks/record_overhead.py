"""What recording costs training: the reference recording workload, with and without the recorder.

Workload: an MLP 512-1024-1024-10 (1.59M parameters), batch 1024, plain SGD, on the CPU. Each
configuration trains in blocks of ``--steps`` timed steps (after WARMUP = 10 untimed steps that let
the recorder allocate its buffers), and the blocks of all configurations are interleaved in a
shuffled order, round after round, in one process, so machine noise hits every configuration
alike. A block's time includes waiting for the writer to finish the block's snapshots
(``Recorder.flush``): asynchronous work is not hidden past the end of the timed region.

Reported per configuration:

* wall ratio: block time / the plain block run right before or after it, median over rounds;
* quiet-machine ratio: the 10th percentile of the configuration's 10-step cycle times over the
  plain one's (on a shared machine contention only adds time; the low tail is the machine alone);
* CPU-time ratio: process CPU time of the block over the adjacent plain block's;
* ``Recorder.stats`` per recorded step: time the training thread spent in the recorder (wall and
  CPU; copies included), of which copying and waiting for a free buffer (back-pressure), and the
  background writer's wall and CPU time;
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

WARMUP = 10  # untimed steps first: buffers allocated, and timing starts at a recorded step
CYCLE = 10  # every=10 repeats every 10 steps: blocks are timed in 10-step cycles
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
              ) -> tuple[float, dict[str, float], int, list[float]]:
    """Train WARMUP + ``steps`` steps; return (timed seconds, recorder stats, recorded steps,
    seconds of each 10-step cycle).

    Timing starts at step WARMUP = 10, a recorded step of every=10/window=2, so each cycle holds
    its recorded steps first and the background writes they cause; the last cycle includes the
    final flush.
    """
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
    marks: list[float] = []
    for i in range(WARMUP + steps):
        if i > WARMUP and (i - WARMUP) % CYCLE == 0:
            marks.append(time.perf_counter())
        if i == WARMUP:
            if hook is not None:
                copier.started = True
            if rec is not None:
                rec.flush()
                recorded_before = rec.stats.snapshots
                st0 = rec.stats
                base = (st0.copy_seconds, st0.wait_seconds, st0.write_seconds, st0.hook_seconds,
                        st0.hook_cpu_seconds, st0.write_cpu_seconds)
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
    t_end = time.perf_counter()
    elapsed = t_end - t0
    cpu = time.process_time() - c0
    edges = [t0, *marks, t_end]
    cycles = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
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
            "hook_s": s.hook_seconds - base[3],
            "hook_cpu_s": s.hook_cpu_seconds - base[4],
            "write_cpu_s": s.write_cpu_seconds - base[5],
            "bytes_per_snapshot": s.bytes / max(s.snapshots, 1),
        }
        rec.close()
        shutil.rmtree(workdir / "run")
        os.sync()  # let the kernel settle buffered writes outside any timed region
    elif cfg is COPY_FLOOR:
        recorded = steps
        stats |= {"hook_s": copier.seconds, "hook_cpu_s": copier.cpu_seconds}
    return elapsed, stats, recorded, cycles


class _FloorCopy:
    """Copies parameters, gradients and the minibatch into one preallocated buffer (numpy)."""

    def __init__(self, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.params = list(model.parameters())
        self.data = data
        total = sum(p.numel() * p.element_size() for p in self.params) * 2
        total += sum(t.numel() * t.element_size() for t in data)
        self.buf = np.empty(total, dtype=np.uint8)
        self.buf[:] = 0  # touch the pages once, as the recorder's reused buffers are

        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.started = False

    def copy(self) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        srcs = [p.detach() for p in self.params] + [p.grad for p in self.params] + list(self.data)
        off = 0
        for t in srcs:
            a = t.numpy()
            np.copyto(self.buf[off : off + a.nbytes].view(a.dtype).reshape(a.shape), a)
            off += a.nbytes
        if self.started:  # the warm-up steps are not counted, as for the recorder
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.thread_time() - c0


def wait_for_quiet(threshold: float, timeout: float = 900.0) -> float:
    """On a shared Linux machine, wait until other processes use less than ``threshold`` of the
    CPUs (sampled over 1 s from /proc/stat while this process is idle); return the seconds waited."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:9]]
        return sum(vals), vals[3] + vals[4]

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        total0, idle0 = sample()
        time.sleep(1.0)
        total1, idle1 = sample()
        busy = 1 - (idle1 - idle0) / max(total1 - total0, 1)
        if busy < threshold:
            break
    return time.perf_counter() - t0


def _p10(values: list[float]) -> float:
    """10th percentile: the machine is shared, and contention only ever adds time, so the low
    tail of many short, interleaved cycles estimates what each configuration costs on a quiet
    machine (the median mixes in whoever else was running)."""
    v = sorted(values)
    return v[min(len(v) - 1, int(0.1 * (len(v) - 1) + 0.5))]


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
    for t, n in zip(tensors, sizes, strict=True):
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
    ap.add_argument("--quiet", type=float, default=None, metavar="FRACTION",
                    help="shared machine: before each pair of blocks, wait until other processes "
                         "use less than this fraction of the CPUs (Linux)")
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
    others = [n for n in names if n != "plain"]
    blocks: dict[str, list[float]] = {n: [] for n in names}
    extra: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    recorded: dict[str, int] = {}
    pairs: dict[str, list[tuple[float, float, dict[str, float], dict[str, float]]]] = {
        n: [] for n in others}
    cycles: dict[str, list[float]] = {n: [] for n in names}
    # one untimed block per configuration first: first-touch costs (file creation, page cache)
    for n in names:
        run_block(CONFIGS[n], model, opt, data, CYCLE, workdir)
    waited = 0.0
    for r in range(args.rounds):
        order = others[:]
        rng.shuffle(order)
        line = []
        for n in order:
            # A plain block right next to every configuration's block (in random order): the load
            # of this shared machine drifts over seconds, so only adjacent blocks compare.
            pair = ["plain", n]
            rng.shuffle(pair)
            if args.quiet is not None:
                waited += wait_for_quiet(args.quiet)
            got = {}
            for m in pair:
                t, stats, k, cyc = run_block(CONFIGS[m], model, opt, data, args.steps, workdir)
                got[m] = (t, stats)
                cycles[m].extend(cyc)
                blocks[m].append(t)
                extra[m].append(stats)
                if m != "plain":
                    recorded[m] = k
            pairs[n].append((got[n][0], got["plain"][0], got[n][1], got["plain"][1]))
            line.append(f"{n} {got[n][0] / got['plain'][0]:.3f}")
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(line), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    if args.quiet is not None:
        print(f"waited {waited:.0f} s in total for the machine to be quiet")

    plain_ms = statistics.median(blocks["plain"]) / args.steps * 1e3
    print()
    print(f"plain: median {plain_ms:.1f} ms/step, p10 of cycles "
          f"{_p10(cycles['plain']) / CYCLE * 1e3:.1f} ms/step ({len(blocks['plain'])} blocks "
          f"of {args.steps} steps)")
    print()
    print("| configuration | wall ratio, median of adjacent pairs (range) | quiet-machine ratio "
          "(p10 of 10-step cycles) | CPU-time ratio | recorder on the training thread, ms per "
          "recorded step (wall / CPU) | of which copy / wait, ms | writer, ms per recorded step "
          "(wall / CPU) | MB per recorded step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    summary = {}
    for n in others:
        ratios = [c / p for c, p, _, _ in pairs[n]]
        cpu_ratios = [cs["cpu_s"] / ps["cpu_s"] for _, _, cs, ps in pairs[n]]
        k = recorded.get(n, 0)
        denom = k if k else args.steps  # idle: per step
        med = {key: statistics.median(e.get(key, 0.0) for e in extra[n]) for key in
               ("hook_s", "hook_cpu_s", "copy_s", "wait_s", "write_s", "write_cpu_s",
                "bytes_per_snapshot")}
        per = {key: v / denom * 1e3 for key, v in med.items() if key != "bytes_per_snapshot"}
        mb = med["bytes_per_snapshot"] / 1e6 if k and n != "copy floor" else 0.0
        quiet = _p10(cycles[n]) / _p10(cycles["plain"])
        summary[n] = {
            "wall_ratio_median": statistics.median(ratios), "wall_ratios": ratios,
            "quiet_ratio_p10_cycles": quiet, "min_cycle_ratio": min(cycles[n]) / min(cycles["plain"]),
            "cpu_ratio_median": statistics.median(cpu_ratios),
            "recorded_steps_per_block": k, "per_recorded_step_ms": per,
            "mb_per_recorded_step": mb,
        }
        unit = "" if k else " (per step)"
        print(f"| {n} | {statistics.median(ratios):.3f} ({min(ratios):.2f}–{max(ratios):.2f}) | "
              f"{quiet:.3f} | {statistics.median(cpu_ratios):.3f} | "
              f"{per['hook_s']:.2f} / {per['hook_cpu_s']:.2f}{unit} | "
              f"{per['copy_s']:.2f} / {per['wait_s']:.2f} | "
              f"{per['write_s']:.2f} / {per['write_cpu_s']:.2f} | "
              + (f"{mb:.2f}" if mb else "–") + " |")
    print()
    # Each storage's recording ratios beside its idle recorder's: the idle recorder costs next to
    # nothing, so how far its ratio strays from 1 is this run's noise floor.
    for storage in ("safetensors", "hdf5"):
        idle = f"idle {storage}"
        recording = [n for n in others if n.endswith(" " + storage) and n != idle]
        if idle in summary and recording:
            print(f"{storage}: " + ", ".join(
                f"{n.removesuffix(' ' + storage)} {summary[n]['wall_ratio_median']:.3f}" for n in recording)
                + f" (median ratios); idle {summary[idle]['wall_ratio_median']:.3f} (this run's noise floor)")
    print(f"physical floor (isolated): {floor_s * 1e3:.2f} ms per recorded step "
          f"({floor_bytes / 1e6:.2f} MB); 2x floor = {2 * floor_s * 1e3:.2f} ms")
    # The last overhead target, in its own units: what one recorded step adds to training.
    for n in others:
        k = recorded.get(n, 0)
        if not k or n == "copy floor":
            continue
        adj = statistics.median((c - p) / k for c, p, _, _ in pairs[n]) * 1e3
        quiet = (_p10(cycles[n]) - _p10(cycles["plain"])) / (k * CYCLE / args.steps) * 1e3
        print(f"{n}: a recorded step adds {adj:.2f} ms (median of adjacent pairs), {quiet:.2f} ms "
              f"(quiet machine) = {adj / floor_s / 1e3:.1f}x / {quiet / floor_s / 1e3:.1f}x the "
              "isolated floor (target <= 2x)")
    if "copy floor" in others:
        fl = statistics.median((c - p) / args.steps for c, p, _, _ in pairs["copy floor"]) * 1e3
        print(f"copy floor: the same copy inside training adds {fl:.2f} ms per step")
    if args.json:
        args.json.write_text(json.dumps({
            "threads": torch.get_num_threads(), "steps_per_block": args.steps,
            "rounds": args.rounds, "plain_ms_per_step_median": plain_ms,
            "floor_ms": floor_s * 1e3, "flat_copy_ms": flat_s * 1e3, "floor_bytes": floor_bytes,
            "blocks_s": blocks, "cycles_s": cycles, "summary": summary,
        }, indent=2))


if __name__ == "__main__":
    main()
