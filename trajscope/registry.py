"""Deprecated home of the metric registry; import from :mod:`trajscope.metrics`.

Kept for one release so that metric plugins written against ``trajscope.registry`` keep working:
importing it warns once (:class:`DeprecationWarning`) and gives the names of
:mod:`trajscope.metrics.registry` (the same registry, not a copy).
"""

from __future__ import annotations

import warnings

from trajscope.metrics.registry import (
    BUILTIN_MODULES,
    ENTRY_POINT_GROUP,
    KNOWN_NEEDS,
    MetricSpec,
    check_spec,
    evaluate_pair,
    get_metrics,
    holds,
    holds_bound,
    markdown_table,
    metric,
    refresh_plugins,
    register,
    series,
)

__all__ = ["MetricSpec", "register", "check_spec", "metric", "series", "get_metrics", "refresh_plugins",
           "evaluate_pair", "markdown_table", "holds", "holds_bound", "ENTRY_POINT_GROUP", "KNOWN_NEEDS",
           "BUILTIN_MODULES"]

warnings.warn("trajscope.registry is deprecated and goes away in the next release: import metric, series, "
              "MetricSpec and get_metrics from trajscope.metrics", DeprecationWarning, stacklevel=2)
