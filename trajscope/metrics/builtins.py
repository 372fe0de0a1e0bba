"""Every built-in metric, one small pure function each. Read this file to add one.

A pair metric receives a :class:`~trajscope.metrics.pair.PairView` ``p`` of one pair (t, t+1) and returns a
float (or an array over α). What it can read:

* ``p.alpha``, ``p.loss_line`` (ℓ(α)), ``p.dloss_line`` (ℓ'(α)); ``p.ell(a)`` / ``p.dell(a)`` at a
  grid point; ``p.integral_dell()`` = ∫₀¹ ℓ'(α) dα by quadrature;
* ``p.dot("a", "b")``, ``p.sq("a")``, ``p.norm("a")`` for the vectors of
  :data:`trajscope.metrics.pair.VECTORS` (Δ = ``delta``, G0, G1, dG = G1 − G0, g = g_t, g_next, …);
* ``p.loss_recorded`` (f(x_t; z_t) as logged), ``p.lr`` (learning rate of param group 0);
* ``p.extra("loss_ref")`` (f(x*; z_t)) and, for metrics declaring ``needs=("sharpness",)``,
  ``p.extra("sharpness")`` and its solver diagnostics (NaN when the probe did not compute them).

Norms are global Euclidean norms over all parameters (sums of per-layer squares, then a root);
everything is float64. A metric registered with ``per_layer=True`` is evaluated again on each
parameter tensor's :class:`~trajscope.metrics.pair.LayerView`, which offers only ``dot``/``sq``/``norm``.
Series metrics read the Dataset.

Units are written in terms of ``loss`` (the objective's units) and ``param`` (the parameters').
Each docstring-free function is documented by its ``description`` (the formula, also stored in
the Dataset attrs) and ``holds_if`` (what the theory needs). The catalogue is ``metrics.md``.
The registry loads this module like a plugin module (:data:`trajscope.metrics.registry.BUILTIN_MODULES`);
importing it registers nothing. It imports numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trajscope.metrics.pair import LayerView, PairStats, PairView, quadrature  # noqa: F401 - re-exported
from trajscope.metrics.registry import metric, series

TINY = 1e-30

GRADS_OFF_NAN: tuple[str, ...] = (
    "inst_smoothness_xbatch", "update_corr", "update_corr_cumsum", "grad_cos_prev", "grad_replay_error",
    "grad_replay_cos",
)
"""The metrics that are NaN for a run recorded with ``Recorder(grads=False)``: they read g_{t+1}
(``g_next``, ``dg``), g_{t−1} (``g_prev``), or compare the replay with the stored g_t (``G0_err``,
⟨G0, g⟩); a ``per_layer`` one's ``_by_layer`` twin too. ``docs/metrics.md`` lists them."""

GRADS_OFF_RECOMPUTED: tuple[str, ...] = ("grad_norm", "update_grad_cos", "effective_lr")
"""The metrics of such a run that read g_t, which is then c·G0 (G0 replayed, c the recorded uniform
clip factor): equal to the stored-gradient values up to the replay error, NaN for a step clipped
non-uniformly (``clip_grad_value_``). Every other metric does not read a stored gradient."""


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


def _cos(p: PairView | LayerView, a: str, b: str) -> float:
    return _ratio(p.dot(a, b), float(np.sqrt(p.sq(a) * p.sq(b))))


def _cumsum(ds: Any, name: str) -> np.ndarray:
    # NaN pairs (e.g. update_corr where t+1 has no recorded gradient) add nothing to the sum; before
    # the first pair that defines the term nothing was summed, and the sum is NaN, not 0 (a run that
    # stores no gradients defines no update_corr at all)
    v = np.asarray(ds[name].values, dtype=np.float64)
    out = np.nancumsum(v)
    out[np.cumsum(~np.isnan(v)) == 0] = np.nan
    return out


def _cum_ratio(ds: Any, num: str, den: str) -> np.ndarray:
    n, d = _cumsum(ds, num), _cumsum(ds, den)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d != 0, n / d, np.nan)


# --- line probe --------------------------------------------------------------------------------


@metric("loss_line", dims=("alpha",), long_name="loss along the step", units="loss",
        description="ℓ(α) = f(x_t + αΔ_t; z_t) on the α grid (same minibatch z_t)")
def loss_line(p: PairView) -> np.ndarray:
    return p.loss_line


