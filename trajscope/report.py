"""``trajscope report``: the paper-style figures of one or several analyzed runs, as PNG files and
a small ``index.html`` that shows them beside the summary table.

Each figure is a pure function of the metrics Datasets (one per run, keyed by a label) that
returns a :class:`matplotlib.figure.Figure`; every curve or image it draws carries a ``gid`` of the
form ``"<what>/<run label>"``, so the data behind a figure can be read back from the figure itself
(:func:`figure_data`) and compared with the Dataset. Several runs overlay in one figure (the heat
map gets one panel per run). Axis labels and units come from the variables' attrs.

Figures (a figure whose variables are absent from every run is skipped, so the report works on
Datasets from older or newer trajscope versions alike):

* ``loss``: the same-batch loss ℓ(0) = f(x_t; z_t) at each analyzed step;
* ``loss_line``: ℓ(α) − ℓ(0) as a step × α heat map, each step scaled by its own largest
  |ℓ(α) − ℓ(0)| so the *shape* of every step's line is visible, with the α = 0 and α = 1 lines
  and the grid minimiser of ℓ;
* ``inst_gap``: per step, its EMA, and the zero line it should stay below;
* ``convexity_ratio``: cumulative (the Dataset's variable) and windowed (over the last k pairs);
* ``smoothness``: ``inst_smoothness`` against 2/lr (and ``sharpness`` when present), beside the
  stability ratio inst_smoothness·lr/2 (the ``stability_ratio`` variable when present);
* ``update_corr``: per step, beside the cumulative sums of ``update_corr`` and ``loss_change``
  (the online-to-non-convex view: the loss change is the sum of the linear terms);
* ``replay``: ``loss_replay_error`` and ``grad_replay_error`` with their tolerances.

matplotlib is imported lazily and only through its object-oriented API with the Agg canvas, so a
report never changes the pyplot backend or global state of the caller (a notebook, a test).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from trajscope.errors import AnalysisError, RunFormatError
from trajscope.summary import convexity_ratio_window

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "Report",
    "FIGURES",
    "write_report",
    "load_runs",
    "ema",
    "stability_ratio",
    "figure_data",
    "fig_loss",
    "fig_loss_line",
    "fig_inst_gap",
    "fig_convexity_ratio",
    "fig_smoothness",
    "fig_update_corr",
    "fig_replay",
    "summary_rows",
    "loss_line_shape",
]

REPORT_DIR = "report"
REPLAY_FLOOR = 1e-18
"""Replay errors are drawn on a log axis; exact zeros are shown at this floor."""

Runs = Mapping[str, xr.Dataset]


# --- helpers over the Dataset (pure numpy; reused by the tests) -----------------------------------


def ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (β weight on the past), NaNs skipped (the average
    carries over them and is NaN until the first finite value)."""
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
    """The Dataset's ``stability_ratio`` when present, else inst_smoothness · lr / 2 (its
    definition in metrics.md): 1 is the edge of stability of plain gradient descent."""
    if "stability_ratio" in ds:
        return np.asarray(ds["stability_ratio"].values, dtype=np.float64)
    return np.asarray(ds["inst_smoothness"].values * ds["lr"].values / 2, dtype=np.float64)


