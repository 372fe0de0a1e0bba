"""Aggregations and summaries of an analysis: functions over the metrics Dataset.

* :func:`headline`: the few numbers ``trajscope analyze`` prints.
* :func:`holds_fraction`: per metric with a ``holds_if`` comparison, the fraction of analyzed pairs
  where the theory's condition holds.
* Convexity-ratio aggregations beside the cumulative ``convexity_ratio`` variable:
  :func:`convexity_ratio_window` (last k pairs), :func:`convexity_ratio_ema` (EMA(β), the
  authors' β = 0.99 / 0.9999), :func:`convexity_ratio_by_epoch`, :func:`convexity_ratio_cumulative`.
  Each one is a ratio of aggregated sums, Σ num / Σ den, and never a mean of per-step ratios (a
  step with a tiny loss change would dominate that). ``reference=True`` uses the
  reference-point terms (``convexity_ref_num``/``convexity_ref_den``) instead.
* :func:`l0l1_fit`: the (L0, L1)-smoothness fit of ``inst_smoothness`` against ‖G0‖.
* :func:`summarize` / :func:`format_summary`: ``trajscope summary RUN_DIR`` and its Python twin.
* What the report draws and tabulates, so that it only presents: :func:`ema` (the one EMA),
  :func:`fraction` (a ``holds_if``-style condition, evaluated by :func:`trajscope.metrics.registry.holds`),
  :func:`stability_ratio`, :func:`running_sum`, :func:`line_argmin`, :func:`table_rows` and
  their labels :data:`TABLE_LABELS`. Each reads the Dataset's variable when it has one and
  computes the registered definition only for a Dataset without it.

Everything runs over the *analyzed pairs* in step order. With a sparse recording schedule, a
"window of k" or an EMA therefore spans k analyzed pairs, not k optimizer steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from trajscope.analysis.health import FLAGS, replay_failures
from trajscope.errors import AnalysisError
from trajscope.metrics.registry import holds

__all__ = [
    "headline", "format_headline", "holds_fraction", "fraction", "convexity_ratio_window",
    "convexity_ratio_ema", "convexity_ratio_by_epoch", "convexity_ratio_cumulative", "l0l1_fit",
    "summarize", "format_summary", "ema", "stability_ratio", "running_sum", "line_argmin",
    "table_rows", "TABLE_LABELS",
]


def fraction(values: Any, condition: str) -> float:
    """The fraction of the finite ``values`` that satisfy ``condition``, a comparison in the
    ``holds_if`` form (``"<= 0"``, ``"> 0"``, …; see :func:`trajscope.metrics.registry.holds`). NaN when
    no value is finite."""
    v = np.asarray(values, dtype=np.float64)
    ok = holds(condition, v)
    if ok is None:
        raise AnalysisError(f"condition {condition!r}: expected a comparison like '<= 0'")
    finite = np.isfinite(v)
    return float(np.mean(ok[finite])) if finite.any() else float("nan")


_ZERO_UPDATE = FLAGS["zero_update"][0]
_CLIPPED = FLAGS["clipped"][0] | FLAGS["clipped_nonuniform"][0]
_BELOW_RESOLUTION = FLAGS["below_resolution"][0]


def _flags(ds: xr.Dataset) -> np.ndarray:
    """``pair_flags`` as int64 (0 for every pair of a Dataset without it)."""
    if "pair_flags" in ds.variables:
        return np.asarray(ds["pair_flags"].values, dtype=np.int64)
    return np.zeros(int(ds.sizes.get("step", 0)), dtype=np.int64)


def headline(ds: xr.Dataset) -> dict[str, float]:
    """Fraction of pairs with ``inst_gap`` ≤ 0, with ``update_corr`` > 0, the final cumulative
    ``convexity_ratio``, median ``inst_smoothness``, the worst replay errors (NaN when a variable
    is absent or all-NaN) and, when training clipped gradients, the clipped pairs.

    The fractions leave out zero-update pairs (``pair_flags`` bit ``zero_update``: x_{t+1} = x_t,
    e.g. lr = 0 during warm-up), where inst_gap = 0 would count as "convex along the step" without
    a step, and pairs below the evaluation's resolution (bit ``below_resolution``: evaluated under
    training's autocast, a loss difference within its rounding has no sign), counted in
    ``pairs_below_resolution``. ``pairs_moved`` is their denominator, present when it differs from
    ``pairs``.
    ``pairs_clipped`` counts the pairs whose step training clipped (uniformly or not), present
    when there are some. ``pairs_replay_failed`` counts the pairs whose replay disagrees with the
    recorded loss or gradient, present when the replay gate fails (:func:`replay_failures`): the
    other numbers may then not describe the training run.
    """
    n = int(ds.sizes.get("step", 0))
    out: dict[str, float] = {"pairs": float(n)}
    flags = _flags(ds)
    moved = _counted(flags)
    if not moved.all():
        out["pairs_moved"] = float(moved.sum())
    below = int(np.count_nonzero(flags & _BELOW_RESOLUTION))
    if below:
        out["pairs_below_resolution"] = float(below)

    def frac(name: str, cond: str) -> float:
        return fraction(np.asarray(ds[name].values, dtype=np.float64)[moved], cond)

    if "inst_gap" in ds:
        out["frac_inst_gap_le_0"] = frac("inst_gap", "<= 0")
    if "inst_gap_fwd" in ds:
        out["frac_inst_gap_fwd_le_0"] = frac("inst_gap_fwd", "<= 0")
    if "update_corr" in ds:
        out["frac_update_corr_gt_0"] = frac("update_corr", "> 0")
    if "convexity_ratio" in ds and ds.sizes.get("step", 0):
        out["final_convexity_ratio"] = float(ds["convexity_ratio"].values[-1])
    if "inst_smoothness" in ds:
        out["median_inst_smoothness"] = _nanstat(np.nanmedian, ds["inst_smoothness"].values)
    for name in ("loss_replay_error", "grad_replay_error"):
        if name in ds:
            out[f"max_{name}"] = _nanstat(np.nanmax, ds[name].values)
    clipped = int(np.count_nonzero(flags & _CLIPPED))
    if clipped:
        out["pairs_clipped"] = float(clipped)
    failed = replay_failures(ds)
    if not failed.ok:
        out["pairs_replay_failed"] = float(failed.failed)
    return out


def _counted(flags: np.ndarray) -> np.ndarray:
    """The pairs the headline fractions count: with an update, and above the evaluation's resolution."""
    return (flags & (_ZERO_UPDATE | _BELOW_RESOLUTION)) == 0


