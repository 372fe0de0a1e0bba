"""Image classification: a small residual CNN with BatchNorm on the digits images, SGD with
momentum against AdamW.

The paper's second setting (ResNets on CIFAR-10) at laptop scale: 8x8 grey digits from
scikit-learn, a three-stage residual network with BatchNorm, trained with minibatches. The loss is
non-convex, yet along the path the optimizer takes the convexity identities hold: the steps are
convex along their own line (``inst_gap`` ≤ 0) and the cumulative ``convexity_ratio`` stays
positive, for both optimizers. Monotone descent in expectation, the assumption behind
smoothness-based analyses, is another matter: the next minibatch's gradient points uphill along
the step (``update_corr`` > 0) on a large fraction of steps.

BatchNorm in train mode normalises with the statistics of the minibatch, so f(x; z) is still a
function of the parameters and the batch only; the analyzer replays it in train mode on the
recorded batch and must not let the replay change the recorded running statistics. The replay
errors in the findings say how faithful that replay is.

    python examples/cnn.py            # default size
    python examples/cnn.py --small    # what the test suite runs
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
from _common import example_main, finish, report_and_time
from torch import nn

import trajscope


@dataclass
class Config:
    """Size of the example (``--small`` shrinks it for the tests)."""

    epochs: int = 4
    batch_size: int = 64
    sgd_lr: float = 0.05
    sgd_momentum: float = 0.9
    adamw_lr: float = 3e-3
    weight_decay: float = 5e-4  # AdamW: decoupled; SGD: added to the gradient (part of g_t)
    every: int = 1  # record every step: all consecutive pairs are analyzed
    seed: int = 0
    points: int = 9  # analysis grid: points on [0, 1], plus a margin on both sides
    margin: float = 0.5


SMALL = Config(epochs=1, every=4, points=5, margin=0.25)  # every=4: a quarter of the pairs
CHANNELS = 16  # width of the first stage; a module constant so the objective rebuilds it


# --- model ------------------------------------------------------------------------------------

class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected when the shape changes) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """8x8 input → stem → blocks at 8x8, 4x4, 2x2 → global average pool → 10 classes."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(Block(c, c, 1), Block(c, 2 * c, 2), Block(2 * c, 4 * c, 2))
        self.head = nn.Linear(4 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as 1x8x8 images, standardised; a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    tr, te = perm[: int(0.8 * len(x))], perm[int(0.8 * len(x)):]
    return x[tr], y[tr], x[te], y[te]


def make_objective() -> trajscope.Objective:
    """The residual network (train mode, as in training) and the mean cross-entropy."""
    torch.manual_seed(0)
    model = ResNet(CHANNELS)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return trajscope.Objective(model=model, loss=loss)


def train(run_dir: Path, optimizer: str, cfg: Config, data: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Train one model, recording every ``cfg.every``-th pair; returns train and test accuracy."""
    xtr, ytr, xte, yte = data
    obj = make_objective()
    model = obj.model
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.sgd_lr,
                                                     momentum=cfg.sgd_momentum,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.adamw_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    with trajscope.Recorder(run_dir, model, opt, objective=make_objective, every=cfg.every, window=2,
                            overwrite=True, metadata={"example": "cnn", "optimizer": optimizer}) as rec:
        for _ in range(cfg.epochs):
            # drop the last partial batch: BatchNorm statistics of a handful of samples are noise
            for idx in torch.randperm(len(xtr), generator=gen).split(cfg.batch_size):
                if len(idx) < cfg.batch_size:
                    continue
                batch = (xtr[idx], ytr[idx])
                opt.zero_grad()
                loss = obj.loss(model, batch)
                loss.backward()
                rec.batch(batch, loss=loss)
                opt.step()
    model.eval()
    with torch.no_grad():
        return {"train_accuracy": float((model(xtr).argmax(1) == ytr).float().mean()),
                "test_accuracy": float((model(xte).argmax(1) == yte).float().mean())}


def findings(ds: xr.Dataset) -> dict[str, float]:
    gap, uc = ds["inst_gap"].values, ds["update_corr"].values
    ratio = ds["inst_smoothness"].values * ds["lr"].values / 2  # metrics.md: stability_ratio
    return {
        "pairs": int(ds.sizes["step"]),
        "frac_inst_gap_le_0": float(np.mean(gap <= 0)),
        "final_convexity_ratio": float(ds["convexity_ratio"].values[-1]),
        "min_convexity_ratio": float(np.nanmin(ds["convexity_ratio"].values)),
        "frac_update_corr_gt_0": float(np.mean(uc[np.isfinite(uc)] > 0)),
        "median_inst_smoothness": float(np.median(ds["inst_smoothness"].values)),
        "median_stability_ratio": float(np.median(ratio)),
        "frac_stability_ratio_gt_1": float(np.mean(ratio > 1)),
        "sum_loss_change": float(np.nansum(ds["loss_change"].values)),
        "max_loss_replay_error": float(np.nanmax(ds["loss_replay_error"].values)),
        "max_grad_replay_error": float(np.nanmax(ds["grad_replay_error"].values)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train with both optimizers, analyze, report; print and return the findings."""
    return example_main(argv, doc=__doc__, name="cnn", run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The example proper: record, analyze, report, print the findings."""
    cfg = SMALL if args.small else Config()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = load_data()
    results: dict[str, Any] = {"config": asdict(cfg)}
    runs = []
    for name in ("sgd", "adamw"):
        run_dir = args.out / name
        acc = train(run_dir, name, cfg, data)
        ds = trajscope.analyze(run_dir, make_objective, points=cfg.points, margin=cfg.margin, progress=False)
        results[name] = findings(ds) | acc
        runs.append(run_dir)
    report_and_time(args, results, runs, t0)

    print("cnn: residual network with BatchNorm on digits images")
    for name in ("sgd", "adamw"):
        r = results[name]
        print(f"  {name:5s} pairs={r['pairs']}  test acc={r['test_accuracy']:.3f}  inst_gap<=0: "
              f"{r['frac_inst_gap_le_0']:.1%}  convexity_ratio final={r['final_convexity_ratio']:.3f} "
              f"(min {r['min_convexity_ratio']:.3f})  update_corr>0: {r['frac_update_corr_gt_0']:.1%}  "
              f"stability ratio median={r['median_stability_ratio']:.3g} (>1 on "
              f"{r['frac_stability_ratio_gt_1']:.1%})  replay err loss/grad="
              f"{r['max_loss_replay_error']:.1e}/{r['max_grad_replay_error']:.1e}")
    return finish(args, results)


if __name__ == "__main__":
    main()
