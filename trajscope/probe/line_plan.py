"""How the forward-mode line is evaluated under a memory budget: batched or point by point, and
in chunks of how many α points.

Decided once per analysis in each worker process, on the first pair that process probes
(:func:`planned_line`), and kept in :data:`_PLANS` for its following pairs:

1. α₀ is evaluated alone (one jvp) under a :class:`~trajscope.probe.memory.PeakMeter`: its peak is the
   one-point cost c. The line's room R is the budget B, less what the worker holds under an
   explicit budget (:func:`~trajscope.probe.memory.plan_room`, which refuses a pair that does not
   fit B, naming what it needs), and the chunk that fits is ``min(n, ⌊R / (1.25·c)⌋)``
   (:func:`~trajscope.probe.memory.plan_chunk`; R < c is an error that names both).
2. With ``batched=None`` (auto), unless c exceeds :data:`LARGE_POINT`: α₁ alone is timed (t₁),
   then two batched chunks of k = min(fit, :data:`CALIBRATION_POINTS`) points: the first
   measures memory (its peak/k refines c), the second is timed (t_k per point). Batched is chosen
   when t_k < :data:`PREFER_BATCHED`·t₁: on small models vmap saves the per-call overhead; on
   models whose activations are large (a language model's logits), a batched chunk moves k times
   the activations through memory and the point loop is faster.
   A point of at most :data:`SMALL_POINT` is batched without a trial.
3. The line is evaluated the chosen way. Only points the trial evaluated point by point are
   kept when point by point is chosen; a batched line is evaluated whole again, so that no pair
   mixes the two paths (they agree to rounding, not bit for bit) and the numbers do not depend
   on which pair a worker calibrated on.

Every pair records the plan in its extras (``line_chunk``, ``line_point_bytes``, …), from which
the Dataset attrs ``line_mode`` and ``line_chunk`` are built. Workers in
different processes calibrate each on its own first pair and may, on a loaded machine, decide
differently; the numbers are the same either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trajscope.errors import ObjectiveError
from trajscope.probe import memory
from trajscope.probe.line import (
    Loss,
    forward_ad_failure,
    forward_line,
    forward_mode_error,
    jvp_point,
    line_and_path,
    line_batched,
    line_pointwise,
    vmap_failure,
    warn_fallback,
)

__all__ = ["LinePlan", "line_with_plan", "planned_line"]

CALIBRATION_POINTS = 6
"""α points of each of the calibration's two batched chunks: enough for vmap's saving per call to
show above timing noise (it grows with the chunk); models whose points are large skip the trial
(:data:`LARGE_POINT`), so it never holds many large points at once."""
SMALL_POINT = 16 * 2**20
"""Bytes: a point whose evaluation holds less is evaluated batched without a timed trial: its
kernels are small, so the per-call overhead vmap saves dominates it."""
LARGE_POINT = 256 * 2**20
"""Bytes: a point whose evaluation holds more is evaluated point by point without a batched trial.
Its kernels are already large, so vmap's saving (per-call overhead) is negligible against them,
while a batched chunk moves several points' activations through memory at once (a language
model's logits and their tangents)."""
PREFER_BATCHED = 0.95
"""Batched must be at least this much faster per point to be chosen: the point loop holds the
memory of one point only."""


@dataclass(frozen=True)
class LinePlan:
    """How the lines of an analysis are evaluated in this process."""

    mode: str
    """``"batched"`` or ``"pointwise"``."""
    chunk: int
    """α points per batched call (what fits the budget)."""
    point_bytes: int
    """Measured peak memory of one α point, bytes."""
    budget: int
    """Bytes the line evaluation of this worker may add to what it holds (its room)."""
    held: int = 0
    """Bytes the worker held above the analysis' start when it planned (explicit budgets only)."""
    seconds_point: float = math.nan
    """Calibration: seconds per point, point by point (NaN: not calibrated)."""
    seconds_batched: float = math.nan
    """Calibration: seconds per point in a batched chunk of ``calibration_points``."""
    calibration_points: int = 0
    fallback: bool = False
    """vmap could not batch this model (evaluated point by point)."""

    def extras(self) -> dict[str, float]:
        """The plan as a pair's float extras (``PairStats.extras``)."""
        return {
            "line_batched_mode": float(self.mode == "batched"),
            "line_chunk": float(self.chunk if self.mode == "batched" else 1),
            "line_fit_chunk": float(self.chunk),
            "line_point_bytes": float(self.point_bytes),
            "line_budget": float(self.budget),
            "line_held": float(self.held),
            "line_seconds_point": self.seconds_point,
            "line_seconds_batched": self.seconds_batched,
            "line_calibration_points": float(self.calibration_points),
            "line_fallback": float(self.fallback),
        }


_PLANS: dict[tuple[Any, ...], LinePlan] = {}
"""This process's plans, one per analysis and line shape (newest last)."""


def _key(settings: Any, x0: Mapping[str, torch.Tensor], n: int) -> tuple[Any, ...]:
    numel = sum(t.numel() for t in x0.values())
    return (getattr(settings, "plan_id", ""), settings.device, settings.dtype, settings.batched,
            settings.max_memory, numel, n)


