"""Live analysis: training's step time with and without a follower (``rec.follow()``), and the
latency from a step's snapshot to its pair in ``metrics.nc``, measured in one run of this script.

Training: ``benchmarks.common:make_wide_mlp`` (~1.2M parameters) or the reference MLP, SGD+momentum
on synthetic batches, every step recorded, in a child process per case, the cases interleaved
(without a follower, with, without, with, ...). The follower is what ``rec.follow()`` starts:
``trajscope analyze RUN --follow`` in its own process at niceness +10, evaluating on the CPU the
training also uses, so on a small machine it takes what training leaves.

* step time: the median wall time of a training step (forward, backward, ``rec.batch``, the
  optimizer step with the recorder's capture), steps after the first 10; pairs (t, t+1) are
  recorded every ``--every`` steps (``Recorder(every=..., window=2)``); ``--pause`` makes the loop
  wait per step outside the model, as a loop waiting on data or on a GPU leaves its CPU idle;
* latency: for each pair t, the time it first appears in ``metrics.nc`` (polled every 0.25 s)
  minus the time step t+1's snapshot was renamed into place (its mtime); reported as the median
  and 90th percentile over the pairs that appeared while training ran, with how many did;
* catch-up: seconds from the end of training until the follower exits with every pair analyzed.

    python -m benchmarks.follow [--steps 1000] [--every 50] [--pause 0] [--batch 256] [--model wide|mlp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, machine

CHILD = r"""
import json, sys, time, torch
from benchmarks.common import ce_loss, make_mlp, make_wide_mlp
from trajscope.recorders import Recorder
run, model_name, follow = sys.argv[1], sys.argv[4], sys.argv[5] == "1"
steps, batch, every, pause = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[6]), float(sys.argv[7])
factory = make_wide_mlp if model_name == "wide" else make_mlp
torch.manual_seed(0)
model = factory().model
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
gen = torch.Generator().manual_seed(1)
d_in = model.hidden[0].in_features
times = []
with Recorder(run, model, opt, objective=f"benchmarks.common:{factory.__name__}", every=every, window=2) as rec:
    if follow:
        proc = rec.follow(log=run + ".follow.log")
        print(json.dumps({"follower": proc.pid}), flush=True)
    for _ in range(steps):
        x, y = torch.randn(batch, d_in, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = ce_loss(model, (x, y))
        loss.backward()
        rec.batch((x, y), loss=loss)
        opt.step()
        times.append(time.perf_counter() - t0)
        time.sleep(pause)  # what a loop waits per step outside the model (data, a GPU, logging)
print(json.dumps({"times": times, "end": time.time()}), flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _steps_in(metrics: Path) -> list[int]:
    import xarray as xr

    try:
        with xr.open_dataset(metrics) as ds:
            return [int(t) for t in ds["step"].values]
    except (OSError, ValueError, KeyError):
        return []


def one_case(work: Path, follow: bool, args: argparse.Namespace, i: int) -> dict[str, Any]:
    run = work / f"run-{'follow' if follow else 'plain'}-{i}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run), str(args.steps), str(args.batch),
                              args.model, "1" if follow else "0", str(args.every), str(args.pause)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    seen: dict[int, float] = {}
    metrics = run / "analysis" / "metrics.nc"
    follower = json.loads(child.stdout.readline())["follower"] if follow else None
    while child.poll() is None:
        if follow:
            for t in _steps_in(metrics):
                seen.setdefault(t, time.time())
        time.sleep(0.25)
    out, err = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"follow benchmark: training failed:\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    res: dict[str, Any] = {"step_s": statistics.median(result["times"][10:])}
    if follower is not None:
        t_end = result["end"]
        during = dict(seen)
        while _alive(follower):
            for t in _steps_in(metrics):
                seen.setdefault(t, time.time())
            time.sleep(0.25)
        res["catch_up_s"] = time.time() - t_end
        steps_dir = run / "steps"
        lat = [seen[t] - (steps_dir / f"step_{t + 1:08d}.safetensors").stat().st_mtime for t in sorted(during)]
        res.update({"pairs": len(list(steps_dir.iterdir())) // 2, "during": len(during),
                    "analyzed": len(_steps_in(metrics)),
                    "latency_median_s": statistics.median(lat) if lat else float("nan"),
                    "latency_p90_s": sorted(lat)[int(0.9 * (len(lat) - 1))] if lat else float("nan")})
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=50, help="record steps t, t+1 for t divisible by EVERY")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds the loop waits per step outside the model (data loading, a GPU)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model", choices=("wide", "mlp"), default="wide")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"# live analysis: {args.model} MLP, batch {args.batch}, {args.steps} steps, pairs recorded every "
          f"{args.every} steps, {args.pause} s pause per step; "
          f"{args.repeats} interleaved repeats")
    print(f"# {machine()}")
    plain, followed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            plain.append(one_case(Path(tmp), False, args, i))
            followed.append(one_case(Path(tmp), True, args, i))
    p = statistics.median(r["step_s"] for r in plain)
    f = statistics.median(r["step_s"] for r in followed)
    print(f"training step: {p * 1e3:.1f} ms without a follower, {f * 1e3:.1f} ms with one: ratio {f / p:.2f}")
    for i, r in enumerate(followed):
        print(f"follower {i}: {r['during']} of {r['pairs']} pairs analyzed while training ran; latency from "
              f"snapshot to metrics.nc median {r['latency_median_s']:.1f} s, p90 {r['latency_p90_s']:.1f} s; "
              f"all {r['analyzed']} pairs {r['catch_up_s']:.1f} s after training ended")


if __name__ == "__main__":
    main()
