# %% [markdown]
# # Exploring a trajscope analysis with xarray
#
# `trajscope analyze` leaves one `xarray.Dataset` per run: dims `step` (the pair's start step t),
# `alpha` (the line coordinate) and `layer` (parameter tensors), a coordinate `lr`, and variables
# whose attrs say what they are (`long_name`, `units`), how they are computed (`description`) and
# what the theory needs (`holds_if`). This notebook shows the queries people use most: select
# steps, group by epoch, rolling means, and compare runs along a `run` dimension.
#
# It explores the two runs of `examples/convex.py` (softmax regression on digits, SGD and Adam),
# and records them first (small) if they are not there. Run it as a script
# (`python examples/explore.py [--runs DIR]`) or open `explore.ipynb` (the same cells) in Jupyter
# from the `examples/` directory.

# %%
import argparse
import sys
from pathlib import Path

import numpy as np
import xarray as xr

import trajscope
from trajscope.report import ema, fig_inst_gap

ap = argparse.ArgumentParser(description="xarray queries on a trajscope analysis")
ap.add_argument("--runs", type=Path, default=Path("runs/convex"), help="output of examples/convex.py")
ap.add_argument("--small", action="store_true", help="record the runs small if they are missing")
args, _ = ap.parse_known_args()  # in Jupyter, sys.argv holds the kernel's own arguments: ignored

RUNS = args.runs
SGD, ADAM = RUNS / "sgd", RUNS / "adam"
if not (SGD / "analysis" / "metrics.nc").exists() or not (ADAM / "analysis" / "metrics.nc").exists():
    sys.path.insert(0, str(Path(__file__).parent) if "__file__" in globals() else ".")
    import convex  # the sibling example: records and analyzes both runs

    convex.main(["--small", "--out", str(RUNS), "--no-report"] if args.small else ["--out", str(RUNS), "--no-report"])

# %% [markdown]
# ## One run
#
# `open_metrics` loads the Dataset the analysis wrote (`RUN_DIR/analysis/metrics.nc`).

# %%
ds = trajscope.open_metrics(SGD)
print(ds)
for name in ("inst_gap", "convexity_ratio", "inst_smoothness", "update_corr"):
    a = ds[name].attrs
    print(f"{name:16s} [{a['units']}] holds if {a['holds_if'] or '-':8s} {a['description']}")

# %% [markdown]
# ## Selecting steps
#
# By label with `sel` (a slice of step numbers, inclusive), by position with `isel`, by
# condition with `where`. `loss_line` has an `alpha` dim: `sel(alpha=1.0)` is ℓ(1), the loss
# after the step on the step's own minibatch.

# %%
early = ds.sel(step=slice(0, 19))
last = ds.isel(step=-1)
loss_after = ds["loss_line"].sel(alpha=1.0)
violations = ds["step"].where(ds["inst_gap"] > 0, drop=True)  # steps where convexity fails
print(f"{early.sizes['step']} early pairs; last pair t={int(last['step'])}: inst_gap={float(last['inst_gap']):.3g}")
print(f"steps with inst_gap > 0: {violations.values.tolist()}")
print(f"ℓ(1) − ℓ(0) equals loss_change: "
      f"{bool(np.allclose(loss_after - ds['loss_line'].sel(alpha=0.0), ds['loss_change']))}")

# %% [markdown]
# ## Group by epoch
#
# The convex example stores its steps per epoch in the run's metadata; an `epoch` coordinate
# along `step` turns per-epoch statistics into one `groupby`. A fraction is the mean of a
# boolean; a per-epoch convexity ratio is a ratio of per-epoch sums.

# %%
steps_per_epoch = trajscope.open_run(SGD).manifest["metadata"]["steps_per_epoch"]
if "epoch" not in ds.coords:
    ds = ds.assign_coords(epoch=("step", ds["step"].values // steps_per_epoch))
by_epoch = ds[["inst_gap", "loss_change", "update_corr"]].groupby("epoch").mean()
frac_convex = (ds["inst_gap"] <= 0).groupby("epoch").mean()
ratio_by_epoch = (ds["convexity_num"].groupby("epoch").sum() / ds["convexity_den"].groupby("epoch").sum())
print(by_epoch.to_dataframe().round(5))
print("fraction of pairs with inst_gap <= 0 per epoch:", frac_convex.values.round(3).tolist())
print("convexity ratio per epoch:", ratio_by_epoch.values.round(3).tolist())

# %% [markdown]
# ## Rolling means and exponential averages
#
# `rolling` smooths noisy per-step metrics; `min_periods=1` keeps the first steps.
# `trajscope.report.ema` is the bias-corrected EMA the report draws (the paper used β = 0.99 and
# 0.9999 on long runs).

# %%
window = 10
gap_rolling = ds["inst_gap"].rolling(step=window, min_periods=1).mean()
gap_ema = xr.DataArray(ema(ds["inst_gap"].values, 0.9), coords={"step": ds["step"]}, dims="step")
print(f"rolling({window}) mean of inst_gap, last 3 pairs: {gap_rolling.values[-3:].round(5).tolist()}")
print(f"EMA(0.9) of inst_gap, last pair: {float(gap_ema[-1]):.5f}")

# %% [markdown]
# ## Per layer
#
# Variables ending in `_by_layer` have a `layer` dim (one entry per parameter tensor).

# %%
smooth_by_layer = ds["inst_smoothness_by_layer"].median("step").to_series().sort_values()
print("median instantaneous smoothness per parameter tensor:")
print(smooth_by_layer)

# %% [markdown]
# ## Comparing runs along a `run` dimension
#
# `open_metrics([a, b])` concatenates runs along a new `run` dim (labelled by directory name);
# every query above then works for all runs at once.

# %%
both = trajscope.open_metrics([SGD, ADAM])
comparison = xr.Dataset({
    "frac_inst_gap_le_0": (both["inst_gap"] <= 0).mean("step"),
    "final_convexity_ratio": both["convexity_ratio"].isel(step=-1),
    "median_inst_smoothness": both["inst_smoothness"].median("step"),
    "frac_update_corr_gt_0": (both["update_corr"] > 0).sum("step") / both["update_corr"].notnull().sum("step"),
    "total_loss_change": both["loss_change"].sum("step"),
}).reset_coords(drop=True)  # drop the scalar step/lr left by isel(step=-1)
print(comparison.to_dataframe().T)

# %% [markdown]
# ## A figure
#
# The report's figure functions take `{label: Dataset}` and return a matplotlib `Figure`
# (no pyplot state involved); `trajscope report` draws all of them at once.

# %%
fig = fig_inst_gap({"sgd": trajscope.open_metrics(SGD), "adam": trajscope.open_metrics(ADAM)})
fig.savefig(RUNS / "explore_inst_gap.png", dpi=100)
print(f"wrote {RUNS / 'explore_inst_gap.png'}")

# %%
# What the tests check (and what a script run returns).
FINDINGS = {
    "pairs": int(ds.sizes["step"]),
    "epochs": int(by_epoch.sizes["epoch"]),
    "frac_inst_gap_le_0_by_epoch": frac_convex.values.tolist(),
    "mean_inst_gap_by_epoch": by_epoch["inst_gap"].values.tolist(),
    "convexity_ratio_by_epoch": ratio_by_epoch.values.tolist(),
    "rolling_inst_gap": gap_rolling.values.tolist(),
    "runs": [str(r) for r in both["run"].values],
    "frac_inst_gap_le_0_by_run": comparison["frac_inst_gap_le_0"].values.tolist(),
    "final_convexity_ratio_by_run": comparison["final_convexity_ratio"].values.tolist(),
}
