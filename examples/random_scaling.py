"""Random scaling: the same network trained with and without updates scaled by s ~ Exp(1).

The online-to-non-convex (O2NC) conversion of Cutkosky, Mehta & Orabona (2023), and the variant
with random scaling and momentum of Zhang & Cutkosky (2024), analyse the loss change of a step
through its linear term, with no smoothness and no convexity assumed. The device that makes this
exact is the random scale: if the optimizer proposes a direction u_t and the step actually taken
is Δ_t = s_t·u_t with s_t ~ Exp(1) drawn independently, then for any differentiable f

    E_s[ f(x_t + s_t u_t) − f(x_t) ] = E_s[ ⟨∇f(x_t + s_t u_t), u_t⟩ ],

because ∫₀^∞ e^{−s} (φ(s) − φ(0)) ds = ∫₀^∞ e^{−s} φ'(s) ds for φ(s) = f(x_t + s u_t). In
trajscope's variables, on the step's own minibatch: loss_change_t and update_corr_same_batch_t /
s_t (= ℓ'(1)/s_t) have the same expectation. Without scaling (s_t = 1) the difference of the two
is exactly ``inst_gap``, which is biased (negative wherever the loss is convex-like along the
step). This example trains one network both ways (same seed, same batches), checks the identity
statistically, and compares ``loss_change`` with ``update_corr`` (the fresh-batch ⟨g_{t+1}, Δ_t⟩)
and the final losses: the paper's §4.3 asks whether the randomisation the theory needs costs
anything in practice.

    python examples/random_scaling.py            # default size
    python examples/random_scaling.py --small    # what the test suite runs
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
    """Size of the example (``--small`` shrinks it for the tests)."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    width: int = 128
    seed: int = 0
    points: int = 9  # analysis grid: points on [0, 1], plus a margin on both sides
    margin: float = 0.5


SMALL = Config(epochs=2, points=5, margin=0.25)




def make_objective() -> trajscope.Objective:
    """A two-layer ReLU network and the mean cross-entropy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, Config.width), nn.ReLU(), nn.Linear(Config.width, 10))

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return trajscope.Objective(model=model, loss=loss)


def train(run_dir: Path, scaled: bool, cfg: Config, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], float]:
    """SGD with momentum; with ``scaled``, each step is stretched by an independent s ~ Exp(1).

    Returns the scale of every step (1.0 without scaling) and the final full-data loss.
    """
    obj = make_objective()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    batches = torch.Generator().manual_seed(cfg.seed)  # same batch order in both runs
    scales_rng = np.random.default_rng(cfg.seed + 1)
    scales: list[float] = []
    with trajscope.Recorder(run_dir, model, opt, objective=make_objective, overwrite=True,
                            metadata={"example": "random_scaling", "scaled": scaled}) as rec:
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(x), generator=batches).split(cfg.batch_size):
                batch = (x[idx], y[idx])
                opt.zero_grad()
                loss = obj.loss(model, batch)
                loss.backward()
                rec.batch(batch, loss=loss)
                before = [p.detach().clone() for p in model.parameters()]
                opt.step()  # the optimizer proposes u_t = x' − x_t (its momentum state is untouched)
                s = float(scales_rng.exponential(1.0)) if scaled else 1.0
                if scaled:
                    # x_{t+1} = x_t + s_t·u_t. The recorder saves x_{t+1} at the next step's start,
                    # so it sees the scaled step: Δ_t in the analysis is s_t·u_t.
                    with torch.no_grad():
                        for p, p0 in zip(model.parameters(), before):
                            p.copy_(p0 + s * (p - p0))
                scales.append(s)
    with torch.no_grad():
        final = float(F.cross_entropy(model(x), y))
    return scales, final


def o2nc_check(ds: xr.Dataset, scales: list[float]) -> dict[str, float]:
    """Test E[loss_change − ℓ'(1)/s] = 0 over the steps: mean, standard error and z-score."""
    steps = ds["step"].values
    s = np.asarray(scales)[steps]
    d = ds["loss_change"].values - ds["update_corr_same_batch"].values / s
    d = d[np.isfinite(d)]
    se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
    return {"mean_identity_residual": float(np.mean(d)), "se_identity_residual": se,
            "z_identity_residual": float(np.mean(d) / se) if se > 0 else float("nan")}


def findings(ds: xr.Dataset, scales: list[float], final_loss: float) -> dict[str, float]:
    lc, uc = ds["loss_change"].values, ds["update_corr"].values
    s = np.asarray(scales)[ds["step"].values]
    return {
        "pairs": int(ds.sizes["step"]),
        "final_train_loss": final_loss,
        "sum_loss_change": float(np.nansum(lc)),
        "sum_update_corr": float(np.nansum(uc)),
        # ⟨g_{t+1}, u_t⟩ = update_corr / s_t: the O2NC linear term with the unscaled direction
        "sum_update_corr_over_s": float(np.nansum(uc / s)),
        "sum_update_corr_same_batch": float(np.nansum(ds["update_corr_same_batch"].values)),
        "frac_update_corr_gt_0": float(np.mean(uc[np.isfinite(uc)] > 0)),
        "frac_inst_gap_le_0": float(np.mean(ds["inst_gap"].values <= 0)),
        "mean_scale": float(np.mean(scales)),
    } | o2nc_check(ds, scales)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train both ways, analyze, compare; print and return the findings."""
    return example_main(argv, doc=__doc__, name="random_scaling", run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The example proper: record, analyze, report, print the findings."""
    cfg = SMALL if args.small else Config()
    t0 = time.perf_counter()
    x, y = digits_flat()
    results: dict[str, Any] = {"config": asdict(cfg)}
    runs = []
    for name, scaled in (("plain", False), ("scaled", True)):
        run_dir = args.out / name
        scales, final = train(run_dir, scaled, cfg, x, y)
        ds = trajscope.analyze(run_dir, make_objective, points=cfg.points, margin=cfg.margin, dtype="float64",
                               progress=False)
        results[name] = findings(ds, scales, final)
        runs.append(run_dir)
    report_and_time(args, results, runs, t0)

    print("random scaling: ReLU MLP on digits, SGD+momentum, steps x s ~ Exp(1) vs unscaled")
    for name in ("plain", "scaled"):
        r = results[name]
        print(f"  {name:6s} pairs={r['pairs']}  final loss={r['final_train_loss']:.4f}  "
              f"Σloss_change={r['sum_loss_change']:.3f}  Σupdate_corr={r['sum_update_corr']:.3f}  "
              f"Σupdate_corr/s={r['sum_update_corr_over_s']:.3f}  "
              f"update_corr>0: {r['frac_update_corr_gt_0']:.1%}  inst_gap<=0: {r['frac_inst_gap_le_0']:.1%}")
        print(f"         E[loss_change − ℓ'(1)/s] = {r['mean_identity_residual']:.2e} "
              f"± {r['se_identity_residual']:.1e}  (z = {r['z_identity_residual']:.1f})")
    print("  finding: with random scaling the linear term ℓ'(1)/s is an unbiased estimate of the "
          "loss change (|z| small); without it the gap is the systematic inst_gap (|z| large)")
    return finish(args, results)


if __name__ == "__main__":
    main()