def _default_window(n: int) -> int:
    return max(2, n // 10)


def _label(da: xr.DataArray, fallback: str = "") -> str:
    """"long_name [units]" from the attrs (the variable name when there is no long_name)."""
    name = da.attrs.get("long_name") or fallback or str(da.name)
    units = da.attrs.get("units")
    return f"{name} [{units}]" if units else name


def _has(runs: Runs, *names: str) -> bool:
    return any(all(n in ds.variables for n in names) for ds in runs.values())


def _vals(ds: xr.Dataset, name: str) -> np.ndarray:
    return np.asarray(ds[name].values, dtype=np.float64)


def _steps(ds: xr.Dataset) -> np.ndarray:
    return np.asarray(ds["step"].values)


def _first(runs: Runs, name: str) -> xr.DataArray:
    for ds in runs.values():
        if name in ds.variables:
            return ds[name]
    raise KeyError(name)


def _robust_ylim(ax: Axes, arrays: Sequence[np.ndarray], lo: float = 2, hi: float = 98,
                 include: Sequence[float] = ()) -> None:
    """Clip the view (not the data) to a percentile range, so one exploding ratio does not flatten
    every other curve."""
    vals = np.concatenate([np.ravel(a)[np.isfinite(np.ravel(a))] for a in arrays] + [np.array(include, float)])
    if vals.size < 2:
        return
    a, b = (float(v) for v in np.percentile(vals, [lo, hi]))
    for v in include:
        a, b = min(a, v), max(b, v)
    pad = 0.08 * (b - a) if b > a else (abs(a) or 1.0) * 0.1
    ax.set_ylim(a - pad, b + pad)


def _maybe_symlog(ax: Axes, arrays: Sequence[np.ndarray]) -> None:
    """Symmetric log axis when the data spans more than three decades (signs stay visible)."""
    vals = np.abs(np.concatenate([np.ravel(a) for a in arrays]))
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if vals.size and vals.max() / max(np.percentile(vals, 10), 1e-300) > 1e3:
        ax.set_yscale("symlog", linthresh=float(np.percentile(vals, 10)))


def _colors(runs: Runs) -> dict[str, str]:
    return {label: f"C{i % 10}" for i, label in enumerate(runs)}


def _new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.0) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _step_axis(ax: Axes, runs: Runs) -> None:
    ds = next(iter(runs.values()))
    ax.set_xlabel(_label(ds["step"], "step"))


# --- the figures ----------------------------------------------------------------------------------


def fig_loss(runs: Runs) -> Figure:
    """ℓ(0) = f(x_t; z_t), the minibatch loss at the start of each analyzed step."""
    fig, (ax,) = _new_figure()
    colors = _colors(runs)
    for label, ds in runs.items():
        y = _vals(ds, "loss_line")[:, _alpha_index(ds, 0.0)]
        ax.plot(_steps(ds), y, color=colors[label], lw=1, label=label, gid=f"loss/{label}")
    ax.set_ylabel(f"ℓ(0) = f(x_t; z_t) [{_first(runs, 'loss_line').attrs.get('units', 'loss')}]")
    ax.set_yscale("log" if all(np.nanmin(_vals(ds, "loss_line")) > 0 for ds in runs.values()) else "linear")
    ax.set_title("minibatch loss at each analyzed step")
    _step_axis(ax, runs)
    ax.legend(fontsize="small")
    return fig


def _alpha_index(ds: xr.Dataset, a: float) -> int:
    alphas = np.asarray(ds["alpha"].values, dtype=np.float64)
    i = int(np.argmin(np.abs(alphas - a)))
    if abs(alphas[i] - a) > 1e-9:
        raise AnalysisError(f"α={a} is not on the analysis grid {alphas.tolist()}")
    return i


def loss_line_shape(ds: xr.Dataset) -> np.ndarray:
    """(ℓ(α) − ℓ(0)) / max_α |ℓ(α) − ℓ(0)| per step: what the heat map shows (in [−1, 1])."""
    line = _vals(ds, "loss_line")
    rel = line - line[:, [_alpha_index(ds, 0.0)]]
    scale = np.nanmax(np.abs(rel), axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, rel / scale, 0.0)


