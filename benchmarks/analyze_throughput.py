"""The analyzer against a minimal hand-written loop doing the same evaluations on the same pairs.

Both probe the same recorded pairs of the reference MLP (~100k parameters, minibatch 64, every
step recorded) on the same device with the same batched line evaluation (K = 17 α points), the
two gradients, the loss at the reference point and the same per-layer float64 inner products.
The analyzer also plans the dask graph, persists every pair, computes the metrics and writes the
Dataset (each repeat starts from an empty ``analysis/``); the hand loop does none of that
(benchmarks/hand_loop.py).
Reported: median times over interleaved repeats and their ratio (target ≤ 1.25 on CPU).

    python -m benchmarks.analyze_throughput [--device cpu|cuda] [--pairs 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

import trajscope
from benchmarks.common import FACTORIES, interleaved, machine, median, ratio_line, record_run, set_clock
from benchmarks.hand_loop import hand_loop
from trajscope.probe import alpha_grid


def run_case(run_dir: Path, model: str, pairs: int, device: str, repeats: int, points: int,
             scheduler: str = "synchronous", workers: int | None = None) -> dict[str, list[float]]:
    alphas = [float(a) for a in alpha_grid(points, 0.5)]
    steps = list(range(pairs))
    net = FACTORIES[model]().model

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def fresh() -> None:  # each repeat is a first analysis (no pair to resume, no file to replace)
        shutil.rmtree(run_dir / "analysis", ignore_errors=True)

    def analyzer() -> None:
        trajscope.analyze(run_dir, points=points, device=device, steps=f"0:{pairs}",
                          progress=False, scheduler=scheduler, workers=workers)
        sync()

    def analyzer_in_memory() -> None:
        trajscope.analyze(run_dir, points=points, device=device, steps=f"0:{pairs}", write=False,
                          progress=False, scheduler=scheduler, workers=workers)
        sync()

    def loop() -> None:
        hand_loop(run_dir, net, steps, alphas, device)
        sync()

    # Same numbers first: otherwise the comparison means nothing.
    ds = trajscope.analyze(run_dir, points=points, device=device, steps=f"0:{pairs}", write=False,
                           progress=False)
    ref = hand_loop(run_dir, net, steps, alphas, device)
    def rel(got: np.ndarray, want: np.ndarray) -> float:
        return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

    ell = np.stack([r["loss_line"] for r in ref])
    smooth = np.array([np.sqrt(np.sum(r["terms"]["dG.dG"]) / np.sum(r["terms"]["delta.delta"]))
                       for r in ref])
    print(f"  same numbers: loss_line max rel diff {rel(ds.loss_line.values, ell):.1e}, "
          f"inst_smoothness {rel(ds.inst_smoothness.values, smooth):.1e}")
    return interleaved({"analyzer": (fresh, analyzer), "analyzer, no writes": analyzer_in_memory,
                        "hand loop": loop}, repeats)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--points", type=int, default=9, help="points on [0, 1]; K = 2·points − 1")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", default="mlp", choices=sorted(FACTORIES))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--clock", default="wall", help="wall, or cpu (process CPU time)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    set_clock(args.clock)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("analyze_throughput: CUDA is not available here; skipped")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trajscope-bench-"))
    run_dir = record_run(work / f"thr-{args.model}-b{args.batch_size}", args.pairs,
                         batch_size=args.batch_size, model=args.model)
    k = len(alpha_grid(args.points, 0.5))
    print(f"# analyzer vs hand loop: {args.model} model, batch {args.batch_size}, {args.pairs} pairs, "
          f"K = {k}, device {args.device}")
    print(f"# {machine()}")
    t = run_case(run_dir, args.model, args.pairs, args.device, args.repeats, args.points)
    print(ratio_line("analyzer / hand loop", t["analyzer"], t["hand loop"], "  (target <= 1.25)"))
    print(ratio_line("analyzer without writes / hand loop", t["analyzer, no writes"], t["hand loop"]))
    print(f"  per pair: analyzer {median(t['analyzer']) / args.pairs * 1e3:.2f} ms, "
          f"hand loop {median(t['hand loop']) / args.pairs * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