def _nanstat(fn: Callable[[np.ndarray], Any], v: Any) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(fn(v)) if np.any(np.isfinite(v)) else float("nan")


_LABELS = {
    "pairs": "pairs analyzed",
    "pairs_moved": "pairs counted (the fractions' denominator)",
    "pairs_below_resolution": "pairs below the evaluation's resolution",
    "pairs_clipped": "gradient clipping",
    "frac_inst_gap_le_0": "pairs with inst_gap <= 0 (convex along the step)",
    "frac_inst_gap_fwd_le_0": "pairs with inst_gap_fwd <= 0",
    "frac_update_corr_gt_0": "pairs with update_corr > 0 (next gradient uphill)",
    "final_convexity_ratio": "final cumulative convexity_ratio",
    "median_inst_smoothness": "median inst_smoothness",
    "max_loss_replay_error": "max loss_replay_error",
    "max_grad_replay_error": "max grad_replay_error",
}


def _untrusted(failed: float, pairs: float) -> str:
    return (f"replay failed on {int(failed)} of {int(pairs)} pairs: the findings below may not "
            "describe the training run")


def format_headline(h: dict[str, float]) -> str:
    lines = [_untrusted(h["pairs_replay_failed"], h.get("pairs", 0))] if "pairs_replay_failed" in h else []
    for k, v in h.items():
        label = _LABELS.get(k, k)
        if k == "pairs_replay_failed":
            continue
        if k == "pairs_clipped":
            lines.append(f"  {label:<52} clipped on {int(v)} of {int(h.get('pairs', v))} pairs")
        elif k == "pairs_below_resolution":
            lines.append(f"  {label:<52} {int(v)} (left out of the fractions)")
        elif k in ("pairs", "pairs_moved"):
            lines.append(f"  {label:<52} {int(v)}")
        elif not np.isfinite(v):  # nowhere defined, e.g. grad_replay_error without stored gradients
            lines.append(f"  {label:<52} n/a")
        elif k.startswith("frac_"):
            lines.append(f"  {label:<52} {v:.1%}")
        else:
            lines.append(f"  {label:<52} {v:.4g}")
    return "\n".join(lines)


