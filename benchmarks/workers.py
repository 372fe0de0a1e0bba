"""1 vs 2 (or N) process workers on a CPU-bound model.

Times ``trajscope.analyze(..., scheduler="processes", workers=W)`` end to end (worker start-up
included: a fresh pool per analysis) on the reference MLP, interleaving the worker counts, and also
the steady-state rate (pairs per second between the first and the last finished pair, which leaves
out the start-up). Torch threads per worker are trajscope's default split
(``trajscope.analysis.execution.split_cores``: the cores less one for the driver, divided between the
workers; one each when there are as many workers as cores), or ``--threads-per-worker``.
The synchronous analyzer with 1 and with all intra-op threads is shown for reference.

    python -m benchmarks.workers [--workers 1,2] [--pairs 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

import trajscope
import trajscope.analysis.driver as analysis
from benchmarks.common import machine, median, record_run


class _Timestamps(analysis._Progress):
    """The analyzer's progress hook, recording when each pair finishes (no bar)."""

    stamps: list[float] = []

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        super().__init__(total, done, False)
        _Timestamps.stamps = []

    def pair_done(self) -> None:
        _Timestamps.stamps.append(time.perf_counter())


def one(run_dir: Path, pairs: int, points: int, threads_per_worker: int | None = None,
        **kw: object) -> tuple[float, float]:
    """(wall seconds, steady-state pairs per second) of one fresh analysis."""
    from trajscope.analysis import execution

    real = execution.usable_cores
    if threads_per_worker and kw.get("workers"):
        # present the cores for which trajscope's split gives each worker T threads
        w = int(kw["workers"])  # type: ignore[call-overload]
        cores = w if threads_per_worker == 1 else w * threads_per_worker + 1
        execution.usable_cores = lambda: cores  # type: ignore[assignment]
    try:
        return _one(run_dir, pairs, points, **kw)
    finally:
        execution.usable_cores = real


def _one(run_dir: Path, pairs: int, points: int, **kw: object) -> tuple[float, float]:
    shutil.rmtree(run_dir / "analysis", ignore_errors=True)
    t0 = time.perf_counter()
    trajscope.analyze(run_dir, steps=f"0:{pairs}", points=points, device="cpu", progress=False, **kw)
    wall = time.perf_counter() - t0
    s = _Timestamps.stamps
    rate = (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 and s[-1] > s[0] else float("nan")
    return wall, rate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--points", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", default="mlp", choices=["mlp", "wide"],
                    help="mlp: the reference ~100k-parameter MLP; wide: ~1.2M parameters, ~10x the "
                         "work per pair")
    ap.add_argument("--no-sync", action="store_true", help="skip the synchronous references")
    ap.add_argument("--threads-per-worker", type=int, default=None,
                    help="override trajscope's split (split_cores), e.g. 1 to measure process "
                         "scaling alone")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trajscope-bench-"))
    run_dir = record_run(work / f"thr-{args.model}-b{args.batch_size}", args.pairs,
                         batch_size=args.batch_size, model=args.model)
    analysis._Progress = _Timestamps  # type: ignore[misc]

    counts = [int(w) for w in args.workers.split(",")]
    from trajscope.analysis import execution

    cores = execution.usable_cores()
    split = (f"{args.threads_per_worker} torch thread(s) per worker" if args.threads_per_worker
             else "trajscope's thread split: " + ", ".join(
                 f"{w} worker(s) x {execution.split_cores(cores, w)} thread(s)" for w in counts))
    print(f"# process workers: {args.model} model, batch {args.batch_size}, {args.pairs} pairs, "
          f"K = {2 * args.points - 1}, {cores} usable cores, {split}")
    print(f"# {machine()}")
    cases: dict[str, dict[str, object]] = {f"processes x{w}": {"scheduler": "processes", "workers": w}
                                           for w in counts}
    default_threads = torch.get_num_threads()
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    if not args.no_sync:
        results["synchronous, 1 thread"] = []
        results[f"synchronous, {default_threads} threads"] = []
    one(run_dir, min(args.pairs, 4), args.points)  # warm the page cache and this process
    for i in range(args.repeats):
        order = list(cases.items())
        if i % 2:
            order.reverse()
        for name, kw in order:
            results[name].append(one(run_dir, args.pairs, args.points, args.threads_per_worker, **kw))
        if not args.no_sync:
            for threads in (1, default_threads):
                torch.set_num_threads(threads)
                results[f"synchronous, {threads} thread{'s' if threads > 1 else ''}"].append(
                    one(run_dir, args.pairs, args.points))
            torch.set_num_threads(default_threads)
    for name, rs in results.items():
        walls = [r[0] for r in rs]
        rates = [r[1] for r in rs]
        print(f"{name:<24} wall {median(walls):6.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}),"
              f" steady {median(rates):6.1f} pairs/s")
    base = f"processes x{counts[0]}"
    for w in counts[1:]:
        name = f"processes x{w}"
        wall = median([r[0] for r in results[base]]) / median([r[0] for r in results[name]])
        steady = median([r[1] for r in results[name]]) / median([r[1] for r in results[base]])
        paired = sorted(a[0] / b[0] for a, b in zip(results[base], results[name]))
        print(f"speed-up {w} vs {counts[0]} workers: end to end {wall:.3f} (paired "
              f"{paired[0]:.3f}..{paired[-1]:.3f}), steady state {steady:.3f}  (target >= 1.6 for 2 vs 1)")


if __name__ == "__main__":
    main()
