"""Convex sanity check: softmax regression on scikit-learn's bundled digits, SGD and Adam.

Multinomial logistic regression is convex in its parameters, so along *every* step the loss lies
above its tangent at the step's end: ``inst_gap`` = ℓ(1) − ℓ(0) − ℓ'(1) ≤ 0 and
``inst_gap_fwd`` = ℓ(0) + ℓ'(0) − ℓ(1) ≤ 0, whatever the optimizer does (Adam's steps are not
gradient steps, but convexity is a property of the function along the segment, not of the step).
This is the one setting where the theory is known to hold, so it is the calibration run: if
trajscope reported a positive gap here, the tool would be wrong, not the theory.

    python examples/convex.py            # default size
    python examples/convex.py --small    # what the test suite runs
    trajscope report runs/convex/sgd runs/convex/adam

The runs record ``convex:make_objective``; to re-analyze one from the command line, run
``trajscope analyze`` from the ``examples/`` directory (or pass ``--objective``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from _common import digits_flat, example_main, finish, report_and_time
from torch import nn

import trajscope


@dataclass
class Config:
    """Everything that sets the size of the example (``--small`` shrinks it for the tests)."""

    epochs: int = 6
    batch_size: int = 64
    sgd_lr: float = 0.5
    adam_lr: float = 0.02
    seed: int = 0
    points: int = 9  # analysis grid: points on [0, 1], plus a margin on both sides
    margin: float = 0.5


SMALL = Config(epochs=1, points=5, margin=0.25)




# --- the objective: how the analyzer rebuilds f(x; z). Module level, so it can be imported. ---

def make_objective() -> trajscope.Objective:
    """A linear layer and the mean cross-entropy: f(W, b; (x, y)) is convex in (W, b)."""
    model = nn.Linear(64, 10)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return trajscope.Objective(model=model, loss=loss)


def train(run_dir: Path, optimizer: str, cfg: Config, x: torch.Tensor, y: torch.Tensor) -> float:
    """Train one model and record every step; returns the final full-data accuracy."""
    torch.manual_seed(cfg.seed)
    obj = make_objective()
    model = obj.model
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.sgd_lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.adam_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    # every=1, window=2: every step is recorded, so every consecutive pair can be analyzed.
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    meta = {"example": "convex", "optimizer": optimizer, "steps_per_epoch": steps_per_epoch}
    with trajscope.Recorder(run_dir, model, opt, objective=make_objective, every=1, window=2,
                            overwrite=True, metadata=meta) as rec:
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
                batch = (x[idx], y[idx])
                opt.zero_grad()
                loss = obj.loss(model, batch)
                loss.backward()
                rec.batch(batch, loss=loss)  # name the minibatch this step consumes
                opt.step()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def findings(ds: xr.Dataset) -> dict[str, float]:
    """The numbers this example is about, from the analysis Dataset."""
    gap, gap_fwd = ds["inst_gap"].values, ds["inst_gap_fwd"].values
    return {
        "pairs": int(ds.sizes["step"]),
        "frac_inst_gap_le_0": float(np.mean(gap <= 0)),
        "frac_inst_gap_fwd_le_0": float(np.mean(gap_fwd <= 0)),
        "max_inst_gap": float(np.max(gap)),
        "final_convexity_ratio": float(ds["convexity_ratio"].values[-1]),
        # ℓ(1) − ℓ(0) − ∫ℓ': zero up to the quadrature error of the α grid, relative to the step's
        # loss change (it validates the probe)
        "max_rel_line_integral_residual": float(np.max(np.abs(ds["line_integral_residual"].values))
                                                / np.max(np.abs(ds["loss_change"].values))),
        "max_grad_replay_error": float(np.max(ds["grad_replay_error"].values)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Record, analyze and report both runs; print and return the findings per optimizer."""
    return example_main(argv, doc=__doc__, name="convex", run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The example proper: record, analyze, report, print the findings."""
    cfg = SMALL if args.small else Config()
    t0 = time.perf_counter()
    x, y = digits_flat()

    results: dict[str, Any] = {"config": asdict(cfg)}
    runs = []
    for name in ("sgd", "adam"):
        run_dir = args.out / name
        acc = train(run_dir, name, cfg, x, y)
        # float64 evaluation: with steps this small, a float32 line can round a gap of -1e-9 to
        # +1e-8, and a convexity check should not be decided by rounding.
        ds = trajscope.analyze(run_dir, make_objective, points=cfg.points, margin=cfg.margin, dtype="float64",
                               progress=False)
        results[name] = findings(ds) | {"train_accuracy": acc}
        runs.append(run_dir)
    report_and_time(args, results, runs, t0)

    print("convex: softmax regression on digits (convex in the parameters)")
    for name in ("sgd", "adam"):
        r = results[name]
        print(f"  {name:5s} pairs={r['pairs']:4d}  inst_gap<=0: {r['frac_inst_gap_le_0']:.1%}  "
              f"inst_gap_fwd<=0: {r['frac_inst_gap_fwd_le_0']:.1%}  max inst_gap={r['max_inst_gap']:.2e}  "
              f"convexity_ratio={r['final_convexity_ratio']:.3f}  accuracy={r['train_accuracy']:.3f}")
    print(f"  finding: the convexity inequality holds on every step for both optimizers "
          f"({'yes' if all(results[n]['frac_inst_gap_le_0'] == 1.0 for n in ('sgd', 'adam')) else 'NO'})")
    return finish(args, results)


if __name__ == "__main__":
    main()
