"""trajscope: do the assumptions of optimization theory hold along the path your optimizer took?

Record with :class:`Recorder` inside any PyTorch training loop, then :func:`analyze` the run
offline (or ``trajscope analyze RUN_DIR``) and read the metrics with :func:`open_metrics`.

Imports are lazy: ``import trajscope.recorders`` (or ``trajscope.Recorder``) never pulls in dask or
xarray, so a training job does not pay for the analyzer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trajscope._version import VERSION as __version__

_LAZY = {
    "Recorder": "trajscope.recorders",
    "Objective": "trajscope.objective",
    "open_run": "trajscope.store.run",
    "Run": "trajscope.store.run",
    "Snapshot": "trajscope.store.run",
    "analyze": "trajscope.analysis.driver",
    "open_metrics": "trajscope.analysis.driver",
    "MetricSpec": "trajscope.metrics.registry",
    "get_metrics": "trajscope.metrics.registry",
    "summarize": "trajscope.report.summary",
    "TrajscopeError": "trajscope.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:
    from trajscope.analysis.driver import analyze, open_metrics
    from trajscope.errors import TrajscopeError
    from trajscope.metrics.registry import MetricSpec, get_metrics
    from trajscope.objective import Objective
    from trajscope.recorders import Recorder
    from trajscope.report.summary import summarize
    from trajscope.store.run import Run, Snapshot, open_run


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trajscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
