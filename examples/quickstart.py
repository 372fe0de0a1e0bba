"""Quickstart: record a small real training run and test the theory's assumptions along it.

    python examples/quickstart.py [--out runs/quickstart] [--epochs 3]

Trains a small MLP on scikit-learn's bundled 8×8 digits with SGD+momentum, recording every step
(parameters, gradients and the exact minibatch), then re-evaluates the loss along each step on the
same minibatch and prints the headline findings. Afterwards, in Python:

    ds = trajscope.open_metrics("runs/quickstart")   # an xarray Dataset
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import trajscope
from trajscope.report import format_headline, headline


# The objective tells the analyzer how training computed the loss. It must be a module-level
# function so the analyzer can rebuild it (the recorder stores "quickstart:make_objective").
def make_objective() -> trajscope.Objective:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return trajscope.Objective(model=model, loss=loss)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/quickstart", help="run directory to (re)create")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args(argv)

    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    Y = torch.tensor(digits.target)
    torch.manual_seed(0)
    obj = make_objective()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    t0 = time.perf_counter()
    # every=1: record every step, so every consecutive pair (t, t+1) can be analyzed.
    with trajscope.Recorder(args.out, model, opt, objective=make_objective, every=1,
                            overwrite=True) as rec:
        for _epoch in range(args.epochs):
            for idx in torch.randperm(len(X)).split(args.batch_size):
                batch = (X[idx], Y[idx])
                opt.zero_grad()
                loss = obj.loss(model, batch)
                loss.backward()
                rec.batch(batch, loss=loss)  # the minibatch this step consumes
                opt.step()
    t1 = time.perf_counter()
    print(f"recorded {rec.step} steps to {args.out} in {t1 - t0:.1f}s (final loss {loss.item():.3f})")

    ds = trajscope.analyze(args.out, make_objective)
    t2 = time.perf_counter()
    h = headline(ds)
    print(f"analyzed {ds.sizes['step']} pairs in {t2 - t1:.1f}s -> {args.out}/analysis/metrics.nc")
    print(format_headline(h))
    return h


if __name__ == "__main__":
    main()
