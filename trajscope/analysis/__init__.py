"""Orchestrating an analysis: :func:`analyze` (:mod:`~trajscope.analysis.driver`) decides what to
compute (:mod:`~trajscope.analysis.plan`), hands every pair task one job
(:mod:`~trajscope.analysis.job`, :mod:`~trajscope.analysis.tasks`), runs them on a dask scheduler
(:mod:`~trajscope.analysis.execution`, :mod:`~trajscope.analysis.process`) over shared snapshot
loads (:mod:`~trajscope.analysis.loading`), persists every finished pair
(:mod:`~trajscope.analysis.persist`, :mod:`~trajscope.analysis.outputs`) and builds the metrics
Dataset (:mod:`~trajscope.analysis.dataset`, with what went wrong in
:mod:`~trajscope.analysis.health`). See ``docs/architecture.md``.
"""

from __future__ import annotations

from trajscope.analysis.driver import analyze, build_dataset, open_metrics

__all__ = ["analyze", "build_dataset", "open_metrics"]