def fig_loss_line(runs: Runs) -> Figure:
    """The loss along every step as a step × α heat map, one panel per run."""
    from matplotlib.colors import Normalize

    fig, axes = _new_figure(ncols=len(runs), width=4.6, height=4.4)
    mesh = None
    for ax, (label, ds) in zip(axes, runs.items()):
        alphas = np.asarray(ds["alpha"].values, dtype=np.float64)
        shape = loss_line_shape(ds)
        mesh = ax.pcolormesh(alphas, _steps(ds), shape, shading="nearest", cmap="RdBu_r",
                             norm=Normalize(-1, 1), gid=f"loss_line/{label}", rasterized=True)
        argmin = alphas[np.nanargmin(np.where(np.isfinite(_vals(ds, "loss_line")),
                                              _vals(ds, "loss_line"), np.inf), axis=1)]
        ax.plot(argmin, _steps(ds), ".", ms=2.5, color="k", gid=f"line_argmin/{label}",
                label="grid argmin of ℓ")
        ax.axvline(0.0, color="0.3", lw=0.8, ls=":")
        ax.axvline(1.0, color="k", lw=1.2, ls="--", label="α = 1 (the step taken)")
        ax.set_xlabel(_label(ds["alpha"], "α"))
        ax.set_ylabel(_label(ds["step"], "step"))
        ax.invert_yaxis()
        ax.set_title(label, fontsize="medium")
    axes[0].legend(fontsize="x-small", loc="lower left")
    if mesh is not None:
        cb = fig.colorbar(mesh, ax=axes, shrink=0.9)
        cb.set_label("(ℓ(α) − ℓ(0)) / max_α |ℓ(α) − ℓ(0)|, per step")
    fig.suptitle(f"{_first(runs, 'loss_line').attrs.get('long_name', 'loss along the step')}: "
                 "ℓ(α) = f(x_t + αΔ_t; z_t)")
    return fig


def fig_inst_gap(runs: Runs, beta: float = 0.9) -> Figure:
    """``inst_gap`` per step with its EMA and the zero line (convex along the step below it)."""
    fig, (ax,) = _new_figure()
    colors = _colors(runs)
    arrays = []
    for label, ds in runs.items():
        x, y = _steps(ds), _vals(ds, "inst_gap")
        frac = float(np.mean(y[np.isfinite(y)] <= 0)) if np.isfinite(y).any() else float("nan")
        ax.plot(x, y, color=colors[label], lw=0.6, alpha=0.35, gid=f"inst_gap/{label}")
        ax.plot(x, ema(y, beta), color=colors[label], lw=1.8, gid=f"inst_gap_ema/{label}",
                label=f"{label}: EMA β={beta} (≤ 0 on {frac:.0%} of steps)")
        arrays.append(y)
    ax.axhline(0.0, color="k", lw=0.8, gid="zero")
    _maybe_symlog(ax, arrays)
    da = _first(runs, "inst_gap")
    ax.set_ylabel(_label(da))
    ax.set_title(f"{da.attrs.get('long_name', 'inst_gap')} (holds if {da.attrs.get('holds_if', '<= 0')})")
    _step_axis(ax, runs)
    ax.legend(fontsize="small")
    return fig


def fig_convexity_ratio(runs: Runs, window: int | None = None) -> Figure:
    """Cumulative ``convexity_ratio`` (solid) and the same ratio over the last k pairs (dashed)."""
    fig, (ax,) = _new_figure()
    colors = _colors(runs)
    arrays = []
    for label, ds in runs.items():
        x = _steps(ds)
        cum = _vals(ds, "convexity_ratio")
        k = window or _default_window(len(x))
        win = convexity_ratio_window(ds, k).values
        ax.plot(x, cum, color=colors[label], lw=1.8, gid=f"convexity_ratio/{label}",
                label=f"{label}: cumulative")
        ax.plot(x, win, color=colors[label], lw=0.8, ls="--", gid=f"convexity_ratio_window/{label}",
                label=f"{label}: last {k} pairs")
        arrays += [cum, win]
    ax.axhline(0.0, color="k", lw=0.8, gid="zero")
    _robust_ylim(ax, arrays, include=(0.0,))
    da = _first(runs, "convexity_ratio")
    ax.set_ylabel(_label(da))
    ax.set_title(f"convexity ratio Σℓ'(1) / Σ(ℓ(1) − ℓ(0)) (holds if {da.attrs.get('holds_if', '> 0')})")
    _step_axis(ax, runs)
    ax.legend(fontsize="small")
    return fig


