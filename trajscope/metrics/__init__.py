"""The metrics, and the API a metric plugin imports.

* :mod:`~trajscope.metrics.builtins`: every built-in metric, one small pure function each (read it
  to add one; ``docs/adding-a-metric.md``);
* :mod:`~trajscope.metrics.pair`: what a pair metric reads: :class:`PairView` (the whole model) and
  :class:`LayerView` (one parameter tensor) over a pair's :class:`PairStats`, whose inner products
  are those of :data:`TERMS` between the vectors of :data:`VECTORS`;
* :mod:`~trajscope.metrics.registry`: :func:`metric` and :func:`series` declare a metric, the
  registry checks it when it registers; built-ins and plugins (entry point group
  :data:`ENTRY_POINT_GROUP`) load the same way, through :func:`get_metrics`.

This package imports numpy only (no torch, no xarray).
"""

from __future__ import annotations

from trajscope.metrics.pair import TERMS, VECTORS, LayerView, PairStats, PairView
from trajscope.metrics.registry import (
    ENTRY_POINT_GROUP,
    MetricSpec,
    get_metrics,
    holds,
    metric,
    refresh_plugins,
    register,
    series,
)

__all__ = ["ENTRY_POINT_GROUP", "TERMS", "VECTORS", "LayerView", "MetricSpec", "PairStats", "PairView",
           "get_metrics", "holds", "metric", "refresh_plugins", "register", "series"]
