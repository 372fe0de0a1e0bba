"""Everything worth measuring on a lent GPU machine, in one run.

1. GPU: batched vs point-by-point line evaluation (K = 17), reference MLP, minibatch 64 and 1024.
2. GPU: the analyzer against the hand-written loop on the same GPU (synchronous; threads x2;
   synchronous without page-locked snapshots), reference MLP and a 1.2M-parameter MLP.
3. CPU, on two cores of that (otherwise idle) machine (``taskset -c 0,1``): 1 vs 2 process
   workers, trajscope's thread split and one thread per worker; the serial analyzer against the
   hand loop on one core.

Each section prints its own ratios; a failing section is reported and the next one runs. Without
CUDA the GPU sections are skipped. Writes the log to ``--out`` as well.

    python -m benchmarks.gpu [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import ROOT, machine


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)


DEADLINE = float("inf")


def section(title: str, fn: Callable[[], None]) -> None:
    print(f"\n## {title}", flush=True)
    if time.perf_counter() > DEADLINE:
        print("(skipped: --budget spent)")
        return
    t = time.perf_counter()
    try:
        fn()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stdout)
        print(f"(section failed: {type(exc).__name__}: {exc})")
    print(f"({time.perf_counter() - t:.0f} s)", flush=True)


def cpu_subprocess(cores: str, module: str, args: list[str]) -> None:
    """Run a benchmark module pinned to ``cores`` (an idle 2-core machine, in effect)."""
    cmd = [sys.executable, "-m", module, *args]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", cores, *cmd]
    else:
        print("(taskset not found: running on every core)")
    # after any PYTHONPATH given: an installed trajscope there wins over the source tree
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    print(out.stdout.rstrip())
    if out.returncode:
        print(out.stderr[-3000:])
        raise RuntimeError(f"{module} exited with {out.returncode}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="also write the log to OUT/gpu_bench.txt")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and pairs")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds; sections not started by then are skipped")
    args = ap.parse_args(argv)
    global DEADLINE
    if args.budget:
        DEADLINE = time.perf_counter() + args.budget
    log = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        log = open(Path(args.out) / "gpu_bench.txt", "w", encoding="utf-8")
    with contextlib.redirect_stdout(_Tee(sys.stdout, *(log,) if log else ())):
        print(f"# trajscope benchmarks on {machine()}")
        work = Path(tempfile.mkdtemp(prefix="trajscope-bench-"))
        reps = 3 if args.quick else 5
        if torch.cuda.is_available():
            from benchmarks import line_batching

            section("GPU: batched vs point-by-point line evaluation", lambda: line_batching.main(
                ["--device", "cuda", "--batch-sizes", "64,1024", "--repeats", str(2 * reps),
                 "--workdir", str(work)]))
            for model, bs in (("mlp", "64"), ("wide", "256")):
                section(f"GPU: analyzer vs hand loop, {model} model, batch {bs}",
                        lambda model=model, bs=bs: gpu_throughput(work, model, bs, reps, args.quick))
        else:
            print("\n(no CUDA device: GPU sections skipped)")
        if not args.skip_cpu:
            section("CPU, 2 cores: 1 vs 2 process workers (trajscope's thread split)",
                    lambda: cpu_subprocess("0,1", "benchmarks.workers", [
                        "--pairs", "60" if args.quick else "120", "--repeats", str(reps - 2),
                        "--workdir", str(work)]))
            section("CPU, 2 cores: 1 vs 2 process workers (one thread per worker)",
                    lambda: cpu_subprocess("0,1", "benchmarks.workers", [
                        "--pairs", "60" if args.quick else "120", "--repeats", str(reps - 2),
                        "--threads-per-worker", "1", "--no-sync", "--workdir", str(work)]))
            section("CPU, 1 core: serial analyzer vs hand loop",
                    lambda: cpu_subprocess("0", "benchmarks.analyze_throughput", [
                        "--pairs", "100", "--repeats", str(reps), "--threads", "1",
                        "--workdir", str(work)]))
            section("CPU: peak memory, 50 vs 500 pairs", lambda: cpu_subprocess(
                "0,1", "benchmarks.memory", ["--workdir", str(work)]))
        shutil.rmtree(work, ignore_errors=True)
    if log:
        log.close()


def gpu_throughput(work: Path, model: str, batch_size: str, reps: int, quick: bool) -> None:
    import trajscope.analysis.driver as analysis
    from benchmarks import analyze_throughput
    from benchmarks.common import interleaved, median, ratio_line, record_run

    pairs = 30 if quick else 60
    run_dir = record_run(work / f"thr-{model}-b{batch_size}", pairs, batch_size=int(batch_size),
                         model=model)
    t = analyze_throughput.run_case(run_dir, model, pairs, "cuda", reps, 9)
    print(ratio_line("analyzer (synchronous) / hand loop", t["analyzer"], t["hand loop"]))
    print(ratio_line("analyzer without writes / hand loop", t["analyzer, no writes"], t["hand loop"]))
    print(f"  per pair: analyzer {median(t['analyzer']) / pairs * 1e3:.2f} ms, hand loop "
          f"{median(t['hand loop']) / pairs * 1e3:.2f} ms")

    import trajscope

    def threads() -> None:
        trajscope.analyze(run_dir, device="cuda", steps=f"0:{pairs}", write=False, progress=False,
                          scheduler="threads", workers=2)
        torch.cuda.synchronize()

    def unpinned() -> None:
        analysis.PIN_MEMORY = False
        try:
            trajscope.analyze(run_dir, device="cuda", steps=f"0:{pairs}", write=False, progress=False)
            torch.cuda.synchronize()
        finally:
            analysis.PIN_MEMORY = True

    def pinned() -> None:
        trajscope.analyze(run_dir, device="cuda", steps=f"0:{pairs}", write=False, progress=False)
        torch.cuda.synchronize()

    t2 = interleaved({"pinned": pinned, "unpinned": unpinned, "threads x2": threads}, reps)
    print(ratio_line("threads x2 / synchronous (no writes)", t2["threads x2"], t2["pinned"]))
    print(ratio_line("unpinned / pinned snapshots (no writes)", t2["unpinned"], t2["pinned"]))


if __name__ == "__main__":
    main()