def fig_smoothness(runs: Runs) -> Figure:
    """``inst_smoothness`` against 2/lr (and ``sharpness`` when present), beside the stability
    ratio inst_smoothness·lr/2."""
    fig, (ax, ax2) = _new_figure(ncols=2, width=5.2)
    colors = _colors(runs)
    for label, ds in runs.items():
        x = _steps(ds)
        ax.plot(x, _vals(ds, "inst_smoothness"), color=colors[label], lw=1,
                gid=f"inst_smoothness/{label}", label=f"{label}: inst_smoothness")
        lr = np.asarray(ds["lr"].values, dtype=np.float64)
        with np.errstate(divide="ignore"):
            ax.plot(x, 2 / lr, color=colors[label], lw=1.2, ls="--", gid=f"two_over_lr/{label}",
                    label=f"{label}: 2/lr")
        if "sharpness" in ds.variables:
            ax.plot(x, _vals(ds, "sharpness"), color=colors[label], lw=1.2, ls=":",
                    gid=f"sharpness/{label}", label=f"{label}: sharpness λ_max")
        ax2.plot(x, stability_ratio(ds), color=colors[label], lw=1, gid=f"stability_ratio/{label}",
                 label=label)
    da = _first(runs, "inst_smoothness")
    if any(np.any(_vals(ds, "inst_smoothness") > 0) for ds in runs.values()):
        ax.set_yscale("log")  # non-positive values (none expected: it is a norm ratio) are hidden
    ax.set_ylabel(_label(da))
    ax.set_title("instantaneous smoothness vs the descent-lemma limit 2/lr", fontsize="medium")
    _step_axis(ax, runs)
    ax.legend(fontsize="x-small")
    ax2.axhline(1.0, color="k", lw=0.8, ls="--", gid="one")
    src = next((ds["stability_ratio"] for ds in runs.values() if "stability_ratio" in ds.variables), None)
    ax2.set_ylabel(_label(src) if src is not None else "inst_smoothness · lr / 2 [1]")
    ax2.set_yscale("log")
    ax2.set_title("stability ratio (1 = edge of stability of gradient descent)", fontsize="medium")
    _step_axis(ax2, runs)
    ax2.legend(fontsize="x-small")
    return fig


def fig_update_corr(runs: Runs) -> Figure:
    """``update_corr`` per step, and its running sum beside the running sum of ``loss_change``."""
    fig, (ax, ax2) = _new_figure(ncols=2, width=5.2)
    colors = _colors(runs)
    arrays = []
    for label, ds in runs.items():
        x, uc = _steps(ds), _vals(ds, "update_corr")
        frac = float(np.mean(uc[np.isfinite(uc)] > 0)) if np.isfinite(uc).any() else float("nan")
        ax.plot(x, uc, color=colors[label], lw=0.8, gid=f"update_corr/{label}",
                label=f"{label} (> 0 on {frac:.0%} of steps)")
        arrays.append(uc)
        cum_uc = _vals(ds, "update_corr_cumsum") if "update_corr_cumsum" in ds.variables else np.nancumsum(uc)
        ax2.plot(x, cum_uc, color=colors[label], lw=1.6, gid=f"update_corr_cumsum/{label}",
                 label=f"{label}: Σ update_corr")
        ax2.plot(x, np.nancumsum(_vals(ds, "loss_change")), color=colors[label], lw=1.2, ls="--",
                 gid=f"loss_change_cumsum/{label}", label=f"{label}: Σ loss_change")
    ax.axhline(0.0, color="k", lw=0.8, gid="zero")
    _maybe_symlog(ax, arrays)
    da = _first(runs, "update_corr")
    ax.set_ylabel(_label(da))
    ax.set_title(f"⟨g_(t+1), Δ_t⟩ (holds if {da.attrs.get('holds_if', '< 0')} on average)",
                 fontsize="medium")
    _step_axis(ax, runs)
    ax.legend(fontsize="x-small")
    ax2.axhline(0.0, color="k", lw=0.8)
    ax2.set_ylabel(f"running sum [{da.attrs.get('units', 'loss')}]")
    ax2.set_title("running sums: linear terms vs same-batch loss change", fontsize="medium")
    _step_axis(ax2, runs)
    ax2.legend(fontsize="x-small")
    return fig


