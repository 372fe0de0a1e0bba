"""Every built-in metric, one small pure function each. Read this file to add one.

A pair metric receives a :class:`PairView` ``p`` of one pair (t, t+1) and returns a float (or an
array over α). What it can read:

* ``p.alpha``, ``p.loss_line`` (ℓ(α)), ``p.dloss_line`` (ℓ'(α)); ``p.ell(a)`` / ``p.dell(a)`` at a
  grid point; ``p.integral_dell()`` = ∫₀¹ ℓ'(α) dα by quadrature;
* ``p.dot("a", "b")``, ``p.sq("a")``, ``p.norm("a")`` for the vectors of
  :data:`trajscope.probe.VECTORS` (Δ = ``delta``, G0, G1, dG = G1 − G0, g = g_t, g_next, …);
* ``p.loss_recorded`` (f(x_t; z_t) as logged), ``p.lr`` (learning rate of param group 0).

Norms are global Euclidean norms over all parameters (sums of per-layer squares, then a root);
everything is float64. A metric registered with ``per_layer=True`` must use only ``dot``/``sq``/
``norm``: it is evaluated again on each parameter tensor. Series metrics read the Dataset.

Units are written in terms of ``loss`` (the objective's units) and ``param`` (the parameters').
Each docstring-free function is documented by its ``description`` (the formula, also stored in
the Dataset attrs) and ``holds_if`` (what the theory needs). The catalogue is ``metrics.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trajscope.probe import PairStats
from trajscope.registry import metric, series

TINY = 1e-30


class PairView:
    """Read access to one pair's probe results, global (all parameters) or for one layer."""

    def __init__(self, stats: PairStats, layer: int | None = None) -> None:
        self._s = stats
        self._layer = layer
        self.alpha = stats.alpha
        self.loss_line = stats.loss_line
        self.dloss_line = stats.dloss_line
        self.loss_recorded = stats.loss_recorded
        self.lr = float(stats.lr[0]) if len(stats.lr) else float("nan")
        self.step = stats.step

    def dot(self, a: str, b: str) -> float:
        """⟨a, b⟩ over all parameters (or this view's layer), float64."""
        terms = self._s.terms
        v = terms.get(f"{a}.{b}")
        if v is None:
            v = terms.get(f"{b}.{a}")
        if v is None:
            raise KeyError(f"no inner product term {a}.{b}; available: {sorted(terms)}")
        return float(v[self._layer]) if self._layer is not None else float(np.sum(v))

    def sq(self, a: str) -> float:
        return self.dot(a, a)

    def norm(self, a: str) -> float:
        return float(np.sqrt(self.sq(a)))

    def _index(self, a: float) -> int:
        i = int(np.argmin(np.abs(self.alpha - a)))
        if abs(self.alpha[i] - a) > 1e-9:
            raise KeyError(f"α={a} is not on the grid")
        return i

    def ell(self, a: float) -> float:
        """ℓ(a) = f(x_t + aΔ_t; z_t) at a grid point."""
        return float(self.loss_line[self._index(a)])

    def dell(self, a: float) -> float:
        """ℓ'(a) = ⟨∇f(x_t + aΔ_t; z_t), Δ_t⟩ at a grid point."""
        return float(self.dloss_line[self._index(a)])

    def integral_dell(self) -> float:
        """∫₀¹ ℓ'(α) dα: composite Simpson when the [0, 1] points allow it, else trapezoid."""
        i0, i1 = self._index(0.0), self._index(1.0)
        return quadrature(self.alpha[i0 : i1 + 1], self.dloss_line[i0 : i1 + 1])


def quadrature(x: np.ndarray, y: np.ndarray) -> float:
    """∫ y dx on an equally spaced grid: Simpson's rule for an even number of intervals (exact for
    cubics, error O(h⁴)), trapezoid otherwise (exact for linear y)."""
    n = len(x) - 1
    if n < 1:
        return 0.0
    h = (x[-1] - x[0]) / n
    if n % 2 == 0:
        return float(h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))
    return float(h * (0.5 * y[0] + 0.5 * y[-1] + y[1:-1].sum()))


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


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
    num = np.nancumsum(ds["convexity_num"].values)
    den = np.nancumsum(ds["convexity_den"].values)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / den, np.nan)


# --- smoothness --------------------------------------------------------------------------------


@metric("inst_smoothness", long_name="instantaneous smoothness", units="loss/param^2",
        holds_if="bounded", per_layer=True,
        description="‖G1 − G0‖ / ‖Δ_t‖ with G0 = ∇f(x_t; z_t), G1 = ∇f(x_{t+1}; z_t) (same batch)")
def inst_smoothness(p: PairView) -> float:
    return _ratio(p.norm("dG"), p.norm("delta"))


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


# --- trajectory statistics ---------------------------------------------------------------------


@metric("grad_norm", long_name="gradient norm", units="loss/param", per_layer=True,
        description="‖g_t‖, the recorded gradient the optimizer consumed")
def grad_norm(p: PairView) -> float:
    return p.norm("g")


@metric("update_norm", long_name="update norm", units="param", per_layer=True,
        description="‖Δ_t‖ = ‖x_{t+1} − x_t‖")
def update_norm(p: PairView) -> float:
    return p.norm("delta")


# --- replay fidelity ---------------------------------------------------------------------------


@metric("loss_replay_error", long_name="loss replay error", units="1", holds_if="<= 1e-5",
        description="|ℓ(0) − recorded f(x_t; z_t)| / max(|recorded|, 1e-30)")
def loss_replay_error(p: PairView) -> float:
    rec = p.loss_recorded
    return abs(p.ell(0) - rec) / max(abs(rec), TINY)


@metric("grad_replay_error", long_name="gradient replay error", units="1", holds_if="<= 1e-4",
        description="‖G0 − g_t‖ / ‖g_t‖ (large when clipping, dropout RNG, BatchNorm mode or AMP "
                    "differ between training and replay)")
def grad_replay_error(p: PairView) -> float:
    return _ratio(p.norm("G0_err"), p.norm("g"))
