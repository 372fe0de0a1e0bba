"""What the line probe hands to the metrics: one pair's reduced results, and the views a metric reads.

This module is numpy only (no torch), so the metric catalogue, the registry and the contract
check of :mod:`trajscope.testing` load without the analyzer's heavy dependencies.

* :data:`VECTORS` / :data:`TERMS`: the vectors a pair task forms and the inner products it reduces
  them to (per parameter tensor, "layer").
* :class:`PairStats`: everything the metrics of pair (t, t+1) are computed from.
* :class:`PairView`: what a pair metric ``fn(p)`` reads for the whole model: the loss along the
  step ℓ(α), its derivative ℓ'(α), global inner products, the learning rate, extra probe results.
* :class:`LayerView`: what a ``per_layer=True`` metric reads for one parameter tensor: only the
  inner products of that tensor (``dot``/``sq``/``norm``). ℓ, ℓ' and the other whole-model
  quantities are absent, and reading one raises an AttributeError that says so.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["VECTORS", "TERMS", "PairStats", "PairView", "LayerView", "layer_views", "quadrature"]

VECTORS: dict[str, str] = {
    "delta": "Δ_t = x_{t+1} − x_t",
    "G0": "∇f(x_t; z_t), replayed",
    "G1": "∇f(x_{t+1}; z_t), replayed",
    "dG": "G1 − G0",
    "g": "g_t, the gradient the optimizer consumed: recorded, or c·G0 for a run that stores no gradients",
    "g_next": "g_{t+1}, the next step's recorded gradient (fresh batch)",
    "dg": "g_{t+1} − g_t",
    "G0_err": "G0 − g_t (replay error)",
    "x": "x_t",
    "x_dist": "x_t − x_0",
    "g_prev": "g_{t−1}",
    "delta_prev": "Δ_{t−1} = x_t − x_{t−1}",
    "x_ref": "x_t − x*, x* the reference point (default: the final recorded state)",
}
"""The vectors a pair task can form (each per parameter tensor), by name."""

TERMS: tuple[tuple[str, str], ...] = (
    ("delta", "delta"),
    ("G0", "G0"),
    ("G1", "G1"),
    ("dG", "dG"),
    ("G0", "delta"),
    ("G1", "delta"),
    ("g", "g"),
    ("g", "delta"),
    ("g_next", "delta"),
    ("g_next", "g_next"),
    ("dg", "dg"),
    ("G0_err", "G0_err"),
    ("x", "x"),
    ("x_dist", "x_dist"),
    ("g", "g_prev"),
    ("g_prev", "g_prev"),
    ("delta", "delta_prev"),
    ("delta_prev", "delta_prev"),
    ("G0", "g"),
    ("G0", "x_ref"),
)
"""Inner products ⟨a, b⟩ computed per parameter tensor, in float64. A term whose vectors are not
available for a pair (e.g. g_next when step t+1 is the final state) is NaN."""


@dataclass
class PairStats:
    """Everything the metrics of pair (t, t+1) are computed from (float64 numpy).

    Attributes:
        step: t.
        alpha, loss_line, dloss_line: the α grid, ℓ(α) and ℓ'(α).
        terms: ``"a.b"`` → per-layer ⟨a, b⟩ (shape ``[n_layer]``), NaN where unavailable.
        layers: parameter names, the order of the per-layer arrays.
        loss_recorded: f(x_t; z_t) as logged in training (NaN if not given).
        lr: learning rate of each param group at step t.
        extras: scalar probe results beyond the line: ``loss_ref`` (f(x*; z_t), when a reference
            point was given) and ``sharpness``, ``sharpness_iterations``, ``sharpness_converged``
            (when asked for), and ``line_batched`` (1.0 when ℓ(α), ℓ'(α) came from the batched
            line evaluation, 0.0 when from the point-by-point one), and, when training clipped
            step t's gradient, ``clip_factor`` (c = ‖g_t‖ / ‖g_preclip‖, as recorded) and
            ``clip_uniform`` (1.0 when g_t = c·∇f(x_t; z_t), 0.0 for a non-uniform clip such as
            ``clip_grad_value_``), ``g_recomputed`` (1.0 when step t's g_t was not stored,
            ``Recorder(grads=False)``: ``g`` is then c·G0), and ``unrecorded_params``: the number
            of coordinates that changed between x_t and x_{t+1} without a recorded gradient (when
            there are any). Absent keys read as NaN.
    """

    step: int
    alpha: np.ndarray
    loss_line: np.ndarray
    dloss_line: np.ndarray
    terms: dict[str, np.ndarray]
    layers: tuple[str, ...]
    loss_recorded: float
    lr: np.ndarray
    extras: dict[str, float] = field(default_factory=dict)

    def to_tensors(self) -> dict[str, np.ndarray]:
        """Flat name → array mapping, for the per-pair partial results on disk."""
        out = {
            "alpha": self.alpha,
            "loss_line": self.loss_line,
            "dloss_line": self.dloss_line,
            "loss_recorded": np.array([self.loss_recorded]),
            "lr": self.lr,
        }
        out.update({f"term/{k}": v for k, v in self.terms.items()})
        out.update({f"extra/{k}": np.array([v], dtype=np.float64) for k, v in self.extras.items()})
        return out

    @classmethod
    def from_tensors(cls, step: int, layers: tuple[str, ...], t: Mapping[str, np.ndarray]) -> PairStats:
        return cls(
            step=step,
            alpha=t["alpha"],
            loss_line=t["loss_line"],
            dloss_line=t["dloss_line"],
            terms={k[5:]: v for k, v in t.items() if k.startswith("term/")},
            layers=layers,
            loss_recorded=float(t["loss_recorded"][0]),
            lr=t["lr"],
            extras={k[6:]: float(v[0]) for k, v in t.items() if k.startswith("extra/")},
        )


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


class _InnerProducts(abc.ABC):
    """``dot``/``sq``/``norm`` over the probe's per-layer inner products (:data:`TERMS`)."""

    _s: PairStats

    def _term(self, a: str, b: str) -> np.ndarray:
        terms = self._s.terms
        v = terms.get(f"{a}.{b}")
        if v is None:
            v = terms.get(f"{b}.{a}")
        if v is None:
            raise KeyError(f"no inner product term {a}.{b}; available: {sorted(terms)}")
        return np.asarray(v)

    @abc.abstractmethod
    def dot(self, a: str, b: str) -> float:
        """⟨a, b⟩ over the parameters this view covers."""

    def sq(self, a: str) -> float:
        """‖a‖² = ⟨a, a⟩."""
        return self.dot(a, a)

    def norm(self, a: str) -> float:
        """‖a‖ = √⟨a, a⟩."""
        return float(np.sqrt(self.sq(a)))