@metric("dloss_line", dims=("alpha",), long_name="directional derivative along the step",
        units="loss", description="ℓ'(α) = ⟨∇f(x_t + αΔ_t; z_t), Δ_t⟩ on the α grid")
def dloss_line(p: PairView) -> np.ndarray:
    return p.dloss_line


@metric("loss_change", long_name="same-batch loss change", units="loss",
        description="ℓ(1) − ℓ(0) = f(x_{t+1}; z_t) − f(x_t; z_t)", holds_if="< 0")
def loss_change(p: PairView) -> float:
    return p.ell(1) - p.ell(0)


@metric("line_integral_residual", long_name="line-integral residual", units="loss",
        description="ℓ(1) − ℓ(0) − ∫₀¹ ℓ'(α) dα (Simpson/trapezoid on the grid); ≈ 0 validates the probe")
def line_integral_residual(p: PairView) -> float:
    return p.ell(1) - p.ell(0) - p.integral_dell()


@metric("line_argmin", long_name="argmin of the loss along the step", units="1",
        description="argmin over the α grid of ℓ(α) (margin points included; the first one on a "
                    "tie); < 1: the step overshot the minimum along its own direction")
def line_argmin(p: PairView) -> float:
    if not np.any(np.isfinite(p.loss_line)):
        return float("nan")
    return float(p.alpha[int(np.nanargmin(p.loss_line))])


# --- convexity ---------------------------------------------------------------------------------


@metric("inst_gap", long_name="instantaneous convexity gap", units="loss", holds_if="<= 0",
        description="ℓ(1) − ℓ(0) − ℓ'(1) = f(x_{t+1}) − f(x_t) − ⟨∇f(x_{t+1}; z_t), Δ_t⟩ "
                    "(gradient at the later point)")
def inst_gap(p: PairView) -> float:
    return p.ell(1) - p.ell(0) - p.dell(1)


@metric("inst_gap_fwd", long_name="instantaneous convexity gap (forward)", units="loss",
        holds_if="<= 0", description="ℓ(0) + ℓ'(0) − ℓ(1) (gradient at the earlier point)")
def inst_gap_fwd(p: PairView) -> float:
    return p.ell(0) + p.dell(0) - p.ell(1)


@metric("convexity_num", long_name="convexity ratio numerator", units="loss",
        description="ℓ'(1) = ⟨∇f(x_{t+1}; z_t), Δ_t⟩, the per-step numerator of convexity_ratio")
def convexity_num(p: PairView) -> float:
    return p.dell(1)


@metric("convexity_den", long_name="convexity ratio denominator", units="loss",
        description="ℓ(1) − ℓ(0), the per-step denominator of convexity_ratio")
def convexity_den(p: PairView) -> float:
    return p.ell(1) - p.ell(0)


@series("convexity_ratio", requires=("convexity_num", "convexity_den"),
        long_name="cumulative convexity ratio", units="1", holds_if="> 0",
        description="Σ_{s≤t} ℓ'_s(1) / Σ_{s≤t} (ℓ_s(1) − ℓ_s(0)), cumulative from the first "
                    "analyzed pair")
def convexity_ratio(ds: Any) -> np.ndarray:
    return _cum_ratio(ds, "convexity_num", "convexity_den")


@metric("convexity_ref_num", long_name="reference convexity ratio numerator", units="loss",
        description="⟨G0, x_t − x*⟩ with G0 = ∇f(x_t; z_t), x* the reference point (default: the "
                    "final recorded state); NaN without a reference point")
def convexity_ref_num(p: PairView) -> float:
    return p.dot("G0", "x_ref")


@metric("convexity_ref_den", long_name="reference convexity ratio denominator", units="loss",
        description="ℓ(0) − f(x*; z_t) = f(x_t; z_t) − f(x*; z_t), x* the reference point; NaN "
                    "without a reference point")
def convexity_ref_den(p: PairView) -> float:
    return p.ell(0) - p.extra("loss_ref")


@series("convexity_ratio_ref", requires=("convexity_ref_num", "convexity_ref_den"),
        long_name="cumulative reference-point convexity ratio", units="1", holds_if=">= 1",
        description="Σ_{s≤t} ⟨G0_s, x_s − x*⟩ / Σ_{s≤t} (f(x_s; z_s) − f(x*; z_s)), cumulative from "
                    "the first analyzed pair; ≥ 1 under convexity")
