"""Probing one pair (t, t+1): re-evaluating the loss on the step's minibatch along the line between
x_t and x_{t+1}, and reducing what it finds to the numbers the metrics read.

* :mod:`~trajscope.probe.settings`: :class:`ProbeSettings`, how every pair of an analysis is probed;
  :mod:`~trajscope.probe.grid`: the α grid;
* :mod:`~trajscope.probe.pair`: :func:`probe_pair`, the four stages of one pair:
  :mod:`~trajscope.probe.stages` (prepare the pair, evaluate f), then
  :mod:`~trajscope.probe.vectors` (the pair's vectors and their inner products per layer);
* :mod:`~trajscope.probe.line`, :mod:`~trajscope.probe.line_plan`, :mod:`~trajscope.probe.memory`:
  ℓ(α) and ℓ'(α) on the grid, batched under a memory budget or point by point;
* :mod:`~trajscope.probe.sharpness`: λ_max of the minibatch Hessian (opt-in);
* :mod:`~trajscope.probe.reference_point`: the part of a pair that depends on the reference point x*;
* :mod:`~trajscope.probe.trials`: the evaluations an analysis runs before its pairs (the derivative
  path, whether persisted pairs still hold).

The names below are imported on first use: the command line reads the grid's bounds without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "DERIVATIVES": "trajscope.probe.settings",
    "ProbeSettings": "trajscope.probe.settings",
    "alpha_grid": "trajscope.probe.grid",
    "probe_pair": "trajscope.probe.pair",
    "ReferencePart": "trajscope.probe.reference_point",
    "probe_reference": "trajscope.probe.reference_point",
}

__all__ = ["DERIVATIVES", "ProbeSettings", "ReferencePart", "alpha_grid", "probe_pair", "probe_reference"]

if TYPE_CHECKING:
    from trajscope.probe.grid import alpha_grid
    from trajscope.probe.pair import probe_pair
    from trajscope.probe.reference_point import ReferencePart, probe_reference
    from trajscope.probe.settings import DERIVATIVES, ProbeSettings


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value = getattr(importlib.import_module(_LAZY[name]), name)
    return value


def __dir__() -> list[str]:
    return __all__
