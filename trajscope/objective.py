"""The objective contract: how the analyzer rebuilds f(x; z) from a model skeleton and a batch.

A user writes, in any importable module::

    def make_objective() -> trajscope.Objective:
        model = MyNet()                      # the architecture; its weights are replaced
        def loss(model, batch):              # batch exactly as given to rec.batch(...)
            x, y = batch
            return F.cross_entropy(model(x), y)
        return trajscope.Objective(model=model, loss=loss)

and names it ``"mymodule:make_objective"``. A factory that takes one argument is called with the
opened :class:`~trajscope.store.run.Run` (see :func:`takes_run`), so that it can build the model from the configuration
the run recorded (``run.metadata``, the ``Recorder(..., metadata=...)`` dict)::

    def make_objective(run) -> trajscope.Objective:
        model = MyNet(**run.metadata["config"])
        ...

Only the analyzing user's own environment is imported
(the current directory is put on ``sys.path`` first, as ``python -m`` does); nothing inside a run
directory is ever imported or unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from trajscope.errors import ObjectiveError, TrajscopeError, one_line
from trajscope.store.names import first, mismatches, shapes, strip_prefix, wrapper_prefix
from trajscope.store.user_code import import_named

if TYPE_CHECKING:  # trajscope.store.run imports this module: Run is only named in annotations
    from trajscope.store.run import Run

ObjectiveSource: TypeAlias = "str | Callable[..., Objective] | Objective | None"
"""How an analysis is given its objective: ``"module:function"``, a factory, an :class:`Objective`,
or None for the name the run recorded."""

RunArgument: TypeAlias = "Run | Callable[[], Run] | None"
"""What a factory taking the run is called with: the run, or a function that opens it."""

__all__ = ["Objective", "ObjectiveSource", "load_objective", "resolve_objective", "check_run_objective", "takes_run",
           "objective_digest"]


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


def load_objective(spec: str, run: RunArgument = None) -> Objective:
    """Import ``"module:function"``, call it and check that it returns an :class:`Objective`.

    A factory that takes the run (:func:`takes_run`) is called with ``run`` (a :class:`Run`, or
    a function returning it, called only then).

    The name is resolved by :func:`~trajscope.store.user_code.import_named` (dotted identifiers
    only, never from a run directory).

    Raises:
        ObjectiveError: naming ``spec`` and what went wrong (bad name, import failure, an exception
            raised by the module or the factory, a result that is not an Objective).
    """
    return _call_factory(import_named(spec, "objective"), repr(spec), run)


def takes_run(factory: Any) -> bool:
    """Whether ``factory`` is called with the run: its first positional parameter has no default
    or is named ``run`` (``def make_objective(run)``, ``def make_objective(run=None)``).

    A factory whose parameters all have defaults (``def make_objective(seed=0)``) is called with
    no argument, as is a callable whose signature cannot be read (some builtins).
    """
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    first_positional = next((p for p in params if p.kind in positional), None)
    if first_positional is None:
        return False
    return first_positional.default is inspect.Parameter.empty or first_positional.name == "run"


def _opened(run: RunArgument, what: str) -> Run:
    if run is None:
        raise ObjectiveError(
            f"objective {what}: takes an argument (the run), but no run was given to call it with"
        )
    return run() if callable(run) else run


def _call_factory(factory: Any, what: str, run: RunArgument = None) -> Objective:
    if isinstance(factory, Objective):
        return factory
    if not callable(factory):
        raise ObjectiveError(
            f"objective {what}: is a {type(factory).__name__}, expected a function returning "
            "trajscope.Objective"
        )
    args = (_opened(run, what),) if takes_run(factory) else ()
    try:
        result = factory(*args)
    except TrajscopeError:
        raise
    except (Exception, SystemExit) as exc:  # sys.exit in a factory is a failure, never a silent exit 0
        raise ObjectiveError(
            f"objective {what}: calling it raised {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    if not isinstance(result, Objective):
        raise ObjectiveError(
            f"objective {what}: returned {type(result).__name__}, expected trajscope.Objective("
            "model=..., loss=...)"
        )
    return result


def check_run_objective(objective: Objective, manifest: dict[str, Any]) -> Objective:
    """Check that ``objective``'s model has exactly the run's parameters, with the same shapes,
    and buffers of the recorded shapes.

    ``manifest`` is the run's (validated) manifest. A recorded parameter the model lacks, a model
    parameter the run did not record (it would silently keep its initial value during the replay)
    and a shape mismatch are all errors. Names recorded from a wrapped model (``_orig_mod.NAME``
    of ``torch.compile``, ``module.NAME`` of DDP) match the plain model's names when one prefix,
    stripped from every name, makes them match (:func:`trajscope.store.names.wrapper_prefix`).

    Raises:
        ObjectiveError: naming the first parameter or buffer that differs.
    """
    slots = shapes(dict(objective.model.named_parameters()))
    recorded = {str(q["name"]): tuple(int(d) for d in q["shape"]) for q in manifest["params"]}
    prefix = wrapper_prefix(recorded, slots)
    recorded = {strip_prefix(n, prefix): s for n, s in recorded.items()}
    m = first(mismatches(recorded, slots))
    if m is not None and m.kind == "missing":
        raise ObjectiveError(
            f"parameter {m.name!r} is recorded but the objective's model has no such "
            f"parameter (model has {len(slots)}: {_preview(slots)})"
        )
    if m is not None and m.kind == "shape":
        raise ObjectiveError(
            f"parameter {m.name!r}: recorded shape {m.expected}, objective's model has {m.actual}"
        )
    if m is not None:  # "extra": it would keep its initial value during the replay
        raise ObjectiveError(
            f"parameter {m.name!r} of the objective's model was not recorded in the run "
            f"(run has {len(recorded)}: {_preview(recorded)}); is this the model that was trained?"
        )
    buffers = {strip_prefix(str(q["name"]), prefix): tuple(int(d) for d in q["shape"])
               for q in manifest.get("buffers", [])}
    b = first(mismatches(buffers, shapes(dict(objective.model.named_buffers()))), "shape")
    if b is not None:
        raise ObjectiveError(
            f"buffer {b.name!r}: recorded shape {b.expected}, objective's model has {b.actual}"
        )
    return objective


def _preview(names: dict[str, Any]) -> str:
    shown = ", ".join(one_line(n) for n in list(names)[:5])
    return shown + (", …" if len(names) > 5 else "")


def resolve_objective(objective: ObjectiveSource, recorded: str | None, run: RunArgument = None) -> Objective:
    """The objective to analyze with: the explicit one if given, else the run's recorded name.

    ``run`` is what a factory that takes an argument is called with: the :class:`Run`, or a
    function returning it (a worker process opens the run only for such a factory).
    """
    if objective is None:
        if recorded is None:
            raise ObjectiveError(
                "no objective: the run's manifest names none; pass --objective MODULE:FUNCTION "
                "(or objective=... in Python)"
            )
        return load_objective(recorded, run)
    if isinstance(objective, str):
        return load_objective(objective, run)
    return _call_factory(objective, getattr(objective, "__qualname__", repr(objective)), run)


# --- what the objective computes, as a stable digest -------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _stable(text: str) -> str:
    """``text`` without memory addresses (``<function f at 0x…>``), which differ per process."""
    return _ADDRESS.sub("", text)


def _const(c: object) -> object:
    if isinstance(c, types.CodeType):
        return _code(c)
    if isinstance(c, frozenset):  # its iteration order follows the per-process string hash seed
        return sorted(_stable(repr(x)) for x in c)
    return _stable(repr(c))


def _code(code: types.CodeType) -> list[object]:
    return [code.co_qualname, code.co_code.hex(), [_const(c) for c in code.co_consts], list(code.co_names)]


def _callable(fn: Any) -> object:
    """What ``fn`` computes, as far as its code says: qualified name, bytecode, constants and the
    global names it reads (a changed global's value is caught by the replay check instead)."""
    if isinstance(fn, functools.partial):
        return ["partial", _callable(fn.func), _stable(repr(fn.args)), _stable(repr(sorted(fn.keywords.items())))]
    fn = getattr(fn, "__func__", fn)  # a bound method: its function
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        return _code(code)
    inner = getattr(type(fn).__call__, "__code__", None)  # a callable object: its class and its __call__
    return [type(fn).__qualname__, _code(inner) if isinstance(inner, types.CodeType) else _stable(repr(fn))]


def objective_digest(objective: Objective) -> str:
    """sha256 (16 hex digits) of what ``objective`` computes, not of its name: the model's module
    tree (class, its ``forward`` code, parameter and buffer names, shapes and dtypes), the model's
    ``repr`` (activations, hyperparameters) and the loss function's code. Stable across processes:
    no ids or memory addresses enter it. Parameter values do not: the run supplies them."""
    modules = []
    for name, m in objective.model.named_modules():
        forward = getattr(type(m), "forward", None)
        modules.append([name, f"{type(m).__module__}.{type(m).__qualname__}",
                        _callable(forward) if forward is not None else None])
    tensors = [[kind, n, list(t.shape), str(t.dtype)]
               for kind, named in (("param", objective.model.named_parameters()),
                                   ("buffer", objective.model.named_buffers()))
               for n, t in named]
    blob = repr([modules, tensors, _stable(repr(objective.model)), _callable(objective.loss)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
