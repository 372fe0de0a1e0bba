"""Orchestrating an analysis: :func:`analyze` plans the work, runs one task per pair on a dask
scheduler, persists each finished pair and assembles the metrics Dataset."""

from __future__ import annotations

from trajscope.analysis.driver import analyze, build_dataset, open_metrics

__all__ = ["analyze", "build_dataset", "open_metrics"]
