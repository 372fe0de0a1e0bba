"""What every example shares: the command line (``--small``, ``--out``, ``--no-report``,
``--threads``, plus an example's own options), the flattened digits, and the ending (report, wall
time, ``findings.json``)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def example_main(argv: list[str] | None, *, doc: str, name: str,
                 run: Callable[[argparse.Namespace], dict[str, Any]],
                 options: Callable[[argparse.ArgumentParser], None] | None = None) -> dict[str, Any]:
    """Parse the shared options (and the example's own, added by ``options(parser)``), run
    ``run(args)`` with the requested torch threads, restore them."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny run for the test suite")
    ap.add_argument("--out", type=Path, default=Path("runs") / name, help="output directory")
    ap.add_argument("--no-report", action="store_true", help="skip the figures")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: models this small gain nothing from intra-op "
                         "threads, and on a busy machine spinning OpenMP threads slow them down)")
    if options is not None:
        options(ap)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def digits_flat() -> tuple[torch.Tensor, torch.Tensor]:
    """Scikit-learn's bundled 1797 8x8 digits (no download): pixels flattened to 64 features and
    scaled to [0, 1], and the class labels 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (torch.tensor(digits.data, dtype=torch.float32) / 16.0,
            torch.tensor(digits.target, dtype=torch.long))


def report_and_time(args: argparse.Namespace, results: dict[str, Any], runs: Sequence[Path],
                    t0: float) -> None:
    """The figures of ``runs`` (unless ``--no-report``) and the wall time since ``t0``, into
    ``results``."""
    if not args.no_report:
        from trajscope.report import write_report

        results["report"] = str(write_report(list(runs), args.out / "report").index)
    results["wall_s"] = round(time.perf_counter() - t0, 1)


def finish(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Print where the report is and the wall time, write ``findings.json``; return ``results``."""
    if "report" in results:
        print(f"  report: {results['report']}")
    print(f"  wall time {results['wall_s']} s")
    (args.out / "findings.json").write_text(json.dumps(results, indent=2))
    return results
