"""Checks of the :class:`~trajscope.recorders.Recorder`'s arguments, each failing with one clear message."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from trajscope import runformat as fmt
from trajscope.errors import RecorderError

__all__ = ["check_arguments", "json_metadata"]


def check_arguments(model: Any, optimizer: Any, storage: str, accumulation: Any, accumulation_reduction: str,
                    on_error: str, max_pending: Any, grads: Any = True) -> None:
    """Raise :class:`RecorderError` naming the first argument of :class:`Recorder` that is invalid."""
    if not isinstance(model, torch.nn.Module):
        raise RecorderError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    complex_param = next(((n, p) for n, p in model.named_parameters() if p.is_complex()), None)
    if complex_param is not None:
        name, p = complex_param
        raise RecorderError(
            f"model: parameter {name!r} is {str(p.dtype).removeprefix('torch.')}; the recorder takes "
            "real parameters only (the run format stores no complex dtype, and the metrics are real "
            "inner products)"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise RecorderError(
            f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if storage not in fmt.STORAGES:
        raise RecorderError(f"format={storage!r}: expected one of {', '.join(fmt.STORAGES)}")
    if not isinstance(accumulation, int) or isinstance(accumulation, bool) or accumulation < 1:
        raise RecorderError(f"accumulation={accumulation!r}: expected an int >= 1")
    if accumulation_reduction not in ("mean", "sum"):
        raise RecorderError(
            f"accumulation_reduction={accumulation_reduction!r}: expected 'mean' or 'sum'"
        )
    if on_error not in ("raise", "warn"):
        raise RecorderError(f"on_error={on_error!r}: expected 'raise' or 'warn'")
    if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
        raise RecorderError(f"max_pending={max_pending!r}: expected an int >= 1")
    if not isinstance(grads, bool):
        raise RecorderError(f"grads={grads!r}: expected True (store g_t) or False (store no gradient)")


def json_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of the user's ``metadata``, checked to be JSON-serialisable."""
    out = dict(metadata or {})
    try:
        json.dumps(out)
    except (TypeError, ValueError) as exc:
        raise RecorderError(f"metadata: must be JSON-serialisable ({exc})") from exc
    return out