def convexity_ratio_ref(ds: Any) -> np.ndarray:
    return _cum_ratio(ds, "convexity_ref_num", "convexity_ref_den")


@metric("weak_convexity", long_name="weak-convexity constant along the step", units="loss/param^2",
        holds_if="bounded",
        description="max(0, 2·inst_gap / ‖Δ_t‖²): the smallest ρ ≥ 0 for which f + (ρ/2)‖·‖² "
                    "passes the convexity inequality along the step")
def weak_convexity(p: PairView) -> float:
    gap = p.ell(1) - p.ell(0) - p.dell(1)
    rho = _ratio(2 * gap, p.sq("delta"))
    return max(0.0, rho) if np.isfinite(rho) else rho


@metric("directional_curvature", long_name="directional curvature of the step", units="loss/param^2",
        description="2(ℓ(1) − ℓ(0) − ℓ'(0)) / ‖Δ_t‖² (signed; |·| is Mishkin's point-wise "
                    "directional smoothness)")
def directional_curvature(p: PairView) -> float:
    return _ratio(2 * (p.ell(1) - p.ell(0) - p.dell(0)), p.sq("delta"))


# --- smoothness --------------------------------------------------------------------------------


@metric("inst_smoothness", long_name="instantaneous smoothness", units="loss/param^2",
        holds_if="bounded", per_layer=True,
        description="‖G1 − G0‖ / ‖Δ_t‖ with G0 = ∇f(x_t; z_t), G1 = ∇f(x_{t+1}; z_t) (same batch)")
def inst_smoothness(p: PairView | LayerView) -> float:
    return _ratio(p.norm("dG"), p.norm("delta"))


@metric("inst_smoothness_xbatch", long_name="instantaneous smoothness (cross-batch)",
        units="loss/param^2",
        description="‖g_{t+1} − g_t‖ / ‖Δ_t‖ from the recorded gradients (different batches: "
                    "inflated by minibatch noise); NaN when step t+1 has no recorded gradient")
def inst_smoothness_xbatch(p: PairView) -> float:
    return _ratio(p.norm("dg"), p.norm("delta"))


@metric("pathwise_smoothness", long_name="path-wise smoothness", units="loss/param^2",
        description="max over grid points 0 < α ≤ 1 of (ℓ'(α) − ℓ'(0)) / (α‖Δ_t‖²) (Mishkin's "
                    "path-wise A on the segment x_t → x_{t+1})")
def pathwise_smoothness(p: PairView) -> float:
    sq = p.sq("delta")
    on = (p.alpha > 1e-12) & (p.alpha <= 1 + 1e-12)
    if sq == 0 or not np.any(on):
        return float("nan")
    vals = (p.dloss_line[on] - p.dell(0)) / (p.alpha[on] * sq)
    return float(np.nanmax(vals)) if np.any(np.isfinite(vals)) else float("nan")


@metric("stability_ratio", long_name="stability ratio", units="1", holds_if="< 1",
        description="inst_smoothness · lr_t / 2 with lr_t the learning rate of param group 0 "
                    "(≈ 1 at the edge of stability of gradient descent)")
def stability_ratio(p: PairView) -> float:
    return _ratio(p.norm("dG"), p.norm("delta")) * p.lr / 2


@metric("sharpness", long_name="sharpness", units="loss/param^2", needs=("sharpness",),
        description="λ_max(∇²f(x_t; z_t)), the largest algebraic Hessian eigenvalue, by Lanczos "
                    "on Hessian-vector products (opt-in: --sharpness)")
def sharpness(p: PairView) -> float:
    return p.extra("sharpness")


@metric("sharpness_iterations", long_name="sharpness: Lanczos iterations", units="1",
        needs=("sharpness",),
        description="Hessian-vector products the Lanczos run for sharpness used")
def sharpness_iterations(p: PairView) -> float:
    return p.extra("sharpness_iterations")


@metric("sharpness_converged", long_name="sharpness: converged", units="1", holds_if="== 1",
        needs=("sharpness",),
        description="1 if the Lanczos residual ‖Hy − θy‖ ≤ tol·max|Ritz value| was reached "
                    "(or the Krylov space became invariant), else 0")
def sharpness_converged(p: PairView) -> float:
    return p.extra("sharpness_converged")


