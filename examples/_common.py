"""The command line every example shares: ``--small``, ``--out``, ``--no-report``, ``--threads``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def example_main(argv: list[str] | None, *, doc: str, name: str,
                 run: Callable[[argparse.Namespace], dict[str, Any]]) -> dict[str, Any]:
    """Parse the shared options, run ``run(args)`` with the requested torch threads, restore them."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny run for the test suite")
    ap.add_argument("--out", type=Path, default=Path("runs") / name, help="output directory")
    ap.add_argument("--no-report", action="store_true", help="skip the figures")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: models this small gain nothing from intra-op "
                         "threads, and on a busy machine spinning OpenMP threads slow them down)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)