_WHOLE_MODEL = ("alpha", "loss_line", "dloss_line", "ell", "dell", "integral_dell", "loss_recorded",
                "lr", "extra")
"""What a :class:`PairView` has and a :class:`LayerView` refuses: quantities of the whole model."""


class LayerView(_InnerProducts):
    """What a ``per_layer=True`` metric reads for one parameter tensor: its inner products.

    ``dot``/``sq``/``norm`` cover that tensor's coordinates only. The loss along the step, the
    learning rate and the probe's extras describe the whole model, so this view has none of them.
    """

    def __init__(self, stats: PairStats, layer: int) -> None:
        self._s = stats
        self._layer = layer
        self.step = stats.step
        self.layer = stats.layers[layer]

    def __getattr__(self, name: str) -> Any:
        # only called for a name the view lacks: say why a per-layer metric cannot read it
        if name in _WHOLE_MODEL:
            raise AttributeError(
                f"a per-layer view has no {name!r}: it is a whole-model quantity (the loss along the "
                f"step, the learning rate, the probe's extras); a per_layer=True metric may read only "
                f"dot/sq/norm, evaluated on one parameter tensor at a time"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def dot(self, a: str, b: str) -> float:
        """⟨a, b⟩ over this parameter tensor (see :data:`VECTORS`), float64."""
        return float(self._term(a, b)[self._layer])


class PairView(_InnerProducts):
    """Read access to one pair's probe results over all parameters (a pair metric's argument).

    Inner products are global: the sum over parameter tensors of the per-tensor ⟨a, b⟩.
    """

    def __init__(self, stats: PairStats) -> None:
        self._s = stats
        self.step = stats.step
        self.alpha = stats.alpha
        self.loss_line = stats.loss_line
        self.dloss_line = stats.dloss_line
        self.loss_recorded = stats.loss_recorded
        self.lr = float(stats.lr[0]) if len(stats.lr) else float("nan")

    def dot(self, a: str, b: str) -> float:
        """⟨a, b⟩ over all parameters (see :data:`VECTORS`), float64."""
        return float(np.sum(self._term(a, b)))

    def extra(self, name: str) -> float:
        """A scalar probe result beyond the line (see :class:`PairStats`); NaN when absent."""
        return float(self._s.extras.get(name, float("nan")))

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


def layer_views(stats: PairStats) -> list[LayerView]:
    """One :class:`LayerView` per parameter tensor, in ``stats.layers`` order."""
    return [LayerView(stats, i) for i in range(len(stats.layers))]
