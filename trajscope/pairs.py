"""Deprecated home of the names a pair metric reads; import them from :mod:`trajscope.metrics`.

Kept for one release so that metric plugins written against ``trajscope.pairs`` keep working:
importing it warns once (:class:`DeprecationWarning`) and gives the names of
:mod:`trajscope.metrics.pair`.
"""

from __future__ import annotations

import warnings

from trajscope.metrics.pair import TERMS, VECTORS, LayerView, PairStats, PairView, layer_views, quadrature

__all__ = ["VECTORS", "TERMS", "PairStats", "PairView", "LayerView", "layer_views", "quadrature"]

warnings.warn("trajscope.pairs is deprecated and goes away in the next release: import PairView, LayerView, "
              "PairStats, TERMS and VECTORS from trajscope.metrics", DeprecationWarning, stacklevel=2)
