"""Helpers of the recorder's optimizer step pre-hook: finding and wrapping ``step``'s closure.

When ``optimizer.step`` is given a closure (LBFGS, PyTorch Lightning), the gradient only exists
once the closure has run inside ``step``; the pre-hook then hands ``step`` a wrapped closure that
captures the snapshot right after the first call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["step_closure", "with_capture_after_first_call"]


def step_closure(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Any] | None:
    """The closure passed to ``optimizer.step``, or None, from the pre-hook's ``args``/``kwargs``."""
    # torch passes step()'s own args, `self` included: step(closure) arrives as (opt, closure).
    closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
    return closure if callable(closure) else None


def with_capture_after_first_call(
    args: tuple[Any, ...], kwargs: dict[str, Any], closure: Callable[[], Any], capture: Callable[[], None],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``step``'s (args, kwargs) with ``closure`` replaced by one that calls ``capture`` once, after
    the closure's first call (later calls, e.g. the LBFGS line search, evaluate other points)."""
    done = [False]

    def recorded_closure() -> Any:
        result = closure()
        if not done[0]:
            done[0] = True
            capture()
        return result

    if "closure" in kwargs:
        return args, {**kwargs, "closure": recorded_closure}
    return (args[0], recorded_closure, *args[2:]), kwargs
