"""Bytes of an HDF5 run whose frozen backbone is unfrozen during training.

Workload: an MLP of four 512×512 tanh layers (1 MiB weights, float32) under a 512→10 head, batch 64,
plain SGD, every step recorded, ``--steps`` steps. Three cases: everything trains from the start;
the backbone stays frozen; the backbone is unfrozen halfway. ``trajectory.h5`` declares a
``grad/NAME`` dataset for each parameter trainable when the file is created; the gradients of the
parameters unfrozen later go to the ``blob`` dataset (a dataset resized over the frozen rows would
leave them as allocated, never-written chunks: its rows of 64 KiB or more are allocated early, for
``O_DIRECT``).

Reported per case: the file's size (``st_size``: what a copy or ``disk_bytes`` counts), the bytes
the filesystem allocated (``st_blocks`` · 512; unwritten chunks would be holes where the filesystem
supports sparse files), and the payload: the bytes of every tensor the run holds, read back.

Run: ``python -m benchmarks.unfreeze_bytes [--steps 40]``. Numbers: ``docs/recording.md``, "Changing
what trains".
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from trajscope import runformat as fmt
from trajscope.recorders import Recorder
from trajscope.store.run import open_run
from trajscope.store.trees import tree_map

WIDTH = 512


def record(run_dir: Path, steps: int, unfreeze_at: int | None) -> None:
    """Record the workload; the backbone trains from step ``unfreeze_at`` (0: from the start)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(4)],
                          nn.Linear(WIDTH, 10))
    model[:4].requires_grad_(unfreeze_at == 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, WIDTH), torch.randint(0, 10, (64,))
    with Recorder(run_dir, model, opt, objective="unused:objective", format="hdf5") as rec:
        for t in range(steps):
            if t == unfreeze_at:
                model[:4].requires_grad_(True)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.batch((x, y), loss=loss)
            opt.step()


def payload(run_dir: Path) -> int:
    """Bytes of every parameter, gradient, buffer and minibatch tensor of the run."""
    run, total = open_run(run_dir), 0
    for t in run.steps:
        snap = run.snapshot(t)
        for group in (snap.params, snap.grads, snap.buffers):
            total += sum(v.numel() * v.element_size() for v in group.values())
        sizes: list[int] = []
        tree_map(lambda v: sizes.append(v.numel() * v.element_size()), snap.batch, leaf=torch.Tensor)
        total += sum(sizes)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    mib = 1 << 20
    cases = {"trains from the start": 0, "never unfrozen": None, f"unfrozen at step {args.steps // 2}": args.steps // 2}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for i, (label, unfreeze_at) in enumerate(cases.items()):
            run_dir = Path(tmp) / str(i)
            record(run_dir, args.steps, unfreeze_at)
            st = os.stat(run_dir / fmt.HDF5_FILE)
            print(f"{label:24s} size {st.st_size / mib:8.2f} MiB  allocated {st.st_blocks * 512 / mib:8.2f} MiB  "
                  f"payload {payload(run_dir) / mib:8.2f} MiB")


if __name__ == "__main__":
    main()