def fig_replay(runs: Runs) -> Figure:
    """How faithfully the analyzer reproduced the recorded loss and gradient at x_t."""
    fig, (ax,) = _new_figure()
    colors = _colors(runs)
    for name, ls in (("loss_replay_error", "-"), ("grad_replay_error", "--")):
        tol = None
        for label, ds in runs.items():
            if name not in ds.variables:
                continue
            ax.plot(_steps(ds), np.maximum(_vals(ds, name), REPLAY_FLOOR), color=colors[label],
                    ls=ls, lw=1, gid=f"{name}/{label}", label=f"{label}: {ds[name].attrs.get('long_name', name)}")
            tol = tol or ds[name].attrs.get("holds_if", "")
        bound = _bound(tol)
        if bound is not None:
            ax.axhline(bound, color="0.4", lw=0.8, ls=ls, gid=f"tolerance/{name}")
    ax.set_yscale("log")
    units = {str(_first(runs, n).attrs.get("units", "1")) for n in ("loss_replay_error", "grad_replay_error")
             if _has(runs, n)}
    ax.set_ylabel(f"relative replay error [{', '.join(sorted(units))}] (0 shown at {REPLAY_FLOOR:g})")
    ax.set_title("replay fidelity: re-evaluated vs recorded loss and gradient at x_t")
    _step_axis(ax, runs)
    ax.legend(fontsize="x-small")
    return fig


