"""The recorder's hooks and the helpers of its optimizer step pre-hook.

:class:`BoundHook` is what the recorder (and the Hugging Face adapter) registers on the model and
the optimizer instead of a bound method. Training code copies and pickles both: ``copy.deepcopy``
to keep the best model, ``torch.save(model)``, ``AveragedModel`` (EMA/SWA), ``copy.deepcopy`` of
the optimizer. A bound method would drag the recorder (open files, a writer thread) into the copy,
which fails, or worse, give the copy a live hook whose forward passes are captured as if they were
the recorded model's. A :class:`BoundHook` holds its method and its target only by weak reference,
copies and pickles as an :class:`InertHook` (which does nothing), and calls the method only for the
object it was registered on (and the replicas ``DataParallel`` makes of it for each forward pass).

When ``optimizer.step`` is given a closure (LBFGS, PyTorch Lightning), the gradient only exists
once the closure has run inside ``step``; the pre-hook then hands ``step`` a wrapped closure that
captures the snapshot right after the first call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "BoundHook", "InertHook", "attach", "detach", "grad_hooks", "step_closure", "with_capture_after_first_call",
]


class InertHook:
    """What a copied or unpickled :class:`BoundHook` becomes: a hook that does nothing.

    Returning None is a no-op for every hook kind it stands in for (forward pre/post hooks and
    optimizer step pre/post hooks).
    """

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "InertHook()"


class BoundHook:
    """A hook calling ``method(obj, *args)`` only while ``method``'s owner lives and only when ``obj``
    is the object the hook was registered on (``target``) or a ``DataParallel`` replica of it.

    Both are held by weak reference, so the hook neither keeps the recorder alive nor makes the
    model or optimizer it sits on unpicklable; ``copy.copy``, ``copy.deepcopy`` and pickling give an
    :class:`InertHook`, so a copy of the model never calls into the recorder.
    """

    __slots__ = ("_method", "_target")

    def __init__(self, method: Callable[..., Any], target: object) -> None:
        self._method = weakref.WeakMethod(method)
        self._target = weakref.ref(target)

    def __call__(self, obj: object, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # Under torch.compile the model's hooks run inside the traced call: dynamo would trace
            # the recorder's Python (guarding on its step counter, recompiling each step) instead
            # of running it. The call goes outside the graph and runs as plain Python.
            return _outside_graph(self, obj, args, kwargs)
        return self.call(obj, *args, **kwargs)

    def call(self, obj: object, *args: Any, **kwargs: Any) -> Any:
        """Call the method for ``obj`` if ``obj`` is the target and the method's owner lives."""
        method = self._method()
        if method is None or not _is_target(obj, self._target()):
            return None
        return method(obj, *args, **kwargs)

    def __copy__(self) -> InertHook:
        return InertHook()

    def __deepcopy__(self, memo: dict[int, Any]) -> InertHook:
        return InertHook()

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:
        return (InertHook, ())

    def __repr__(self) -> str:
        method = self._method()
        return f"BoundHook({getattr(method, '__qualname__', 'dead')})"


_OWNERS: dict[int, object] = {}
"""Owners whose hooks are attached, by id (owners need not be hashable)."""


def attach(owner: object, handles: list[Any]) -> list[Any]:
    """Keep ``owner`` alive while ``handles`` (its hooks' removable handles) are attached, since its
    :class:`BoundHook` objects hold it only weakly; returns ``handles``."""
    _OWNERS[id(owner)] = owner
    return handles


def detach(owner: object, handles: list[Any]) -> None:
    """Remove ``owner``'s hooks and release the reference :func:`attach` kept."""
    for h in handles:
        h.remove()
    _OWNERS.pop(id(owner), None)


def grad_hooks(method: Callable[[torch.Tensor], None], params: list[torch.nn.Parameter]) -> list[Any]:
    """Register ``method(p)`` as each parameter's post-accumulate-grad hook, as :class:`BoundHook`
    objects (a copied or pickled parameter carries an :class:`InertHook`); the removable handles.

    The hook fires when backward has finished accumulating ``p.grad``: before any clipping or
    unscaling that happens between backward and ``optimizer.step()``.
    """
    return [p.register_post_accumulate_grad_hook(BoundHook(method, p)) for p in params]


def _is_target(obj: object, target: object) -> bool:
    """``obj`` is ``target``, or a ``DataParallel`` replica of it (made for one forward pass)."""
    if obj is target:
        return True
    # A replica shares the module's __dict__ entries, its hook dicts included; a copy never does.
    return (getattr(obj, "_is_replica", False) is True and target is not None
            and getattr(obj, "_forward_pre_hooks", None) is getattr(target, "_forward_pre_hooks", False))


def _call_hook(hook: BoundHook, obj: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return hook.call(obj, *args, **kwargs)


# torch._disable_dynamo imports dynamo only when first called (that is, while compiling), so the
# recorder does not pay dynamo's import in programs that never compile.
_outside_graph: Callable[..., Any] = getattr(torch, "_disable_dynamo", torch.compiler.disable)(_call_hook)


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