# --- where the theory holds ----------------------------------------------------------------------


def holds_fraction(ds: xr.Dataset) -> dict[str, float]:
    """For every step-only variable whose ``holds_if`` is a comparison (``"<= 0"``, ``"> 0"``, …):
    the fraction of pairs, among those where it is defined (finite), that satisfy it. NaN when it
    is nowhere defined. ``bounded`` and empty conditions are not fractions and are skipped.
    Zero-update pairs and pairs below resolution (``pair_flags``) are left out, as in :func:`headline`."""
    out: dict[str, float] = {}
    moved = _counted(_flags(ds))
    for name, da in ds.data_vars.items():
        cond = str(da.attrs.get("holds_if", ""))
        if da.dims == ("step",) and holds(cond, []) is not None:
            out[str(name)] = fraction(np.asarray(da.values, dtype=np.float64)[moved], cond)
    return out


# --- convexity-ratio aggregations ----------------------------------------------------------------


def _terms(ds: xr.Dataset, reference: bool) -> tuple[np.ndarray, np.ndarray]:
    num, den = ("convexity_ref_num", "convexity_ref_den") if reference else ("convexity_num", "convexity_den")
    for n in (num, den):
        if n not in ds:
            raise AnalysisError(f"the Dataset has no {n!r}; analyze with that metric (or all metrics)")
    # a pair where a term is undefined contributes nothing, as in the cumulative series variables
    return (np.nan_to_num(np.asarray(ds[num].values, dtype=np.float64), nan=0.0),
            np.nan_to_num(np.asarray(ds[den].values, dtype=np.float64), nan=0.0))


def _ratio_da(ds: xr.Dataset, num: np.ndarray, den: np.ndarray, name: str, what: str) -> xr.DataArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den != 0, num / den, np.nan)
    return xr.DataArray(r, dims=("step",), coords={"step": ds["step"].values}, name=name,
                        attrs={"long_name": what, "units": "1"})


def convexity_ratio_cumulative(ds: xr.Dataset, *, reference: bool = False) -> xr.DataArray:
    """Σ_{s≤t} num_s / Σ_{s≤t} den_s (the ``convexity_ratio`` / ``convexity_ratio_ref`` variable)."""
    num, den = _terms(ds, reference)
    return _ratio_da(ds, np.cumsum(num), np.cumsum(den), "convexity_ratio_cumulative",
                     "cumulative convexity ratio")


def convexity_ratio_window(ds: xr.Dataset, k: int, *, reference: bool = False) -> xr.DataArray:
    """Σ num / Σ den over the last ``k`` analyzed pairs up to and including t (fewer at the start)."""
    if not isinstance(k, int) or k < 1:
        raise AnalysisError(f"k={k!r}: expected a window of at least 1 pair")
    num, den = _terms(ds, reference)
    # direct window sums, not differences of running sums (those cancel badly on long runs)
    box = np.ones(k)
    return _ratio_da(ds, np.convolve(num, box)[: len(num)], np.convolve(den, box)[: len(den)],
                     f"convexity_ratio_last{k}", f"convexity ratio over the last {k} pairs")