@series("descent_lemma_gap", requires=("loss_change", "dloss_line", "update_norm", "inst_smoothness"),
        long_name="descent-lemma gap", units="loss", holds_if="<= 0",
        description="ℓ(1) − ℓ(0) − ℓ'(0) − (L_t/2)‖Δ_t‖² with L_t = max_{s≤t} inst_smoothness_s "
                    "over the analyzed pairs; > 0: the smoothness bound failed to predict the step")
def descent_lemma_gap(ds: Any) -> np.ndarray:
    # fmax ignores NaN, so a pair with an undefined inst_smoothness does not reset the maximum
    L = np.fmax.accumulate(np.asarray(ds["inst_smoothness"].values, dtype=np.float64))
    d0 = np.asarray(ds["dloss_line"].sel(alpha=0.0, method="nearest").values, dtype=np.float64)
    sq = np.asarray(ds["update_norm"].values, dtype=np.float64) ** 2
    return np.asarray(ds["loss_change"].values, dtype=np.float64) - d0 - L / 2 * sq


# --- update correlation ------------------------------------------------------------------------


@metric("update_corr", long_name="update correlation", units="loss", holds_if="< 0",
        description="⟨g_{t+1}, Δ_t⟩ with the next step's recorded stochastic gradient (fresh batch); "
                    "NaN when step t+1 has no recorded gradient")
def update_corr(p: PairView) -> float:
    return p.dot("g_next", "delta")


@metric("update_corr_same_batch", long_name="update correlation (same batch)", units="loss",
        holds_if="< 0", description="ℓ'(1) = ⟨∇f(x_{t+1}; z_t), Δ_t⟩")
def update_corr_same_batch(p: PairView) -> float:
    return p.dell(1)


@series("update_corr_cumsum", requires=("update_corr",), long_name="cumulative update correlation",
        units="loss",
        description="Σ_{s≤t} update_corr_s over the analyzed pairs (NaN pairs count 0; NaN before the "
                    "first defined one); compare loss_change_cumsum (O2NC: the loss change is the sum of "
                    "such linear terms)")
def update_corr_cumsum(ds: Any) -> np.ndarray:
    return _cumsum(ds, "update_corr")


@series("loss_change_cumsum", requires=("loss_change",), long_name="cumulative same-batch loss change",
        units="loss", description="Σ_{s≤t} loss_change_s over the analyzed pairs")
def loss_change_cumsum(ds: Any) -> np.ndarray:
    return _cumsum(ds, "loss_change")


# --- trajectory statistics ---------------------------------------------------------------------


@metric("grad_norm", long_name="gradient norm", units="loss/param", per_layer=True,
        description="‖g_t‖, the recorded gradient the optimizer consumed")
def grad_norm(p: PairView | LayerView) -> float:
    return p.norm("g")


@metric("update_norm", long_name="update norm", units="param", per_layer=True,
        description="‖Δ_t‖ = ‖x_{t+1} − x_t‖")
def update_norm(p: PairView | LayerView) -> float:
    return p.norm("delta")


@metric("param_norm", long_name="parameter norm", units="param", per_layer=True,
        description="‖x_t‖")
def param_norm(p: PairView | LayerView) -> float:
    return p.norm("x")


@metric("dist_from_init", long_name="distance from initialisation", units="param", per_layer=True,
        description="‖x_t − x_0‖; NaN when step 0 is not recorded")
def dist_from_init(p: PairView | LayerView) -> float:
    return p.norm("x_dist")


@metric("grad_cos_prev", long_name="cosine of consecutive gradients", units="1", per_layer=True,
        description="cos(g_t, g_{t−1}) = ⟨g_t, g_{t−1}⟩ / (‖g_t‖‖g_{t−1}‖) of the recorded "
                    "gradients; NaN when step t−1 is not recorded")
def grad_cos_prev(p: PairView | LayerView) -> float:
    return _cos(p, "g", "g_prev")


@metric("update_cos_prev", long_name="cosine of consecutive updates", units="1", per_layer=True,
        description="cos(Δ_t, Δ_{t−1}) = ⟨Δ_t, Δ_{t−1}⟩ / (‖Δ_t‖‖Δ_{t−1}‖); NaN when step t−1 is "
                    "not recorded")
