"""The contract check a metric author runs: :func:`check_metric` on a synthetic quadratic pair.

Registration (:func:`trajscope.metrics.registry.check_spec`) checks what a spec declares. This module also
*runs* the metric, on probe results built in closed form from a separable quadratic

    f(x; z) = ½ Σᵢ hᵢ (xᵢ − zᵢ)²,   ∇f(x; z) = h ⊙ (x − z),   ∇²f = diag(h),

with three parameter tensors, an SGD step x_{t+1} = x_t − lr·g_t and fresh minibatches z
(shifted centres) at t−1, t and t+1. Every probe result is defined there, so a metric must return
a finite value of the declared shape; a ``per_layer`` metric is also run on each
:class:`~trajscope.metrics.pair.LayerView`, which refuses whole-model reads (ℓ, ℓ', lr, extras).
:class:`QuadraticPair` keeps the vectors, so a test can compare a metric with its closed form::

    from trajscope.testing import check_metric
    check_metric(relative_update, expected=lambda q: q.norm(q.delta) / q.norm(q.x))

Numpy only (xarray too for a series metric); no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trajscope.errors import AnalysisError, MetricRegistrationError
from trajscope.metrics.pair import TERMS, PairStats
from trajscope.metrics.registry import SPEC_ATTR, MetricSpec, check_spec, evaluate_pair, get_metrics

__all__ = ["QuadraticPair", "synthetic_pair", "synthetic_dataset", "check_metric"]

LAYERS: tuple[tuple[str, int], ...] = (("w1", 4), ("b1", 2), ("w2", 3))
"""Parameter tensors of the synthetic model: (name, size)."""


@dataclass(frozen=True)
class QuadraticPair:
    """The closed-form pair behind :func:`synthetic_pair` (flat float64 vectors over all layers).

    Attributes:
        h: the Hessian's diagonal; z_prev, z, z_next: minibatch centres of steps t−1, t, t+1.
        x0, x_prev, x, x_next, x_ref: x_0, x_{t−1}, x_t, x_{t+1} and the reference point x*.
        g_prev, g, g_next: recorded gradients; g carries a small replay error against G0.
        G0, G1: ∇f(x_t; z_t), ∇f(x_{t+1}; z_t). lr: the step size. alpha: the α grid.
    """

    h: np.ndarray
    z_prev: np.ndarray
    z: np.ndarray
    z_next: np.ndarray
    x0: np.ndarray
    x_prev: np.ndarray
    x: np.ndarray
    x_next: np.ndarray
    x_ref: np.ndarray
    g_prev: np.ndarray
    g: np.ndarray
    g_next: np.ndarray
    G0: np.ndarray
    G1: np.ndarray
    lr: float
    alpha: np.ndarray

    @property
    def delta(self) -> np.ndarray:
        """Δ_t = x_{t+1} − x_t."""
        return self.x_next - self.x

    def f(self, x: np.ndarray, z: np.ndarray | None = None) -> float:
        """f(x; z) = ½ Σ hᵢ (xᵢ − zᵢ)² (z defaults to the pair's minibatch z_t)."""
        d = x - (self.z if z is None else z)
        return float(0.5 * np.sum(self.h * d * d))

    def grad(self, x: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
        """∇f(x; z) = h ⊙ (x − z)."""
        return self.h * (x - (self.z if z is None else z))

    def ell(self, a: float) -> float:
        """ℓ(a) = f(x_t + aΔ_t; z_t)."""
        return self.f(self.x + a * self.delta)

    def dell(self, a: float) -> float:
        """ℓ'(a) = ⟨∇f(x_t + aΔ_t; z_t), Δ_t⟩."""
        return float(self.grad(self.x + a * self.delta) @ self.delta)

    @staticmethod
    def norm(v: np.ndarray) -> float:
        return float(np.linalg.norm(v))


def _vectors(q: QuadraticPair) -> dict[str, np.ndarray]:
    """The probe's vectors (:data:`trajscope.metrics.pair.VECTORS`) of the pair, flat."""
    return {
        "delta": q.delta, "G0": q.G0, "G1": q.G1, "dG": q.G1 - q.G0, "g": q.g, "g_next": q.g_next,
        "dg": q.g_next - q.g, "G0_err": q.G0 - q.g, "x": q.x, "x_dist": q.x - q.x0,
        "g_prev": q.g_prev, "delta_prev": q.x - q.x_prev, "x_ref": q.x - q.x_ref,
    }


def synthetic_pair(step: int = 3, *, lr: float = 0.1, seed: int = 0, points: int = 9, margin: float = 0.5,
                   needs: tuple[str, ...] = ("sharpness",)) -> tuple[PairStats, QuadraticPair]:
    """Probe results of one SGD pair on the quadratic of the module docstring, in closed form.

    Args:
        step: t. lr: the SGD step size. seed: draws h ∈ [0.2, 5], the centres and x_0.
        points, margin: the α grid (as ``trajscope analyze --points/--margin``).
        needs: optional probe results to include; the ``sharpness`` extras are max(h), the number
            of coordinates and 1 (converged). Without them they read as NaN, as in an analysis run
            without ``--sharpness``.

    Returns:
        (PairStats as the probe would give it, the :class:`QuadraticPair` it was computed from).
    """
    rng = np.random.default_rng(seed)
    n = sum(size for _, size in LAYERS)
    h = rng.uniform(0.2, 5.0, n)
    z_prev, z, z_next = (rng.normal(0.0, 0.3, n) for _ in range(3))
    x0 = rng.normal(0.0, 1.0, n)
    x_prev = x0 + rng.normal(0.0, 0.5, n)
    g_prev = h * (x_prev - z_prev)
    x = x_prev - lr * g_prev
    G0 = h * (x - z)
    g = G0 * (1 + 1e-3 * rng.normal(size=n))  # a small replay error: G0 ≠ g_t
    x_next = x - lr * g
    n_margin = int(round(margin * (points - 1)))
    alpha = np.arange(-n_margin, points + n_margin, dtype=np.float64) / (points - 1)
    q = QuadraticPair(h=h, z_prev=z_prev, z=z, z_next=z_next, x0=x0, x_prev=x_prev, x=x, x_next=x_next,
                      x_ref=z.copy() + 0.1, g_prev=g_prev, g=g, g_next=h * (x_next - z_next), G0=G0,
                      G1=h * (x_next - z), lr=lr, alpha=alpha)
    vec = _vectors(q)
    bounds = np.cumsum([0] + [size for _, size in LAYERS])
    terms = {
        f"{a}.{b}": np.array([vec[a][i:j] @ vec[b][i:j] for i, j in zip(bounds[:-1], bounds[1:], strict=True)])
        for a, b in TERMS
    }
    # As an evaluation under training's autocast gives them: f(x_t), f(x_{t+1}) from the gradient
    # passes and the loss resolution (here a rounding far below every loss difference).
    extras = {"loss_ref": q.f(q.x_ref), "loss_x0": q.ell(0.0), "loss_x1": q.ell(1.0),
              "loss_resolution": 1e-9 * abs(q.ell(0.0))}
    if "sharpness" in needs:
        extras |= {"sharpness": float(h.max()), "sharpness_iterations": float(n), "sharpness_converged": 1.0}
    stats = PairStats(
        step=step, alpha=alpha, loss_line=np.array([q.ell(a) for a in alpha]),
        dloss_line=np.array([q.dell(a) for a in alpha]), terms=terms,
        layers=tuple(name for name, _ in LAYERS), loss_recorded=q.ell(0.0), lr=np.array([lr]), extras=extras,
    )
    return stats, q


def synthetic_dataset(specs: dict[str, MetricSpec] | None = None, *, pairs: int = 6) -> Any:
    """An xarray Dataset of ``pairs`` synthetic pairs (seeds 0, 1, …; steps 0, 1, …) with every pair
    metric of ``specs`` (default: all registered), then every series metric, as the analysis stacks
    them: dims ``step`` (+ ``alpha``, ``layer``), the ``lr`` coordinate."""
    import xarray as xr

    specs = get_metrics() if specs is None else specs
    stats = [synthetic_pair(t, seed=t)[0] for t in range(pairs)]
    values = [evaluate_pair(s, specs.values()) for s in stats]
    data_vars: dict[str, Any] = {}
    for name, spec in specs.items():
        if spec.kind == "pair":
            data_vars[name] = (("step", *spec.dims), np.stack([v[name] for v in values]), spec.attrs())
            if spec.per_layer:
                data_vars[f"{name}_by_layer"] = (("step", "layer"), np.stack([v[f"{name}_by_layer"] for v in values]))
    coords = {"step": np.arange(pairs), "alpha": stats[0].alpha, "layer": list(stats[0].layers),
              "lr": ("step", np.array([s.lr[0] for s in stats]))}
    ds = xr.Dataset(data_vars, coords=coords)
    for name, spec in specs.items():
        if spec.kind == "series":
            ds[name] = ("step", np.asarray(spec.fn(ds), dtype=np.float64), spec.attrs())
    return ds


def _spec_of(metric: MetricSpec | Callable[..., Any]) -> MetricSpec:
    if isinstance(metric, MetricSpec):
        return metric
    spec = getattr(metric, SPEC_ATTR, None)
    if not isinstance(spec, MetricSpec):
        raise MetricRegistrationError(
            f"check_metric({metric!r}): expected a MetricSpec or a function decorated with "
            "@metric/@series"
        )
    return spec


def _check_values(spec: MetricSpec, what: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
    where = f"metric {spec.name!r} (from {spec.source})"
    if value.shape != shape:
        raise MetricRegistrationError(
            f"{where}: {what} has shape {value.shape}, expected {shape} (dims={('step', *spec.dims)})"
        )
    if not np.all(np.isfinite(value)):
        hint = ("; it reads extra('sharpness')? declare needs=('sharpness',)"
                if "sharpness" not in spec.needs and spec.kind == "pair" else "")
        raise MetricRegistrationError(
            f"{where}: {what} is not finite ({value.tolist()}) on a synthetic quadratic where every "
            f"probe result is defined{hint}"
        )


def check_metric(metric: MetricSpec | Callable[..., Any], *,
                 expected: Callable[[QuadraticPair], Any] | None = None, rtol: float = 1e-9,
                 atol: float = 0.0) -> dict[str, np.ndarray]:
    """Check ``metric`` (a spec or a decorated function) against the contract by running it.

    Checks the spec as registration does; then, for a pair metric, runs it on :func:`synthetic_pair`
    (and per layer) and checks that each value is float64, finite and of the declared shape,
    optionally close (``rtol``, ``atol``) to ``expected(q)`` for the closed-form :class:`QuadraticPair`; for a
    series metric, runs it on :func:`synthetic_dataset` (of the other registered metrics) and
    checks a finite array over ``step``.

    Returns:
        The values it computed (``name`` and, per layer, ``<name>_by_layer``).

    Raises:
        MetricRegistrationError: one message naming the metric, its source and the broken rule.
    """
    spec = _spec_of(metric)
    check_spec(spec)
    where = f"metric {spec.name!r} (from {spec.source})"
    if spec.kind == "series":
        specs = {n: s for n, s in get_metrics().items() if n != spec.name}
        missing = [r for r in spec.requires if r not in specs]
        if missing:
            raise MetricRegistrationError(f"{where}: requires {missing}, which no registered metric provides")
        ds = synthetic_dataset(specs)
        try:
            out = {spec.name: np.asarray(spec.fn(ds), dtype=np.float64)}
        except Exception as exc:
            raise MetricRegistrationError(
                f"{where}: failed on a synthetic Dataset: {type(exc).__name__}: {exc}"
            ) from exc
        _check_values(spec, "its value", out[spec.name], (ds.sizes["step"],))
        return out
    stats, q = synthetic_pair(needs=spec.needs)
    try:
        out = evaluate_pair(stats, [spec])
    except AnalysisError as exc:
        cause = exc.__cause__ or exc
        raise MetricRegistrationError(
            f"{where}: failed on a synthetic quadratic pair: {type(cause).__name__}: {cause}"
        ) from exc
    _check_values(spec, "its value", out[spec.name], (len(stats.alpha),) if spec.dims else ())
    if spec.per_layer:
        _check_values(spec, "its per-layer value", out[f"{spec.name}_by_layer"], (len(stats.layers),))
    if expected is not None:
        want = np.asarray(expected(q), dtype=np.float64)
        if not np.allclose(out[spec.name], want, rtol=rtol, atol=atol):
            raise MetricRegistrationError(
                f"{where}: gives {out[spec.name].tolist()} on the synthetic quadratic, expected "
                f"{want.tolist()} (rtol={rtol:g}, atol={atol:g})"
            )
    return out
