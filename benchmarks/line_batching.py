"""Batched vs point-by-point line evaluation (ℓ(α) and ℓ'(α) at K points by jvp).

Times trajscope's own ``_line`` on one recorded pair of the reference MLP (~100k parameters) with
``batched=True`` (all K points in one vmap over stacked parameters) and ``batched=False`` (one jvp
per point), interleaved, for a few minibatch sizes, and checks that both give the same numbers.

    python -m benchmarks.line_batching [--device cpu|cuda] [--points 9] [--repeats 15]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from benchmarks.common import interleaved, machine, median, ratio_line, record_run, set_clock
from trajscope.probe import ProbeSettings, alpha_grid
from trajscope.probe.line import _line
from trajscope.probe.stages import _Bound, _to


def line_case(run_dir: Path, factory: str, device: str, points: int, batched: bool):
    import trajscope
    from benchmarks import common

    run = trajscope.open_run(run_dir)
    snap, nxt = run.snapshot(3), run.snapshot(4)
    obj = getattr(common, factory)()
    model = obj.model.to(device)
    bound = _Bound(model, obj.loss)
    dt = torch.float32
    x0 = {n: _to(t, device, dt) for n, t in snap.params.items()}
    delta = {n: _to(nxt.params[n], device, dt) - x0[n] for n in x0}
    batch = tuple(_to(b, device, dt) for b in snap.batch)
    alphas = torch.tensor(alpha_grid(points, 0.5), dtype=dt, device=device)
    settings = ProbeSettings(alphas=tuple(alphas.tolist()), device=device, batched=batched)

    def f(p):
        return functional_call(bound, {f"model.{n}": v for n, v in p.items()}, (batch,)).reshape(())

    def run_once():
        out = _line(f, x0, delta, alphas, settings, {}, False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return run_once


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--points", type=int, default=9, help="points on [0, 1]; margin 0.5 → K = 2·points − 1")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch-sizes", default="16,64,256")
    ap.add_argument("--model", default="mlp", choices=["mlp", "wide"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--allocator", default="keep", choices=["keep", "default"],
                    help="keep: glibc keeps freed memory, as the analyzer sets it in its workers "
                    "(trajscope.analysis.process.keep_freed_memory); default: glibc's own settings")
    ap.add_argument("--clock", default="wall", help="wall, or cpu (process CPU time: robust on a "
                    "shared machine)")
    args = ap.parse_args(argv)
    set_clock(args.clock)
    torch.set_num_threads(args.threads)
    if args.allocator == "keep":
        from trajscope.analysis.process import keep_freed_memory

        keep_freed_memory()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("line_batching: CUDA is not available here; skipped")
        return
    factory = {"mlp": "make_mlp", "wide": "make_wide_mlp"}[args.model]
    k = len(alpha_grid(args.points, 0.5))
    print(f"# line batching, {args.model} model, K = {k}, device {args.device}, "
          f"allocator {args.allocator}")
    print(f"# {machine()}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trajscope-bench-"))
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        run_dir = record_run(work / f"line-{args.model}-b{bs}", 6, batch_size=bs, model=args.model)
        cases = {
            "batched": line_case(run_dir, factory, args.device, args.points, True),
            "pointwise": line_case(run_dir, factory, args.device, args.points, False),
        }
        a, b = cases["batched"](), cases["pointwise"]()
        err = max(float(np.max(np.abs(a[0] - b[0]) / np.maximum(np.abs(b[0]), 1e-30))),
                  float(np.max(np.abs(a[1] - b[1])) / np.max(np.abs(b[1]))))
        t = interleaved(cases, args.repeats)
        print(ratio_line(f"batch {bs:>4}: pointwise / batched", t["pointwise"], t["batched"],
                         f"  [max rel diff {err:.1e}]"))
        print(f"  per point: batched {median(t['batched']) / k * 1e3:.3f} ms, "
              f"pointwise {median(t['pointwise']) / k * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
