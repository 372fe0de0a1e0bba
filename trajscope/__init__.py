"""trajscope: do the assumptions of optimization theory hold along the path your optimizer took?

Record with :class:`Recorder` inside any PyTorch training loop, then :func:`analyze` the run
offline (or ``trajscope analyze RUN_DIR``) and read the metrics with :func:`open_metrics`.

Imports are lazy: ``import trajscope.recorders`` (or ``trajscope.Recorder``) never pulls in dask or
xarray, so a training job does not pay for the analyzer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trajscope._version import VERSION as __version__

_LAZY = {
    "Recorder": "trajscope.recorders",
    "Objective": "trajscope.objective",
    "open_run": "trajscope.store",
    "Run": "trajscope.store",
    "Snapshot": "trajscope.store",
    "analyze": "trajscope.analysis",
    "open_metrics": "trajscope.analysis",
    "MetricSpec": "trajscope.metrics",
    "get_metrics": "trajscope.metrics",
    "summarize": "trajscope.report",
    "TrajscopeError": "trajscope.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:
    from trajscope.analysis import analyze, open_metrics
    from trajscope.errors import TrajscopeError
    from trajscope.metrics import MetricSpec, get_metrics
    from trajscope.objective import Objective
    from trajscope.recorders import Recorder
    from trajscope.report import summarize
    from trajscope.store import Run, Snapshot, open_run


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value = getattr(importlib.import_module(_LAZY[name]), name)
    return value


def __dir__() -> list[str]:
    return __all__
