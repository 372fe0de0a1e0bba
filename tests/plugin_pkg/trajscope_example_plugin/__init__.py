"""A third-party trajscope metric, registered through the ``trajscope.metrics`` entry point.

This is the worked example of ``docs/adding-a-metric.md``: the relative update size
‖Δ_t‖ / ‖x_t‖, per layer too. It reads two inner products the probe already reduces (⟨Δ, Δ⟩ and
⟨x, x⟩), so it costs nothing beyond the line probe.
"""

from __future__ import annotations

import math

from trajscope.metrics import LayerView, PairView, metric


@metric(
    "relative_update",
    long_name="relative update size",
    units="1",
    description="‖Δ_t‖ / ‖x_t‖ = ‖x_{t+1} − x_t‖ / ‖x_t‖",
    holds_if="< 0.1",
    per_layer=True,
)
def relative_update(p: PairView | LayerView) -> float:
    x = p.norm("x")
    return p.norm("delta") / x if x > 0 else math.nan