def convexity_ratio_ema(ds: xr.Dataset, beta: float = 0.99, *, reference: bool = False) -> xr.DataArray:
    """EMA_β(num) / EMA_β(den) with :func:`ema`, m_t = β·m_{t−1} + (1 − β)·v_t from m = 0.

    Both averages share β and every pair counts (an undefined term is 0), so the bias
    correction 1/(1 − β^t) cancels in the ratio.
    """
    if not 0 <= beta < 1:
        raise AnalysisError(f"beta={beta!r}: expected 0 <= beta < 1")
    num, den = _terms(ds, reference)
    return _ratio_da(ds, ema(num, beta), ema(den, beta), f"convexity_ratio_ema{beta:g}",
                     f"EMA({beta:g}) convexity ratio")


def _epochs(ds: xr.Dataset, steps_per_epoch: int | None) -> np.ndarray:
    if steps_per_epoch is not None:
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise AnalysisError(f"steps_per_epoch={steps_per_epoch!r}: expected a positive int")
        return np.asarray(ds["step"].values) // steps_per_epoch
    if "epoch" in ds.coords:
        return np.asarray(ds["epoch"].values)
    raise AnalysisError(
        "per-epoch aggregation needs epochs: the Dataset has no 'epoch' coordinate; pass "
        "steps_per_epoch=N (--steps-per-epoch N)"
    )


def convexity_ratio_by_epoch(ds: xr.Dataset, steps_per_epoch: int | None = None, *,
                             reference: bool = False) -> xr.DataArray:
    """Σ num / Σ den over the analyzed pairs of each epoch (dim ``epoch``).

    Epochs come from ``steps_per_epoch`` (epoch = step // steps_per_epoch) or from an ``epoch``
    coordinate of the Dataset.
    """
    num, den = _terms(ds, reference)
    ep = _epochs(ds, steps_per_epoch)
    keys = np.unique(ep)
    sn = np.array([num[ep == e].sum() for e in keys])
    sd = np.array([den[ep == e].sum() for e in keys])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(sd != 0, sn / sd, np.nan)
    return xr.DataArray(r, dims=("epoch",), coords={"epoch": keys}, name="convexity_ratio_by_epoch",
                        attrs={"long_name": "per-epoch convexity ratio", "units": "1"})


# --- (L0, L1)-smoothness -------------------------------------------------------------------------


