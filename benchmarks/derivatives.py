"""Reverse-mode against forward-mode line derivatives: time per pair.

Times trajscope's ``probe_pair`` on one recorded pair of the reference MLP (~100k parameters,
K = 17 α points) with ``derivatives="forward"`` batched (one vmap over the points), forward point
by point (one jvp per point) and ``derivatives="reverse"`` (one forward and one backward per point),
interleaved in one process, and checks that the three give the same line.

    python -m benchmarks.derivatives [--repeats 11] [--batch-size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import interleaved, machine, ratio_line, record_run, set_clock
from trajscope.metrics.pair import PairStats
from trajscope.probe import ProbeSettings, probe_pair


def pair_case(run_dir: Path, settings: ProbeSettings):
    """A function probing pair (3, 4) of the run under ``settings``."""
    import trajscope
    from benchmarks.common import make_mlp

    run = trajscope.open_run(run_dir)
    snap, nxt = run.snapshot(3), run.snapshot(4)
    obj = make_mlp()

    def once() -> PairStats:
        return probe_pair(obj, snap, nxt, settings, trainable=run.trainable)

    return once


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--clock", default="wall", help="wall, or cpu (process CPU time)")
    args = ap.parse_args(argv)
    set_clock(args.clock)
    torch.set_num_threads(args.threads)
    from trajscope.analysis.process import keep_freed_memory

    keep_freed_memory()  # as the analyzer sets it in its workers
    print(f"# derivative paths, reference MLP, minibatch {args.batch_size}, K = 17, device cpu")
    print(f"# {machine()}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trajscope-bench-"))
    run_dir = record_run(work / f"deriv-mlp-b{args.batch_size}", 6, batch_size=args.batch_size)
    base = ProbeSettings()
    cases = {
        "forward batched": pair_case(run_dir, base),
        "forward pointwise": pair_case(run_dir, replace(base, batched=False)),
        "reverse": pair_case(run_dir, replace(base, derivatives="reverse")),
    }
    ref = cases["forward batched"]()
    for name in ("forward pointwise", "reverse"):
        s = cases[name]()
        err = max(float(np.max(np.abs(s.loss_line - ref.loss_line) / np.abs(ref.loss_line))),
                  float(np.max(np.abs(s.dloss_line - ref.dloss_line)) / np.max(np.abs(ref.dloss_line))))
        print(f"{name} against forward batched: max rel diff {err:.1e} (float32)")
    t = interleaved(cases, args.repeats)
    print(ratio_line("reverse / forward batched", t["reverse"], t["forward batched"]))
    print(ratio_line("reverse / forward pointwise", t["reverse"], t["forward pointwise"]))
    print(ratio_line("forward pointwise / forward batched", t["forward pointwise"], t["forward batched"]))


if __name__ == "__main__":
    main()
