"""Headline numbers of an analysis: the first things people ask of a run."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

__all__ = ["headline", "format_headline"]


def _frac(da: xr.DataArray, pred: Any) -> float:
    v = np.asarray(da.values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.mean(pred(v))) if v.size else float("nan")


def headline(ds: xr.Dataset) -> dict[str, float]:
    """Fraction of pairs with ``inst_gap`` ≤ 0, with ``update_corr`` > 0, the final cumulative
    ``convexity_ratio``, median ``inst_smoothness`` and the worst replay errors (NaN when a
    variable is absent or all-NaN)."""
    out: dict[str, float] = {"pairs": float(ds.sizes.get("step", 0))}
    if "inst_gap" in ds:
        out["frac_inst_gap_le_0"] = _frac(ds["inst_gap"], lambda v: v <= 0)
    if "inst_gap_fwd" in ds:
        out["frac_inst_gap_fwd_le_0"] = _frac(ds["inst_gap_fwd"], lambda v: v <= 0)
    if "update_corr" in ds:
        out["frac_update_corr_gt_0"] = _frac(ds["update_corr"], lambda v: v > 0)
    if "convexity_ratio" in ds and ds.sizes.get("step", 0):
        out["final_convexity_ratio"] = float(ds["convexity_ratio"].values[-1])
    if "inst_smoothness" in ds:
        out["median_inst_smoothness"] = float(np.nanmedian(ds["inst_smoothness"].values))
    for name in ("loss_replay_error", "grad_replay_error"):
        if name in ds:
            out[f"max_{name}"] = float(np.nanmax(ds[name].values))
    return out


_LABELS = {
    "pairs": "pairs analyzed",
    "frac_inst_gap_le_0": "pairs with inst_gap <= 0 (convex along the step)",
    "frac_inst_gap_fwd_le_0": "pairs with inst_gap_fwd <= 0",
    "frac_update_corr_gt_0": "pairs with update_corr > 0 (next gradient uphill)",
    "final_convexity_ratio": "final cumulative convexity_ratio",
    "median_inst_smoothness": "median inst_smoothness",
    "max_loss_replay_error": "max loss_replay_error",
    "max_grad_replay_error": "max grad_replay_error",
}


def format_headline(h: dict[str, float]) -> str:
    lines = []
    for k, v in h.items():
        label = _LABELS.get(k, k)
        if k == "pairs":
            lines.append(f"  {label:<52} {int(v)}")
        elif k.startswith("frac_"):
            lines.append(f"  {label:<52} {v:.1%}")
        else:
            lines.append(f"  {label:<52} {v:.4g}")
    return "\n".join(lines)
