"""Run directories for the reliability tests: tiny runs, raw snapshot surgery, directory
fingerprints, the command line run in-process, and guards against hangs and runaway allocations.

Importable as ``support.rundirs`` like :mod:`support.problems` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from support.problems import train_quadratic
from trajscope.store import open_run, read_raw


def quad_run(path: Path, steps: int = 6, **kw: Any) -> Path:
    """A complete quadratic run (float64, 6 parameters) with every step recorded."""
    train_quadratic(path, steps=steps, **kw)
    return path


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def step_file(run_dir: Path, step: int) -> Path:
    return run_dir / "steps" / f"step_{step:08d}.safetensors"


def load_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the parsed ``trajscope`` metadata of a snapshot file."""
    data = path.read_bytes()
    tensors = safetensors.torch.load(data)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return tensors, json.loads(header["__metadata__"]["trajscope"])


def save_raw(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    path.write_bytes(safetensors.torch.save(tensors, metadata={"trajscope": json.dumps(meta)}))


def rewrite_snapshot(path: Path, fn: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> None:
    """Load a snapshot, let ``fn`` edit tensors and metadata in place, write it back."""
    tensors, meta = load_raw(path)
    fn(tensors, meta)
    save_raw(path, tensors, meta)


def edit_manifest(run_dir: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    path = run_dir / "trajscope.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def cli(args: list[str], capsys: Any) -> tuple[int, str, str]:
    """Run ``trajscope ARGS`` in-process: (exit status, stdout, stderr)."""
    from trajscope.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def fingerprint(root: Path, exclude: Path | None = None) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root`` (not following symlinks): kind, size and content hash of files,
    link targets of symlinks. Entries under ``exclude`` are left out."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        if exclude is not None and (d == exclude or exclude in d.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            if exclude is not None and p == exclude:
                continue
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", 0, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", 0, "")
            elif p.is_file():
                out[rel] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", 0, "")
    return out


class Hang(Exception):
    """Raised by :func:`no_hang` when the block runs too long."""


@contextmanager
def no_hang(seconds: float = 10.0) -> Iterator[None]:
    """Fail (raise :class:`Hang`) if the block takes longer than ``seconds`` (main thread only)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def memory_cap(extra_bytes: int = 2 << 30) -> Iterator[None]:
    """Let the block map at most ``extra_bytes`` more address space than the process maps on entry
    (``RLIMIT_AS``, soft limit, restored after): an allocation sized by a hostile file fails with
    ``MemoryError`` instead of exhausting the machine. Linux only (``/proc/self/status``)."""
    import resource

    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    old = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra_bytes
    if old[1] != resource.RLIM_INFINITY:
        cap = min(cap, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def assert_same_stored_steps(a: Path, b: Path) -> None:
    """Runs ``a`` and ``b`` store the same steps, each with the same metadata and the same tensors,
    bit for bit (whatever their storage formats)."""
    ra, rb = open_run(a), open_run(b)
    assert ra.steps == rb.steps
    for s in ra.steps:
        ma, ta = read_raw(ra.step_path(s))
        mb, tb = read_raw(rb.step_path(s))
        assert ma == mb
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
            # bit patterns, not values (NaN != NaN)
            assert torch.equal(ta[k].reshape(-1).view(torch.uint8),
                               tb[k].reshape(-1).view(torch.uint8)), k