def update_cos_prev(p: PairView | LayerView) -> float:
    return _cos(p, "delta", "delta_prev")


@metric("update_grad_cos", long_name="cosine of update and negative gradient", units="1",
        per_layer=True,
        description="cos(Δ_t, −g_t) = −⟨Δ_t, g_t⟩ / (‖Δ_t‖‖g_t‖) (1 for plain SGD)")
def update_grad_cos(p: PairView | LayerView) -> float:
    return -_cos(p, "delta", "g")


@metric("effective_lr", long_name="effective learning rate", units="param^2/loss", per_layer=True,
        description="‖Δ_t‖ / ‖g_t‖ (lr_t for plain SGD)")
def effective_lr(p: PairView | LayerView) -> float:
    return _ratio(p.norm("delta"), p.norm("g"))


@metric("replay_grad_norm", long_name="replayed gradient norm", units="loss/param", per_layer=True,
        description="‖G0‖ = ‖∇f(x_t; z_t)‖ as replayed by the analyzer (the gradient norm of the "
                    "(L0, L1)-smoothness fit)")
def replay_grad_norm(p: PairView | LayerView) -> float:
    return p.norm("G0")


# --- replay fidelity ---------------------------------------------------------------------------


@metric("loss_replay_error", long_name="loss replay error", units="1", holds_if="<= 1e-5",
        description="|f(x_t; z_t) − recorded| / max(|recorded|, 1e-30), f(x_t; z_t) from the plain "
                    "forward pass that gives G0 (the computation training ran; ℓ(0) for pairs "
                    "probed without one)")
def loss_replay_error(p: PairView) -> float:
    rec = p.loss_recorded
    replayed = p.extra("loss_x0")
    if not np.isfinite(replayed) and not np.isnan(rec):
        replayed = p.ell(0)
    return abs(replayed - rec) / max(abs(rec), TINY)


@metric("loss_resolution", long_name="loss resolution", units="loss",
        description="the largest deviation of f(x_t), f(x_{t+1}) evaluated as trained (under the "
                    "step's autocast) from the same in the evaluation dtype throughout: the rounding "
                    "of one evaluation of ℓ. A pair whose |loss_change| or |inst_gap| is at most "
                    "twice this is flagged below_resolution. NaN: evaluated without autocast")
def loss_resolution(p: PairView) -> float:
    return p.extra("loss_resolution")


@metric("grad_replay_error", long_name="gradient replay error", units="1", holds_if="<= 1e-4",
        description="‖c·G0 − g_t‖ / ‖g_t‖ with c the recorded uniform clip factor (clip_factor; c = 1 "
                    "for an unclipped or non-uniformly clipped step): large when dropout RNG, "
                    "BatchNorm mode, AMP or an unrecorded rescaling differ between training and replay")
def grad_replay_error(p: PairView) -> float:
    c = p.extra("clip_factor")
    if not (np.isfinite(c) and p.extra("clip_uniform") == 1.0):
        return _ratio(p.norm("G0_err"), p.norm("g"))
    # ‖cG0 − g‖² = c²⟨G0, G0⟩ − 2c⟨G0, g⟩ + ⟨g, g⟩ (≥ 0; rounding can take it just below)
    sq = c * c * p.sq("G0") - 2.0 * c * p.dot("G0", "g") + p.sq("g")
    return _ratio(float(np.sqrt(max(sq, 0.0))), p.norm("g"))


@metric("clip_factor", long_name="gradient clip factor", units="1",
        description="c = ‖g_t‖ / ‖g_preclip‖ as recorded when training rescaled the gradient between "
                    "backward and the optimizer step (gradient clipping); 1 for a step recorded "
                    "unclipped (pair_flags tells an unclipped, a uniformly and a non-uniformly "
                    "clipped step apart)")
def clip_factor(p: PairView) -> float:
    c = p.extra("clip_factor")
    return c if np.isfinite(c) else 1.0


@metric("grad_replay_cos", long_name="gradient replay cosine", units="1", holds_if=">= 0.9999",
        description="cos(G0, g_t) = ⟨G0, g_t⟩ / (‖G0‖‖g_t‖): ≈ 1 with a large grad_replay_error "
                    "means a rescaling (norm clipping, an un-unscaled AMP gradient), not a different "
                    "function")
def grad_replay_cos(p: PairView) -> float:
    return _cos(p, "G0", "g")