def line_with_plan(f: Loss, x0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                  alphas: torch.Tensor, settings: Any, rng: Mapping[str, torch.Tensor],
                  replay: bool) -> tuple[np.ndarray, np.ndarray, bool, LinePlan | None]:
    """:func:`planned_line` for forward mode under a budget (``settings.max_memory`` set, no
    ``chunk_size``, ``batched`` not False); :func:`trajscope.probe.line.line_and_path` otherwise
    (no plan)."""
    if (settings.derivatives == "forward" and settings.max_memory is not None and settings.chunk_size is None
            and settings.batched is not False):
        return planned_line(f, x0, delta, alphas, settings, rng, replay)
    return (*line_and_path(f, x0, delta, alphas, settings, rng, replay), None)


def planned_line(f: Loss, x0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                 alphas: torch.Tensor, settings: Any, rng: Mapping[str, torch.Tensor],
                 replay: bool) -> tuple[np.ndarray, np.ndarray, bool, LinePlan]:
    """ℓ(α), ℓ'(α), whether the batched path computed them, and the plan they followed, under the
    budget ``settings.max_memory`` (bytes per worker; 0: :func:`~trajscope.probe.memory.default_budget`)."""
    key = _key(settings, x0, len(alphas))
    plan = _PLANS.get(key)
    if plan is not None:
        vals, ders, batched = forward_line(f, x0, delta, alphas, settings, rng, replay,
                                           batched=plan.mode == "batched", chunk=plan.chunk)
        return vals, ders, batched, plan
    with torch.no_grad():
        try:
            vals, ders, plan = _calibrate(f, x0, delta, alphas, settings, rng, replay)
        except (NotImplementedError, RuntimeError) as exc:  # as the point loop of forward_line reports it
            what = forward_ad_failure(exc)
            if what is None:
                raise
            raise forward_mode_error(exc, what) from None
    _PLANS[key] = plan
    i = len(vals)
    if i < len(alphas):
        rest_v, rest_d, _ = forward_line(f, x0, delta, alphas[i:], settings, rng, replay,
                                         batched=plan.mode == "batched", chunk=plan.chunk)
        vals, ders = np.concatenate([vals, rest_v]), np.concatenate([ders, rest_d])
    return vals, ders, plan.mode == "batched", plan


def _calibrate(f: Loss, x0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
               alphas: torch.Tensor, settings: Any, rng: Mapping[str, torch.Tensor],
               replay: bool) -> tuple[np.ndarray, np.ndarray, LinePlan]:
    """The first points of the line and the plan measured while evaluating them (see the module
    docstring)."""
    # Where the parameters are, not settings.device: a cluster's workers resolve "auto" themselves.
    device, n = str(next(iter(x0.values())).device), len(alphas)
    param_bytes = sum(t.numel() * t.element_size() for t in x0.values())
    held = memory.held(settings.plan_id, device) if settings.memory_strict else 0
    with memory.PeakMeter(device) as m0:
        v, d = line_pointwise(f, x0, delta, alphas[:1], device, rng, replay, jvp_point)
    # Without a way to measure (m0.peak == 0), one point holds at least its parameters.
    point_bytes = max(m0.peak, param_bytes)
    budget = memory.plan_room(settings.max_memory or memory.default_budget(device), held, point_bytes,
                              param_bytes, settings.memory_strict, m0.exact)
    fit = memory.plan_chunk(budget, point_bytes, n, m0.exact)
    vals, ders = [v], [d]
    none = np.zeros(0, dtype=np.float64)
    if settings.batched is True or point_bytes <= SMALL_POINT:
        # The whole line is evaluated batched: a pair's numbers never mix the two paths, whose
        # roundings differ, so they do not depend on which pair a worker calibrated on.
        return none, none, LinePlan("batched", fit, point_bytes, budget, held)
    k = min(fit, CALIBRATION_POINTS, (n - 2) // 2)
    if k < 2 or point_bytes > LARGE_POINT:
        return v, d, LinePlan("pointwise", fit, point_bytes, budget, held)
    with memory.PeakMeter(device, memory=False) as m1:
        v, d = line_pointwise(f, x0, delta, alphas[1:2], device, rng, replay, jvp_point)
    vals.append(v)
    ders.append(d)
    try:
        # The first chunk measures memory and writes the chunk's fresh buffers; the second, of the
        # same shape, is timed as every later chunk runs: into reused memory.
        with memory.PeakMeter(device) as mb:
            v, d = line_batched(f, x0, delta, alphas[2 : 2 + k], k, rng, replay, device)
        vals.append(v)
        ders.append(d)
        with memory.PeakMeter(device, memory=False) as mt:
            v, d = line_batched(f, x0, delta, alphas[2 + k : 2 + 2 * k], k, rng, replay, device)
    except ObjectiveError:
        raise
    except Exception as exc:  # noqa: BLE001 - modules vmap cannot batch: the point loop gives the same result
        warn_fallback(vmap_failure(exc))
        plan = LinePlan("pointwise", fit, point_bytes, budget, held, m1.seconds, math.nan, k, fallback=True)
        return np.concatenate(vals[:2]), np.concatenate(ders[:2]), plan
    point_bytes = max(point_bytes, mb.peak // k)
    fit = memory.plan_chunk(budget, point_bytes, n, m0.exact and mb.exact)
    per_point = mt.seconds / k
    mode = "batched" if per_point < PREFER_BATCHED * m1.seconds else "pointwise"
    plan = LinePlan(mode, fit, point_bytes, budget, held, m1.seconds, per_point, k)
    if mode == "batched":  # evaluated again, whole, as every later pair is
        return none, none, plan
    return np.concatenate(vals[:2]), np.concatenate(ders[:2]), plan  # the two pointwise points
