"""Peak memory against the number of pairs analyzed (it must not grow with the run).

Records one run of the reference MLP (every step; ~0.85 MB per snapshot), then analyzes its first
50 and its first 500 pairs, each in a fresh Python process, and reports the peak resident memory
(``ru_maxrss``: the analyzer leaves a caller's high-water mark alone) of that process, and of its
worker processes for ``processes`` (pool workers are trajscope's own, whose marks the analyzer
resets while it plans its line: theirs is the peak since the last reset). Were snapshots kept, the
peak would grow by ~0.85 MB per pair.

    python -m benchmarks.memory [--pairs 50,500] [--schedulers synchronous,processes]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, machine, record_run

CHILD = r"""
import json, resource, sys, time
import trajscope
from benchmarks.common import Peaks
run, pairs, scheduler = sys.argv[1], int(sys.argv[2]), sys.argv[3]
kw = {"scheduler": scheduler, "workers": 2} if scheduler != "synchronous" else {}
t = time.perf_counter()
with Peaks("cpu") as peaks:
    ds = trajscope.analyze(run, steps=f"0:{pairs}", points=2, margin=0.0, device="cpu", progress=False, **kw)
    peak_kib = peaks.rss() // 1024
import multiprocessing
for p in multiprocessing.active_children():  # the pool's workers, still exiting: reaped, they count
    p.join()
assert len(ds.step) == pairs
print(json.dumps({"self": max(peak_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
                  "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "seconds": time.perf_counter() - t}))
"""


def measure(run_dir: Path, pairs: int, scheduler: str) -> dict[str, float]:
    shutil.rmtree(run_dir / "analysis", ignore_errors=True)
    # after any PYTHONPATH given: an installed trajscope there wins over the source tree
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]))
    out = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(pairs), scheduler],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"memory benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="50,500")
    ap.add_argument("--schedulers", default="synchronous,processes")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    counts = [int(p) for p in args.pairs.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trajscope-bench-"))
    run_dir = record_run(work / "thr-mlp-b64", max(counts), batch_size=64)
    size = sum(f.stat().st_size for f in (run_dir / "steps").iterdir()) / len(list((run_dir / "steps").iterdir()))
    print(f"# peak memory vs pairs: mlp model, batch 64, {size / 1e6:.2f} MB per snapshot, K = 2")
    print(f"# {machine()}")
    for scheduler in args.schedulers.split(","):
        peaks = {}
        for n in counts:
            m = measure(run_dir, n, scheduler)
            peaks[n] = m
            kids = f", workers' peak {m['children'] / 1024:.0f} MB" if scheduler != "synchronous" else ""
            print(f"{scheduler:<12} {n:>5} pairs: peak {m['self'] / 1024:.0f} MB{kids}  ({m['seconds']:.1f} s)")
        lo, hi = counts[0], counts[-1]
        r = peaks[hi]["self"] / peaks[lo]["self"]
        line = f"{scheduler:<12} peak({hi}) / peak({lo}) = {r:.3f}"
        if scheduler != "synchronous":
            line += f"; workers {peaks[hi]['children'] / peaks[lo]['children']:.3f}"
        print(line + "  (target <= 1.5)")


if __name__ == "__main__":
    main()
