"""The figures of ``trajscope report``: pure functions of the metrics Datasets, drawing only.

Each figure takes the Datasets of one or several runs (keyed by a label) and returns a
:class:`matplotlib.figure.Figure`; every curve or image it draws carries a ``gid`` of the form
``"<what>/<run label>"``, so the data behind a figure can be read back from the figure itself
(:func:`figure_data`) and compared with the Dataset. Several runs overlay in one figure (the heat
map gets one panel per run). Axis labels and units come from the variables' attrs. Derived
quantities (EMA, running sums, stability ratio, fractions where a condition holds, tolerance
bounds) come from :mod:`trajscope.report.summary` and :mod:`trajscope.metrics.registry`, never from here.

Figures (:data:`FIGURES`; a figure whose variables are absent from every run is skipped, so the
report works on Datasets from older or newer trajscope versions alike):

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
figure never changes the pyplot backend or global state of the caller (a notebook, a test).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from trajscope.errors import AnalysisError
from trajscope.metrics.registry import holds_bound
from trajscope.report.summary import (
    convexity_ratio_window,
    ema,
    fraction,
    line_argmin,
    running_sum,
    stability_ratio,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FIGURES", "FigureSpec", "REPLAY_FLOOR", "Runs", "figure_data", "loss_line_shape", "fig_loss",
    "fig_loss_line", "fig_inst_gap", "fig_convexity_ratio", "fig_smoothness", "fig_update_corr",
    "fig_replay",
]

REPLAY_FLOOR = 1e-18
"""Replay errors are drawn on a log axis; exact zeros are shown at this floor."""

Runs = Mapping[str, xr.Dataset]


# --- drawing helpers ------------------------------------------------------------------------------


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
    for ax, (label, ds) in zip(axes, runs.items(), strict=True):
        alphas = np.asarray(ds["alpha"].values, dtype=np.float64)
        shape = loss_line_shape(ds)
        mesh = ax.pcolormesh(alphas, _steps(ds), shape, shading="nearest", cmap="RdBu_r",
                             norm=Normalize(-1, 1), gid=f"loss_line/{label}", rasterized=True)
        ax.plot(line_argmin(ds), _steps(ds), ".", ms=2.5, color="k", gid=f"line_argmin/{label}",
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
        frac = fraction(y, "<= 0")
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
        frac = fraction(uc, "> 0")
        ax.plot(x, uc, color=colors[label], lw=0.8, gid=f"update_corr/{label}",
                label=f"{label} (> 0 on {frac:.0%} of steps)")
        arrays.append(uc)
        ax2.plot(x, running_sum(ds, "update_corr"), color=colors[label], lw=1.6, gid=f"update_corr_cumsum/{label}",
                 label=f"{label}: Σ update_corr")
        ax2.plot(x, running_sum(ds, "loss_change"), color=colors[label], lw=1.2, ls="--",
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
        bound = holds_bound(tol)
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
