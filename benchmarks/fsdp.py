"""Recording under FSDP2: what the recorder adds to a training step, and the bytes each rank
writes, measured in one ``torchrun`` job.

Training: ``benchmarks.common.MLP`` (hidden 768 by default: 0.70M parameters), each Linear
and the root wrapped with ``fully_shard``, AdamW, ``clip_grad_norm_``, synthetic batches (each
rank its own), on ``--nproc`` gloo ranks on the CPU (``--backend nccl`` on GPUs). In one process
group the script runs, interleaved ``--repeats`` times, ``--steps`` steps each of:

* **plain**: FSDP2 training, no recorder;
* **recorded**: the same loop inside ``Recorder(...)`` recording every step (each rank writes its
  own shard: ``docs/recording.md``);
* **gathered**: the same loop without a recorder, gathering every parameter and gradient
  (``full_tensor()``) each step: what recording the whole model from FSDP costs in communication
  alone, before any write.

It prints the median step time of each (after the first 5 steps of a block), the ratios against
plain, and the bytes each rank wrote per recorded step next to the bytes of the whole model's
parameters and gradients.

    python -m benchmarks.fsdp [--nproc 2] [--steps 60] [--repeats 3] [--batch 256] [--hidden 768]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, machine

WORKER = r"""
import json, os, sys, time, torch, torch.distributed as dist
from pathlib import Path
from torch.distributed.fsdp import fully_shard
from benchmarks.common import MLP, ce_loss
from trajscope import runformat as fmt
from trajscope.recorders import Recorder

out, steps, repeats, batch, hidden, backend = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
torch.manual_seed(0)
model = MLP(hidden=hidden).to(device)
for m in model.modules():
    if isinstance(m, torch.nn.Linear):
        fully_shard(m)
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
gen = torch.Generator().manual_seed(1 + rank)
d_in = model.hidden[0].in_features

def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()

def block(kind, rec=None):
    times = []
    for _ in range(steps):
        x = torch.randn(batch, d_in, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = ce_loss(model, (x, y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if rec is not None:
            rec.batch((x, y), loss=loss)
        if kind == "gathered":
            whole = [p.full_tensor() for p in model.parameters()] + [p.grad.full_tensor() for p in model.parameters()]
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    return times[5:]

result = {"plain": [], "recorded": [], "gathered": [], "bytes": None}
for i in range(repeats):
    result["plain"] += block("plain")
    run = f"{out}/run{i}"
    with Recorder(run, model, opt, objective="benchmarks.common:make_wide_mlp") as rec:
        result["recorded"] += block("recorded", rec)
    dist.barrier()
    if i == 0:
        mine = Path(run) / (fmt.STEPS_DIR if rank == 0 else fmt.SHARDS_DIR)
        files = sorted(mine.glob("step_*.rank_%05d.safetensors" % rank if rank else "step_*.safetensors"))
        result["bytes"] = [f.stat().st_size for f in files[:-1]]  # the recorded steps (not the final state)
        result["stats"] = {"snapshots": rec.stats.snapshots, "copy_s": rec.stats.copy_seconds,
                           "wait_s": rec.stats.wait_seconds, "hook_s": rec.stats.hook_seconds}
    result["gathered"] += block("gathered")
n_param = sum(p.numel() * p.element_size() for p in model.parameters())
result["model_bytes"] = 2 * n_param  # parameters and gradients, whole
print("RESULT " + json.dumps({"rank": rank, **result}), flush=True)
dist.destroy_process_group()
os._exit(0)  # gloo's threads can abort an interpreter's teardown under load; everything is written
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60, help="steps per block (the first 5 are not timed)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    args = ap.parse_args(argv)
    print(f"# FSDP2 recording: MLP hidden {args.hidden}, batch {args.batch} per rank, {args.nproc} {args.backend} "
          f"ranks, {args.repeats} x {args.steps} steps per case, interleaved")
    print(f"# {machine()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_addr",
             "127.0.0.1", "--master_port", str(port), str(script), tmp, str(args.steps), str(args.repeats),
             str(args.batch), str(args.hidden), args.backend], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fsdp benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    ranks = sorted((json.loads(line.removeprefix("RESULT ")) for line in proc.stdout.splitlines()
                    if line.startswith("RESULT ")), key=lambda r: r["rank"])
    # A step ends when the slowest rank's does: the ranks' medians, the largest.
    med = {k: max(statistics.median(r[k]) for r in ranks) for k in ("plain", "recorded", "gathered")}
    p = med["plain"]
    print(f"step time: plain {p * 1e3:.1f} ms; recorded {med['recorded'] * 1e3:.1f} ms (ratio "
          f"{med['recorded'] / p:.2f}, +{(med['recorded'] - p) * 1e3:.1f} ms); gathering the whole model "
          f"{med['gathered'] * 1e3:.1f} ms (ratio {med['gathered'] / p:.2f})")
    whole = ranks[0]["model_bytes"]
    for r in ranks:
        per_step = statistics.median(r["bytes"])
        st = r["stats"]
        n = st["snapshots"]
        print(f"rank {r['rank']}: writes {per_step / 1e6:.2f} MB per recorded step ({per_step / whole:.2f} of the "
              f"whole model's parameters and gradients, {whole / 1e6:.2f} MB); copy {st['copy_s'] / n * 1e3:.2f}"
              f" ms, waited for the disk {st['wait_s'] / st['snapshots'] * 1e3:.2f} ms, all the recorder's calls on "
              f"the training thread {st['hook_s'] / st['snapshots'] * 1e3:.2f} ms per recorded step")


if __name__ == "__main__":
    main()
