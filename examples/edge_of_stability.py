"""Edge of stability: full-batch gradient descent on an MLP, at two learning rates.

The descent lemma promises progress only while the smoothness L along the path stays below 2/lr.
Cohen et al. (2021) observed that full-batch gradient descent does not respect this: the
curvature grows ("progressive sharpening") until it reaches 2/lr and then hovers there, while the
loss keeps falling, non-monotonically. trajscope sees this without any Hessian computation:
``inst_smoothness`` = ‖∇f(x_{t+1}) − ∇f(x_t)‖ / ‖Δ_t‖ climbs to 2/lr and the stability ratio
inst_smoothness·lr/2 (``stability_ratio`` in metrics.md) sits at 1, at each learning rate its own
level. Smoothness-based analyses need that ratio below 1 on every step; here it is not, and
training still works.

    python examples/edge_of_stability.py            # default size
    python examples/edge_of_stability.py --small    # what the test suite runs

Full-batch steps make storing the batch wasteful (it is the whole data set every step), so the
recorded "minibatch" is the tensor of sample indices and the objective looks the samples up: the
pattern to use whenever the data can be rebuilt at analysis time.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from _common import example_main, finish, report_and_time
from torch import nn

import trajscope


@dataclass
class Config:
    """Size of the example (``--small`` shrinks it for the tests)."""

    lrs: tuple[float, ...] = (0.6, 1.2)  # sharpness at init is about 1.6: both start stable
    steps: int = 600
    samples: int = 1000  # the first N digits form the full "batch"
    width: int = 64
    every: int = 4  # record steps t, t+1 for every t divisible by 4: a quarter of the pairs
    seed: int = 0
    points: int = 9  # analysis grid: points on [0, 1], plus a margin on both sides
    margin: float = 0.5


SMALL = Config(steps=100, every=4, points=5, margin=0.25)


@functools.cache
def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: centred pixels in [0, 1] and one-hot targets (cached: the objective asks
    for them at every evaluation)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    x = x - x.mean(0)
    y = F.one_hot(torch.tensor(digits.target), 10).float()
    return x, y


def make_objective() -> trajscope.Objective:
    """A tanh MLP and the square loss ½‖model(x) − onehot(y)‖² averaged over samples (the setting
    in which Cohen et al. describe the edge of stability). The batch is a tensor of indices."""
    torch.manual_seed(0)  # the skeleton's weights are replaced at analysis time; seed for training
    width = Config.width
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 10))

    def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        x, y = load_data()
        dtype = model[0].weight.dtype  # follow the analysis dtype (float32 or float64)
        out = model(x[batch].to(dtype))
        return 0.5 * ((out - y[batch].to(dtype)) ** 2).sum(1).mean()

    return trajscope.Objective(model=model, loss=loss)


def train(run_dir: Path, lr: float, cfg: Config) -> list[float]:
    """Plain full-batch gradient descent (no momentum); returns the loss of every step."""
    obj = make_objective()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batch = torch.arange(cfg.samples)  # full batch, every step
    losses = []
    with trajscope.Recorder(run_dir, model, opt, objective=make_objective, every=cfg.every,
                            window=2, overwrite=True,
                            metadata={"example": "edge_of_stability", "lr": lr}) as rec:
        for _ in range(cfg.steps):
            opt.zero_grad()
            loss = obj.loss(model, batch)
            loss.backward()
            rec.batch(batch, loss=loss)
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def findings(ds: xr.Dataset, losses: list[float], lr: float) -> dict[str, float]:
    """Where the stability ratio sits late in training, and whether the loss kept falling."""
    ratio = ds["inst_smoothness"].values * ds["lr"].values / 2  # metrics.md: stability_ratio
    late = ratio[len(ratio) // 2:]
    reached = np.flatnonzero(ratio > 0.9)
    n = len(losses)
    return {
        "lr": lr,
        "two_over_lr": 2 / lr,
        "pairs": int(ds.sizes["step"]),
        "median_inst_smoothness_last_half": float(np.median(ds["inst_smoothness"].values[len(ratio) // 2:])),
        "median_stability_ratio_last_half": float(np.median(late)),
        "frac_stability_ratio_gt_1": float(np.mean(ratio > 1)),
        "first_step_ratio_above_0.9": int(ds["step"].values[reached[0]]) if reached.size else -1,
        "initial_loss": losses[0],
        "final_loss": losses[-1],
        # "keeps falling": the last tenth of training is lower, on average, than the tenth before
        "loss_falls_late": float(np.mean(losses[-n // 10:]) < np.mean(losses[-2 * n // 10:-n // 10])),
        "frac_loss_increases": float(np.mean(np.diff(losses) > 0)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and analyze at both learning rates; print and return the findings."""
    return example_main(argv, doc=__doc__, name="edge_of_stability", run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The example proper: record, analyze, report, print the findings."""
    cfg = SMALL if args.small else Config()
    t0 = time.perf_counter()
    results: dict[str, Any] = {"config": asdict(cfg)}
    runs = []
    for lr in cfg.lrs:
        run_dir = args.out / f"lr{lr:g}"
        losses = train(run_dir, lr, cfg)
        ds = trajscope.analyze(run_dir, make_objective, points=cfg.points, margin=cfg.margin, progress=False)
        results[f"lr{lr:g}"] = findings(ds, losses, lr)
        runs.append(run_dir)
    report_and_time(args, results, runs, t0)

    print("edge of stability: full-batch gradient descent, tanh MLP, square loss on digits")
    for lr in cfg.lrs:
        r = results[f"lr{lr:g}"]
        print(f"  lr={lr:<4g} 2/lr={r['two_over_lr']:.3g}  median inst_smoothness (last half)="
              f"{r['median_inst_smoothness_last_half']:.3g}  median stability ratio (last half)="
              f"{r['median_stability_ratio_last_half']:.3f}  first ratio>0.9 at step "
              f"{r['first_step_ratio_above_0.9']}  loss {r['initial_loss']:.3f} -> {r['final_loss']:.3f} "
              f"(rises on {r['frac_loss_increases']:.1%} of steps)")
    print("  finding: inst_smoothness settles at 2/lr (stability ratio ~1, beyond what the "
          "descent lemma allows) while the loss keeps falling")
    return finish(args, results)


if __name__ == "__main__":
    main()