def _bound(holds_if: str | None) -> float | None:
    if not holds_if:
        return None
    parts = holds_if.replace("<=", "<= ").split()
    try:
        return float(parts[-1])
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report: file stem, title, the variables it needs, how to draw it."""

    name: str
    title: str
    needs: tuple[str, ...]
    draw: Callable[..., Figure]
    caption: str
    options: tuple[str, ...] = ()


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("loss", "Loss", ("loss_line",), fig_loss,
               "Minibatch loss ℓ(0) = f(x_t; z_t) at each analyzed step, re-evaluated by the analyzer."),
    FigureSpec("loss_line", "Loss along each step", ("loss_line",), fig_loss_line,
               "ℓ(α) = f(x_t + αΔ_t; z_t) on the α grid, minus ℓ(0), each row scaled by its largest "
               "absolute value. Blue: below the starting loss. The dashed line α = 1 is where the step "
               "ended; dots mark the grid minimiser of ℓ (left of α = 1: the step overshot the minimum "
               "along its own direction)."),
    FigureSpec("inst_gap", "Instantaneous convexity gap", ("inst_gap",), fig_inst_gap,
               "inst_gap = ℓ(1) − ℓ(0) − ℓ'(1) per step (thin) and its EMA (bold). Convexity along "
               "the step implies inst_gap ≤ 0.", ("beta",)),
    FigureSpec("convexity_ratio", "Convexity ratio", ("convexity_ratio", "convexity_num", "convexity_den"),
               fig_convexity_ratio,
               "Σℓ'(1) / Σ(ℓ(1) − ℓ(0)), cumulative from the first analyzed pair (solid) and over the "
               "last k pairs (dashed). The regret analysis needs it to stay above a positive constant.",
               ("window",)),
    FigureSpec("smoothness", "Smoothness and the edge of stability", ("inst_smoothness",), fig_smoothness,
               "Left: inst_smoothness = ‖G1 − G0‖ / ‖Δ_t‖ (same batch) against 2/lr, the largest "
               "smoothness constant for which the descent lemma guarantees progress of a plain "
               "gradient step (and the sharpness λ_max when analyzed). Right: stability ratio "
               "inst_smoothness·lr/2; above 1 the smoothness-based analysis cannot explain the step. "
               "For momentum and adaptive optimizers the step is not −lr·g, so 2/lr is a reference "
               "scale there, not a threshold."),
    FigureSpec("update_corr", "Update correlation", ("update_corr", "loss_change"), fig_update_corr,
               "Left: update_corr = ⟨g_{t+1}, Δ_t⟩ with the next step's stochastic gradient; negative "
               "on average means monotone descent in expectation. Right: its running sum beside the "
               "running sum of the same-batch loss change ℓ(1) − ℓ(0)."),
    FigureSpec("replay", "Replay fidelity", ("loss_replay_error",), fig_replay,
               "Relative error of the analyzer's re-evaluation of the loss and gradient at x_t against "
               "what training recorded (grey lines: the tolerances in the variables' holds_if, solid for "
               "the loss, dashed for the gradient). "
               "Large values mean dropout, BatchNorm, clipping or AMP differ between training and "
               "replay, and the other figures describe a slightly different function."),
)


def figure_data(fig: Figure) -> dict[str, np.ndarray]:
    """The data drawn in ``fig``, by ``gid``: a line's y values (its x values under
    ``"<gid>@x"``), an image's or mesh's array (2-D for a mesh)."""
    out: dict[str, np.ndarray] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            gid = line.get_gid()
            if gid:
                out[gid] = np.asarray(line.get_ydata(), dtype=np.float64)
                out[f"{gid}@x"] = np.asarray(line.get_xdata(), dtype=np.float64)
        for coll in ax.collections:
            gid = coll.get_gid()
            if gid and hasattr(coll, "get_array") and coll.get_array() is not None:
                arr = np.ma.filled(np.ma.asarray(coll.get_array(), dtype=np.float64), np.nan)
                coords = getattr(coll, "get_coordinates", None)
                if coords is not None and arr.ndim == 1:
                    c = coords()
                    arr = arr.reshape(c.shape[0] - 1, c.shape[1] - 1)
                out[gid] = arr
    return out


# --- the summary table ----------------------------------------------------------------------------

_ROW_LABELS = {
    "pairs": "pairs analyzed",
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
}


def summary_rows(ds: xr.Dataset) -> dict[str, float]:
    """The summary table's numbers for one run: :func:`trajscope.summary.headline` plus the
    stability ratio and the running sums the figures show (computed here when the Dataset does not
    carry them)."""
    from trajscope.summary import headline

    rows = dict(headline(ds))
    if "inst_smoothness" in ds.variables and "median_stability_ratio_last_half" not in rows:
        sr = stability_ratio(ds)
        half = sr[len(sr) // 2:]
        half = half[np.isfinite(half)]
        rows["median_stability_ratio_last_half"] = float(np.median(half)) if half.size else float("nan")
        fin = sr[np.isfinite(sr)]
        rows["frac_stability_ratio_gt_1"] = float(np.mean(fin > 1)) if fin.size else float("nan")
    for name in ("loss_change", "update_corr"):
        if name in ds.variables:
            v = _vals(ds, name)
            rows[f"sum_{name}"] = float(np.nansum(v)) if np.isfinite(v).any() else float("nan")
    return rows


def _fmt(key: str, v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "–"
    if key == "pairs":
        return str(int(v))
    if key.startswith("frac_"):
        return f"{v:.1%}"
    return f"{v:.4g}"


# --- loading and writing --------------------------------------------------------------------------


def load_runs(runs: str | Path | xr.Dataset | Sequence[str | Path | xr.Dataset] | Runs) -> dict[str, xr.Dataset]:
    """Normalise the report's input to ``{label: Dataset}``.

    Accepts run directories (opened with :func:`trajscope.open_metrics`; labelled by directory
    name, with parent names added until the labels are unique), Datasets (a Dataset with a ``run``
    dim is split into its runs, dropping the steps a run lacks), or a mapping label → Dataset.
    """
    from trajscope.analysis import open_metrics

    if isinstance(runs, Mapping) and not isinstance(runs, xr.Dataset):  # a Dataset is a Mapping too
        out = dict(runs)
    else:
        items = [runs] if isinstance(runs, (str, Path, xr.Dataset)) else list(runs)
        if not items:
            raise AnalysisError("report: no runs given; pass at least one analyzed run directory")
        paths = [Path(p) for p in items if not isinstance(p, xr.Dataset)]
        labels = _unique_labels(paths)
        out = {}
        for i, item in enumerate(items):
            if isinstance(item, xr.Dataset):
                if "run" in item.dims:
                    names = [str(r) for r in item["run"].values] if "run" in item.coords else []
                    for j in range(item.sizes["run"]):
                        part = item.isel(run=j, drop=True)
                        keep = np.isfinite(part["loss_line"]).any("alpha") if "loss_line" in part else None
                        label = names[j] if names else f"run{j}"
                        if label in out:  # open_metrics labels by directory name only
                            label = f"{label} ({j})"
                        out[label] = part.isel(step=np.flatnonzero(keep.values)) if keep is not None else part
                else:
                    out[str(item.attrs.get("title", f"run{i}")).removeprefix("trajscope metrics of ")] = item
            else:
                out[labels[Path(item)]] = open_metrics(item)
    for label, ds in out.items():
        if "step" not in ds.dims or ds.sizes["step"] == 0:
            raise RunFormatError(f"report: run {label!r} has no analyzed pairs (empty 'step' dimension)")
    return out


def _unique_labels(paths: Sequence[Path]) -> dict[Path, str]:
    """Directory names, with parent directories prepended to the names that collide."""
    resolved = {p: p.resolve() for p in paths}
    depth = {p: 1 for p in paths}

    def label(p: Path) -> str:
        return "/".join(resolved[p].parts[-depth[p]:])

    for _ in range(max((len(r.parts) for r in resolved.values()), default=1)):
        seen: dict[str, list[Path]] = {}
        for p in paths:
            seen.setdefault(label(p), []).append(p)
        clashes = [group for group in seen.values() if len({resolved[q] for q in group}) > 1]
        if not clashes:
            break
        for group in clashes:
            for p in group:
                depth[p] += 1
    return {p: label(p) for p in paths}


@dataclass
class Report:
    """What :func:`write_report` wrote.

    Attributes:
        out_dir: the report directory.
        index: path of ``index.html``.
        figures: figure name → PNG path, in page order.
        data: figure name → :func:`figure_data` of the figure as drawn (what the PNG shows).
        summary: run label → :func:`summary_rows`.
        skipped: figure name → why it was left out (its variables are absent).
    """

    out_dir: Path
    index: Path
    figures: dict[str, Path] = field(default_factory=dict)
    data: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def write_report(
    runs: str | Path | xr.Dataset | Sequence[str | Path | xr.Dataset] | Runs,
    out: str | Path | None = None,
    *,
    beta: float = 0.9,
    window: int | None = None,
    dpi: int = 110,
) -> Report:
    """Render every figure for one or several analyzed runs, and an ``index.html`` showing them
    with the summary table.

    Args:
        runs: run directories (analyzed), Datasets, or ``{label: Dataset}``; several overlay.
        out: report directory (default: ``<first run dir>/report``; required for Datasets).
        beta: EMA weight on the past for the ``inst_gap`` figure.
        window: pairs in the windowed convexity ratio (default: a tenth of the run, at least 2).
        dpi: resolution of the PNG files.
    """
    if window is not None and window < 1:
        raise AnalysisError(f"window={window!r}: expected an int >= 1")
    if not 0 <= beta < 1:
        raise AnalysisError(f"beta={beta!r}: expected 0 <= beta < 1")
    loaded = load_runs(runs)
    if out is None:
        first = runs[0] if isinstance(runs, Sequence) and not isinstance(runs, str) and runs else runs
        if not isinstance(first, (str, Path)):
            raise AnalysisError("report: pass out=DIR when the runs are given as Datasets")
        out = Path(first) / REPORT_DIR
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = Report(out_dir=out_dir, index=out_dir / "index.html")
    options = {"beta": beta, "window": window}
    for spec in FIGURES:
        have = {label: ds for label, ds in loaded.items() if all(n in ds.variables for n in spec.needs)}
        if not have:
            rep.skipped[spec.name] = f"needs {', '.join(spec.needs)}, absent from every run"
            continue
        fig = spec.draw(have, **{k: options[k] for k in spec.options})
        path = out_dir / f"{spec.name}.png"
        fig.savefig(path, dpi=dpi)
        rep.figures[spec.name] = path
        rep.data[spec.name] = figure_data(fig)
    rep.summary = {label: summary_rows(ds) for label, ds in loaded.items()}
    rep.index.write_text(_html(loaded, rep), encoding="utf-8")
    return rep


def _html(runs: Runs, rep: Report) -> str:
    esc = html.escape
    keys: list[str] = []
    for rows in rep.summary.values():
        keys += [k for k in rows if k not in keys]
    head = "".join(f"<th>{esc(label)}</th>" for label in runs)
    body = "".join(
        f"<tr><td>{esc(_ROW_LABELS.get(k, k))}</td>"
        + "".join(f"<td>{esc(_fmt(k, rep.summary[label].get(k, float('nan'))))}</td>" for label in runs)
        + "</tr>"
        for k in keys
    )
    prov = "".join(
        f"<tr><td>{esc(label)}</td><td>{esc(str(ds.attrs.get('run', '')))}</td>"
        f"<td>{esc(str(ds.attrs.get('objective', '')))}</td><td>{ds.sizes['step']}</td>"
        f"<td>{esc(str(ds.attrs.get('eval_dtype', '')))}</td><td>{esc(str(ds.attrs.get('created', '')))}</td></tr>"
        for label, ds in runs.items()
    )
    specs = {s.name: s for s in FIGURES}
    figs = "".join(
        f'<section id="{esc(name)}"><h2>{esc(specs[name].title)}</h2>'
        f'<a href="{esc(path.name)}"><img src="{esc(path.name)}" alt="{esc(specs[name].title)}"></a>'
        f"<p>{esc(specs[name].caption)}</p></section>"
        for name, path in rep.figures.items()
    )
    skipped = "".join(f"<li>{esc(n)}: {esc(why)}</li>" for n, why in rep.skipped.items())
    toc = " · ".join(f'<a href="#{esc(n)}">{esc(specs[n].title)}</a>' for n in rep.figures)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>trajscope report: {esc(", ".join(runs))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
td + td {{ font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
section p {{ color: #444; font-size: 0.92em; }}
</style></head><body>
<h1>trajscope report</h1>
<p>Do the assumptions of optimization theory hold along the path the optimizer took?
Generated {esc(when)}. Variables and formulas: <code>trajscope metrics</code>.</p>
<nav>{toc}</nav>
<h2>Summary</h2>
<table><tr><th></th>{head}</tr>{body}</table>
<h2>Runs</h2>
<table><tr><th>run</th><th>path</th><th>objective</th><th>pairs</th><th>eval dtype</th><th>analyzed</th></tr>{prov}</table>
{figs}
{f"<h2>Not shown</h2><ul>{skipped}</ul>" if skipped else ""}
</body></html>
"""