def l0l1_fit(ds: xr.Dataset, l1: float | np.ndarray | None = None, *, points: int = 33) -> xr.Dataset:
    """Fit inst_smoothness_t ≤ L0 + L1·‖G0_t‖ over the analyzed pairs.

    For each L1 the smallest valid L0 is ``max(0, max_t(inst_smoothness_t − L1·‖G0_t‖))``. With
    ``l1=None`` the frontier is evaluated on ``points`` values from 0 (plain L-smoothness,
    L0 = max inst_smoothness) to the L1 where L0 reaches 0 (max_t inst_smoothness_t / ‖G0_t‖).
    How loose the bound is: ``looseness_median`` / ``looseness_max`` are the median and maximum of
    (L0 + L1‖G0_t‖) / inst_smoothness_t, 1 where the bound is tight.

    Returns a Dataset over dim ``l1`` with ``l0``, ``looseness_median``, ``looseness_max``.
    ‖G0‖ is the ``replay_grad_norm`` variable.
    """
    for n in ("inst_smoothness", "replay_grad_norm"):
        if n not in ds:
            raise AnalysisError(f"the (L0, L1) fit needs {n!r} in the Dataset")
    s = np.asarray(ds["inst_smoothness"].values, dtype=np.float64)
    g = np.asarray(ds["replay_grad_norm"].values, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(g)
    s, g = s[ok], g[ok]
    if l1 is None:
        top = float(np.max(s[g > 0] / g[g > 0])) if np.any(g > 0) else 0.0
        grid = np.linspace(0.0, top, points)
    else:
        grid = np.atleast_1d(np.asarray(l1, dtype=np.float64))
    if s.size == 0:
        nan = np.full(grid.shape, np.nan)
        l0, med, mx = nan, nan, nan
    else:
        l0 = np.maximum(0.0, np.max(s[None, :] - grid[:, None] * g[None, :], axis=1))
        bound = l0[:, None] + grid[:, None] * g[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            loose = np.where(s[None, :] > 0, bound / s[None, :], np.nan)
        med = np.array([_nanstat(np.nanmedian, row) for row in loose])
        mx = np.array([_nanstat(np.nanmax, row) for row in loose])
    return xr.Dataset(
        {
            "l0": ("l1", l0, {"long_name": "smallest L0", "units": "loss/param^2",
                              "description": "max(0, max_t(inst_smoothness_t − L1·‖G0_t‖))"}),
            "looseness_median": ("l1", med, {"long_name": "median looseness", "units": "1",
                                             "description": "median_t (L0 + L1‖G0_t‖) / inst_smoothness_t"}),
            "looseness_max": ("l1", mx, {"long_name": "max looseness", "units": "1",
                                         "description": "max_t (L0 + L1‖G0_t‖) / inst_smoothness_t"}),
        },
        coords={"l1": ("l1", grid, {"long_name": "L1", "units": "1/param"})},
        attrs={"pairs": int(s.size)},
    )


# --- what the report draws and tabulates -------------------------------------------------------


def ema(values: Any, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average: m_k = β·m_{k−1} + (1 − β)·v_k from m = 0, shown
    as m_k / (1 − β^k) after k finite values. NaNs are skipped (the average carries over them and
    is NaN until the first finite value)."""
    if not 0 <= beta < 1:
        raise AnalysisError(f"ema beta={beta!r}: expected 0 <= beta < 1")
    v = np.asarray(values, dtype=np.float64)
    out = np.full(v.shape, np.nan)
    m, k = 0.0, 0
    for i, x in enumerate(v):
        if np.isfinite(x):
            m = beta * m + (1 - beta) * x
            k += 1
        if k:
            out[i] = m / (1 - beta**k)
    return out


def stability_ratio(ds: xr.Dataset) -> np.ndarray:
    """The Dataset's ``stability_ratio``, else its registered definition inst_smoothness · lr / 2
    (lr of param group 0): 1 is the edge of stability of plain gradient descent."""
    if "stability_ratio" in ds.variables:
        return np.asarray(ds["stability_ratio"].values, dtype=np.float64)
    return np.asarray(ds["inst_smoothness"].values * ds["lr"].values / 2, dtype=np.float64)


def running_sum(ds: xr.Dataset, name: str) -> np.ndarray:
    """Σ_{s≤t} ``name``_s over the analyzed pairs (NaN pairs count 0): the Dataset's
    ``<name>_cumsum`` series variable when it has one (``update_corr_cumsum``,
    ``loss_change_cumsum``), else the same sum of ``name``."""
    if f"{name}_cumsum" in ds.variables:
        return np.asarray(ds[f"{name}_cumsum"].values, dtype=np.float64)
    return np.nancumsum(np.asarray(ds[name].values, dtype=np.float64))


def line_argmin(ds: xr.Dataset) -> np.ndarray:
    """Per step, the α grid point minimising ℓ(α): the Dataset's ``line_argmin``, else the same
    argmin of ``loss_line`` (NaN points skipped; α of the first point for an all-NaN line)."""
    if "line_argmin" in ds.variables:
        return np.asarray(ds["line_argmin"].values, dtype=np.float64)
    line = np.asarray(ds["loss_line"].values, dtype=np.float64)
    alphas = np.asarray(ds["alpha"].values, dtype=np.float64)
    return alphas[np.argmin(np.where(np.isfinite(line), line, np.inf), axis=1)]


def _last_half_median(v: np.ndarray) -> float:
    return _nanstat(np.nanmedian, v[len(v) // 2:])


TABLE_LABELS = {
    "pairs": "pairs analyzed",
    "pairs_moved": "pairs counted (the fractions' denominator)",
    "pairs_below_resolution": "pairs below the evaluation's resolution",
    "pairs_clipped": "pairs whose gradient training clipped",
    "frac_inst_gap_le_0": "pairs with inst_gap ≤ 0 (convex along the step)",
    "frac_inst_gap_fwd_le_0": "pairs with inst_gap_fwd ≤ 0",
    "frac_update_corr_gt_0": "pairs with update_corr > 0 (next gradient uphill)",
    "final_convexity_ratio": "final cumulative convexity_ratio",
    "median_inst_smoothness": "median inst_smoothness",
    "median_stability_ratio_last_half": "median stability ratio (inst_smoothness·lr/2), last half",
    "frac_stability_ratio_gt_1": "pairs with stability ratio > 1",
    "sum_loss_change": "Σ loss_change",
    "sum_update_corr": "Σ update_corr",
    "max_loss_replay_error": "max loss_replay_error",
    "max_grad_replay_error": "max grad_replay_error",
    "pairs_replay_failed": "pairs whose replay failed (the findings may not describe the training run)",
}
"""Row labels of the report's summary table (:func:`table_rows`)."""


def table_rows(ds: xr.Dataset) -> dict[str, float]:
    """The report's summary table for one run: :func:`headline`, the stability ratio (median over
    the last half, fraction of pairs above 1) and the totals Σ loss_change, Σ update_corr (NaN
    when no pair defines them)."""
    rows = dict(headline(ds))
    if "inst_smoothness" in ds.variables or "stability_ratio" in ds.variables:
        sr = stability_ratio(ds)
        rows["median_stability_ratio_last_half"] = _last_half_median(sr)
        rows["frac_stability_ratio_gt_1"] = fraction(sr, "> 1")
    for name in ("loss_change", "update_corr"):
        if name in ds.variables:
            v = np.asarray(ds[name].values, dtype=np.float64)
            rows[f"sum_{name}"] = float(running_sum(ds, name)[-1]) if np.isfinite(v).any() else float("nan")
    return rows


# --- summary -------------------------------------------------------------------------------------


def summarize(run_or_ds: str | Path | xr.Dataset, *, steps_per_epoch: int | None = None,
              window: int = 10, betas: tuple[float, ...] = (0.99, 0.9999),
              analysis: str | Path | None = None) -> dict[str, Any]:
    """Everything ``trajscope summary`` prints, as a dict (its Python twin).

    Args:
        run_or_ds: a run directory (its ``analysis/metrics.nc``) or a metrics Dataset.
        steps_per_epoch: also aggregate the convexity ratio per epoch (or use an ``epoch`` coord).
        window: k of the last-k convexity ratio.
        betas: EMA factors of the EMA convexity ratio.
        analysis: the run's analysis directory when it is not ``RUN/analysis`` (the ``out=`` of
            :func:`trajscope.analyze`).
    """
    if isinstance(run_or_ds, xr.Dataset):
        ds = run_or_ds
    else:
        from trajscope.analysis.driver import open_metrics

        ds = open_metrics(run_or_ds, analysis)
    n = int(ds.sizes.get("step", 0))
    out: dict[str, Any] = {"pairs": n, "replay_ok": replay_failures(ds).ok, "headline": headline(ds),
                           "holds": holds_fraction(ds)}
    conv: dict[str, Any] = {}
    if n and "convexity_num" in ds and "convexity_den" in ds:
        cum = convexity_ratio_cumulative(ds).values
        conv["final_cumulative"] = float(cum[-1])
        conv["frac_steps_cumulative_gt_0"] = fraction(cum, "> 0")
        conv[f"final_last{window}"] = float(convexity_ratio_window(ds, window).values[-1])
        for b in betas:
            conv[f"final_ema{b:g}"] = float(convexity_ratio_ema(ds, b).values[-1])
        if steps_per_epoch is not None or "epoch" in ds.coords:
            by = convexity_ratio_by_epoch(ds, steps_per_epoch)
            conv["by_epoch"] = {int(e): float(v) for e, v in zip(by["epoch"].values, by.values, strict=True)}
    if n and "convexity_ref_num" in ds and "convexity_ref_den" in ds:
        conv["final_cumulative_ref"] = float(convexity_ratio_cumulative(ds, reference=True).values[-1])
    out["convexity_ratio"] = conv
    if n and "stability_ratio" in ds:
        out["median_stability_ratio_last_half"] = _last_half_median(stability_ratio(ds))
    if "inst_smoothness" in ds:
        out["max_inst_smoothness"] = _nanstat(np.nanmax, ds["inst_smoothness"].values)
    if "sharpness" in ds:
        out["median_sharpness"] = _nanstat(np.nanmedian, ds["sharpness"].values)
    if n and "inst_smoothness" in ds and "replay_grad_norm" in ds:
        fit = l0l1_fit(ds)
        i = int(np.nanargmin(fit["looseness_median"].values)) if np.any(
            np.isfinite(fit["looseness_median"].values)) else 0
        out["l0l1"] = {
            "L_plain": float(fit["l0"].values[0]),
            "looseness_median_plain": float(fit["looseness_median"].values[0]),
            "best_l1": float(fit["l1"].values[i]),
            "best_l0": float(fit["l0"].values[i]),
            "looseness_median_best": float(fit["looseness_median"].values[i]),
        }
    return out


def format_summary(s: dict[str, Any]) -> str:
    """The text of ``trajscope summary``."""
    h = s.get("headline", {})
    lines = [_untrusted(h["pairs_replay_failed"], s["pairs"])] if "pairs_replay_failed" in h else []
    lines += [f"pairs analyzed: {s['pairs']}", "", "where the theory holds (fraction of pairs):"]
    from trajscope.metrics.registry import get_metrics

    specs = get_metrics()
    for name, frac in s["holds"].items():
        cond = specs[name].holds_if if name in specs else ""
        lines.append(f"  {name:<28} {cond:<10} {frac:7.1%}" if np.isfinite(frac)
                     else f"  {name:<28} {cond:<10}     n/a")
    conv = s.get("convexity_ratio", {})
    if conv:
        lines += ["", "convexity ratio (Σ num / Σ den):"]
        for k, v in conv.items():
            if k == "by_epoch":
                lines.append("  per epoch: " + ", ".join(f"{e}: {r:.4g}" for e, r in v.items()))
            elif k.startswith("frac_"):
                lines.append(f"  {k:<28} {v:.1%}")
            else:
                lines.append(f"  {k:<28} {v:.4g}")
    scal = [(k, s[k]) for k in ("median_stability_ratio_last_half", "max_inst_smoothness",
                                "median_sharpness") if k in s]
    if scal:
        lines += ["", "smoothness:"] + [f"  {k:<34} {v:.4g}" for k, v in scal]
    if "l0l1" in s:
        f = s["l0l1"]
        lines += [
            "",
            "(L0, L1)-smoothness fit, inst_smoothness <= L0 + L1·‖G0‖ for every pair:",
            f"  L1 = 0 (plain L-smoothness): L = {f['L_plain']:.4g}, median looseness "
            f"{f['looseness_median_plain']:.3g}x",
            f"  tightest median: L1 = {f['best_l1']:.4g}, L0 = {f['best_l0']:.4g}, median "
            f"looseness {f['looseness_median_best']:.3g}x",
        ]
    rep = [(k, h[k]) for k in ("max_loss_replay_error", "max_grad_replay_error") if k in h]
    if rep:
        lines += ["", "replay fidelity:"] + [f"  {k:<34} {v:.3g}" if np.isfinite(v) else f"  {k:<34} n/a"
                                              for k, v in rep]
    if "pairs_clipped" in h:
        lines.append(f"  gradient clipping: clipped on {int(h['pairs_clipped'])} of {s['pairs']} pairs "
                     "(replayed as c·G0 where the clip was uniform)")
    if "pairs_below_resolution" in h:
        lines.append(f"  {int(h['pairs_below_resolution'])} pairs below the evaluation's resolution "
                     "(loss differences within its rounding), left out of the fractions")
    if "pairs_moved" in h:
        lines.append(f"  fractions over the {int(h['pairs_moved'])} of {s['pairs']} pairs counted")
    return "\n".join(lines)
