"""The objective contract: how the analyzer rebuilds f(x; z) from a model skeleton and a batch.

A user writes, in any importable module::

    def make_objective() -> trajscope.Objective:
        model = MyNet()                      # the architecture; its weights are replaced
        def loss(model, batch):              # batch exactly as given to rec.batch(...)
            x, y = batch
            return F.cross_entropy(model(x), y)
        return trajscope.Objective(model=model, loss=loss)

and names it ``"mymodule:make_objective"``. Only the analyzing user's own environment is imported
(the current directory is put on ``sys.path`` first, as ``python -m`` does); nothing inside a run
directory is ever imported or unpickled.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trajscope.errors import ObjectiveError

__all__ = ["Objective", "load_objective", "resolve_objective"]


@dataclass(frozen=True)
class Objective:
    """A model skeleton and the loss training minimised.

    Attributes:
        model: a module with the recorded architecture. Its parameters and buffers are swapped for
            recorded ones at analysis time, for every method the loss calls (not only ``forward``).
        loss: ``loss(model, batch) -> scalar tensor``, the minibatch loss f(x; z), mean-reduced or
            not exactly as in training.
    """

    model: torch.nn.Module
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise ObjectiveError(
                f"Objective.model: expected a torch.nn.Module, got {type(self.model).__name__}"
            )
        if not callable(self.loss):
            raise ObjectiveError(f"Objective.loss: expected a callable, got {type(self.loss).__name__}")


def load_objective(spec: str) -> Objective:
    """Import ``"module:function"``, call it and check that it returns an :class:`Objective`."""
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ObjectiveError(f"objective {spec!r}: expected 'module:function'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ObjectiveError(
            f"objective {spec!r}: cannot import module {mod_name!r} ({exc}); run from the "
            "directory that holds it or pass --objective MODULE:FUNCTION"
        ) from exc
    obj: Any = module
    for part in fn_name.split("."):
        if not hasattr(obj, part):
            raise ObjectiveError(f"objective {spec!r}: module {mod_name!r} has no attribute {fn_name!r}")
        obj = getattr(obj, part)
    return _call_factory(obj, spec)


def _call_factory(factory: Any, what: str) -> Objective:
    if isinstance(factory, Objective):
        return factory
    if not callable(factory):
        raise ObjectiveError(f"objective {what}: expected a function returning trajscope.Objective")
    result = factory()
    if not isinstance(result, Objective):
        raise ObjectiveError(
            f"objective {what}: returned {type(result).__name__}, expected trajscope.Objective("
            "model=..., loss=...)"
        )
    return result


def resolve_objective(objective: str | Callable[[], Objective] | Objective | None,
                      recorded: str | None) -> Objective:
    """The objective to analyze with: the explicit one if given, else the run's recorded name."""
    if objective is None:
        if recorded is None:
            raise ObjectiveError(
                "no objective: the run's manifest names none; pass --objective MODULE:FUNCTION "
                "(or objective=... in Python)"
            )
        return load_objective(recorded)
    if isinstance(objective, str):
        return load_objective(objective)
    return _call_factory(objective, getattr(objective, "__qualname__", repr(objective)))
