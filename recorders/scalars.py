"""``scalars.jsonl``: one JSON line per optimizer step (loss, learning rates, skipped, recorded).

A line's loss is f = Σ w_i · f_i over the step's micro-batches. When those losses are CUDA tensors,
reading them would wait for the GPU; the log copies them to pinned host memory without blocking and
writes the line once the copy has landed (at most :data:`DEFER_LIMIT` lines wait).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trajscope import confine
from trajscope.errors import RecorderError, RunFormatError
from trajscope.recorders.capture import Recording, as_float, micro_weights

__all__ = ["ScalarsLog", "DEFER_LIMIT", "combine_losses", "step_line"]

DEFER_LIMIT = 64
"""Lines kept back while their GPU losses are copied to the host without blocking."""

WeightedLosses = list[tuple[float, Any]]
"""(weight w_i, loss f_i) of each micro-batch; a loss is a tensor, a number or None."""


def step_line(rec: Recording, micro: list[dict[str, Any]], lrs: list[float], *,
              skipped: bool) -> tuple[dict[str, Any], WeightedLosses]:
    """The line of step ``rec.step`` (its ``loss`` still unset) and the weighted losses of its
    micro-batches ``micro`` that :meth:`ScalarsLog.add` combines into it."""
    line: dict[str, Any] = {
        "step": rec.step,
        "loss": None,
        "lr": lrs,
        "skipped": skipped,
        "recorded": (not skipped) and rec.schedule(rec.step),
    }
    if rec.accumulation > 1:
        line["micro_batches"] = len(micro)
    weights = micro_weights(micro, rec.accumulation_reduction) if micro else []
    return line, [(w, mb["loss"]) for w, mb in zip(weights, micro)]


def combine_losses(parts: WeightedLosses) -> float | None:
    """f = Σ w_i · f_i (exactly rounded), or None when there is no loss or one is missing."""
    if not parts or any(v is None for _, v in parts):
        return None
    return math.fsum(w * as_float(v) for w, v in parts)


class ScalarsLog:
    """Appends the lines of ``scalars.jsonl``; a failed write is passed to ``on_error``.

    Args:
        path: the file (opened for appending).
        on_error: called with a one-line message and the ``OSError`` when a write fails.
    """

    def __init__(self, path: Path, on_error: Callable[[str, BaseException], None]) -> None:
        self.path = path
        try:  # never through a symlink: appending there would write outside the run directory
            fd = confine.open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "for appending")
        except RunFormatError as exc:
            raise RecorderError(str(exc)) from exc
        self._fh: Any = os.fdopen(fd, "a", encoding="utf-8")
        self._on_error = on_error
        self._deferred: list[tuple[dict[str, Any], WeightedLosses, Any]] = []

    def add(self, line: dict[str, Any], parts: WeightedLosses) -> None:
        """Write ``line`` with ``loss`` set from ``parts`` (later, if the losses are on a GPU)."""
        if any(isinstance(v, torch.Tensor) and v.device.type == "cuda" for _, v in parts):
            # Do not stall the GPU pipeline for a log line: copy the losses back without
            # blocking and write the line once the copy has landed.
            host = []
            for w, v in parts:
                if isinstance(v, torch.Tensor):
                    h = torch.empty((), dtype=v.dtype, pin_memory=True)
                    h.copy_(v.detach().reshape(()), non_blocking=True)
                    v = h
                host.append((w, v))
            event = torch.cuda.Event()
            event.record()
            self._deferred.append((line, host, event))
            self.flush_deferred(force=len(self._deferred) >= DEFER_LIMIT)
            return
        self.flush_deferred(force=True)
        line["loss"] = combine_losses(parts)
        self._emit(line)

    def flush_deferred(self, *, force: bool) -> None:
        """Write the kept-back lines whose losses have landed (all of them, waiting, if ``force``)."""
        while self._deferred:
            line, parts, event = self._deferred[0]
            if not force and not event.query():
                return
            event.synchronize()
            line["loss"] = combine_losses(parts)
            self._deferred.pop(0)
            self._emit(line)

    def close(self) -> None:
        """Close the file (a failure to close is ignored: every line was flushed when written)."""
        try:
            self._fh.close()
        except OSError:
            pass

    def _emit(self, line: dict[str, Any]) -> None:
        try:
            self._fh.write(json.dumps(_strict(line), allow_nan=False) + "\n")
            self._fh.flush()
        except OSError as exc:
            self._on_error(f"{self.path}: writing the line of step {line['step']} failed "
                           f"({exc.strerror or exc})", exc)


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float written as the string ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"``: strict JSON has no such numbers, and parsers other than Python's reject the bare
    tokens. The reader turns the strings back into floats."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value
