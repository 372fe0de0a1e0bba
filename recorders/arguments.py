"""Checks of the :class:`~trajscope.recorders.Recorder`'s arguments, each failing with one clear message,
and what the Recorder learns from them before training: the torch optimizer inside a framework's
optimizer wrapper (:func:`unwrap_optimizer`), the wrapper's ``GradScaler`` (:func:`wrapped_grad_scaler`)
and whether inductor would draw dropout masks the analysis cannot replay (:func:`compiled_dropout_warning`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch

from trajscope import runformat as fmt
from trajscope.errors import RecorderError, RunFormatError

__all__ = ["check_arguments", "compiled_dropout_warning", "encode_indented", "inductor_compiled", "json_metadata",
           "nested_deeper", "unwrap_optimizer", "wrapped_grad_scaler"]


def check_arguments(model: Any, optimizer: Any, storage: str, accumulation: Any, accumulation_reduction: str,
                    on_error: str, max_pending: Any, grads: Any = True) -> torch.optim.Optimizer:
    """Raise :class:`RecorderError` naming the first argument of :class:`Recorder` that is invalid.

    Returns the optimizer to hook: ``optimizer`` itself, or the torch optimizer a framework's
    wrapper holds (:func:`unwrap_optimizer`).
    """
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
    _check_tensors(model)
    hooked = unwrap_optimizer(optimizer)
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
    return hooked


def _check_tensors(model: torch.nn.Module) -> None:
    """Refuse a parameter or buffer the recorder cannot store or a reader would refuse: one on the
    meta device (a shape without data: copying it fails), or a name a reader does not accept
    (:func:`trajscope.runformat.check_name`: at most :data:`~trajscope.runformat.MAX_NAME_CHARS`
    printable characters)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_meta:
                raise RecorderError(
                    f"model: {kind} {name!r} is on the meta device (a shape without data), which cannot "
                    "be recorded; materialise the model first (model.to_empty(device=...) and initialise it)"
                )
            try:
                fmt.check_name(name, f"model: {kind} name")
            except RunFormatError as exc:
                raise RecorderError(f"{exc}, which a reader of the run refuses") from None


_MAX_WRAPPERS = 8
"""How deep :func:`unwrap_optimizer` looks through nested optimizer wrappers (real ones nest one or two)."""


def _wrappers(optimizer: Any) -> list[Any]:
    """``optimizer`` and each optimizer it wraps, outermost first: Lightning's
    ``LightningOptimizer._optimizer``, accelerate's ``AcceleratedOptimizer.optimizer`` and any other
    wrapper's ``.optimizer``, as long as that is a ``torch.optim.Optimizer``."""
    chain = [optimizer]
    while len(chain) <= _MAX_WRAPPERS:
        current = chain[-1]
        inner = next((getattr(current, attr) for attr in ("_optimizer", "optimizer")
                      if isinstance(getattr(current, attr, None), torch.optim.Optimizer)), None)
        if inner is None or any(inner is seen for seen in chain):
            break
        chain.append(inner)
    return chain


def _hookable(optimizer: Any) -> bool:
    """Whether ``optimizer`` has torch's step hooks: a ``torch.optim.Optimizer`` whose ``__init__`` ran.

    Wrappers such as accelerate's ``AcceleratedOptimizer`` subclass ``torch.optim.Optimizer`` without
    calling its ``__init__``: ``register_step_pre_hook`` exists but fails on the missing hook dicts.
    """
    return (isinstance(optimizer, torch.optim.Optimizer)
            and hasattr(optimizer, "_optimizer_step_pre_hooks")
            and hasattr(optimizer, "_optimizer_step_post_hooks"))


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer whose step hooks the recorder registers: the innermost optimizer under any
    nesting of framework wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, any object holding the real one as ``.optimizer``), or ``optimizer`` itself.

    The hooks go on the innermost optimizer because its ``step`` is the one that moves the
    parameters: a wrapper's ``step`` may not call it (accelerate calls it only on the steps that end
    a gradient accumulation, a GradScaler not on steps with inf/NaN gradients), and the recorder's
    step counter must advance with the real updates only.

    Raises:
        RecorderError: neither ``optimizer`` nor anything it wraps has torch's step hooks.
    """
    chain = _wrappers(optimizer)
    found = chain[-1]
    if _hookable(found):
        return cast(torch.optim.Optimizer, found)
    name = type(optimizer).__name__
    if found is not optimizer:
        inner = type(found).__name__
        raise RecorderError(
            f"optimizer: {name} wraps a {inner}, which has no optimizer step hooks; pass the "
            f"torch.optim.Optimizer that {inner} wraps"
        )
    if isinstance(optimizer, torch.optim.Optimizer):
        raise RecorderError(
            f"optimizer: {name} has no optimizer step hooks; pass the torch.optim.Optimizer it wraps"
        )
    raise RecorderError(f"optimizer: expected a torch.optim.Optimizer, got {name}")


def wrapped_grad_scaler(optimizer: Any) -> Any:
    """The AMP ``GradScaler`` a framework's optimizer wrapper steps with, or None.

    accelerate's ``AcceleratedOptimizer`` holds the ``Accelerator``'s scaler as ``.scaler`` (None
    without fp16): the scaler whose scale the gradients carry until it unscales them before clipping.
    Only the wrappers around the torch optimizer are asked, never the optimizer itself.
    """
    for wrapper in _wrappers(optimizer)[:-1]:
        scaler = getattr(wrapper, "scaler", None)
        if scaler is not None:
            return scaler
    return None


def compiled_dropout_warning(model: torch.nn.Module) -> str | None:
    """A one-line warning when ``model`` (as the user passed it) is compiled by inductor and has
    dropout that inductor draws from its own generator; None otherwise.

    Inductor generates its own random-number code for dropout (``nn.Dropout``, ``F.dropout``, the
    ``dropout_p`` of ``scaled_dot_product_attention``) unless ``torch._inductor.config.fallback_random``
    is True. Its masks then do not come from torch's generator, whose state the recorder captures, so
    the eager replay of the analysis cannot reproduce them and the replay-error metrics fail.

    Dropout is recognised as an ``nn.Dropout`` family module with ``p > 0`` or a module with a float
    ``dropout`` or ``dropout_p`` attribute above 0 (how attention modules that call SDPA keep it).
    A model compiled with another backend (``"eager"``, ``"aot_eager"``) draws from torch's generator
    and gets no warning. Nothing of dynamo or inductor is imported here (importing them is slow): a
    compiled model means dynamo is loaded, and inductor's global config is read only when it is
    loaded (its default, False, otherwise).
    """
    for name, root, config in _compiled_parts(model):
        if _fallback_random(config):
            continue
        found = _dropout(root)
        if found is None:
            continue
        where = ".".join(n for n in (name, found[0]) if n) or type(root).__name__
        return (
            f"model: compiled with torch.compile (inductor) and has dropout (module {where!r}, p={found[1]:g}); "
            "inductor draws its dropout masks from its own generator, which the analysis cannot "
            "replay: set torch._inductor.config.fallback_random = True before the first compiled call"
        )
    return None


def inductor_compiled(model: torch.nn.Module) -> bool:
    """Whether some part of ``model`` (as the user passed it) is compiled by inductor, whose fused
    kernels round differently from an eager replay under autocast (the manifest's ``compiled``)."""
    return bool(_compiled_parts(model))


def compiled_module_type() -> type | None:
    """``torch.compile``'s ``OptimizedModule`` class, if dynamo is loaded (a compiled model implies it).

    Looked up in ``sys.modules`` rather than imported: importing ``torch._dynamo`` is slow, and a
    process that never compiled cannot hold an ``OptimizedModule``.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def _compiled_parts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, Any]]:
    """Each compiled part of ``model``: (its name in ``model``, the module compiled, its compiler
    configuration or None for a backend other than inductor).

    A part is a ``torch.compile`` wrapper (``OptimizedModule``,
    :func:`compiled_module_type`) or a module compiled in place with
    ``nn.Module.compile()``.
    """
    optimized = compiled_module_type()
    if optimized is None:
        return []  # nothing was compiled in this process
    parts: list[tuple[str, torch.nn.Module, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, optimized):
            compiled: Any = module
            root = cast(torch.nn.Module, compiled._orig_mod)
        elif getattr(module, "_compiled_call_impl", None) is not None:
            compiled, root = module._compiled_call_impl, module
        else:
            continue
        get_config = getattr(compiled, "get_compiler_config", None)
        config = get_config() if callable(get_config) else {}
        if config is not None:
            parts.append((name, root, config))
    return parts


def _fallback_random(config: Any) -> bool:
    """Whether inductor uses torch's generator: ``fallback_random`` set for this compile
    (``torch.compile(options=...)`` or the global setting when it was compiled) or set globally now."""
    if isinstance(config, Mapping) and config.get("fallback_random") is True:
        return True
    inductor = sys.modules.get("torch._inductor.config")
    return bool(getattr(inductor, "fallback_random", False))


_DROPOUT_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def _dropout(model: torch.nn.Module) -> tuple[str, float] | None:
    """The first module of ``model`` with dropout probability above 0, as (name, p), or None."""
    for name, module in model.named_modules():
        if isinstance(module, _DROPOUT_TYPES):
            p: Any = module.p
        else:
            p = next((v for v in (getattr(module, a, None) for a in ("dropout", "dropout_p"))
                      if isinstance(v, float)), None)
        if isinstance(p, float) and p > 0:
            return name, p
    return None


def json_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of the user's ``metadata``, checked to be JSON-serialisable and within the limits every
    reader of the manifest accepts: nested at most :data:`~trajscope.runformat.MAX_METADATA_DEPTH`
    levels of lists and objects (the metadata object itself is one), and at most
    :data:`~trajscope.runformat.MAX_MANIFEST_BYTES` as the manifest writes it (indented, so a long
    list costs several bytes an element more than its compact JSON).

    Raises:
        RecorderError: naming ``metadata`` and the limit it exceeds, or why it is not JSON.
    """
    out = dict(metadata or {})
    deep = (f"metadata: nested deeper than {fmt.MAX_METADATA_DEPTH} levels of lists and objects, which "
            "every reader parses; flatten it")
    try:
        size = len(json.dumps(out))
    except RecursionError:  # deeper than the encoder recurses: far past the limit
        raise RecorderError(deep) from None
    except (TypeError, ValueError) as exc:
        raise RecorderError(f"metadata: must be JSON-serialisable ({exc})") from exc
    # The compact size first, then the depth, then the indented size: each check is cheap only
    # when the one before it passed (the indented JSON is built by Python's slower encoder).
    if size <= fmt.MAX_MANIFEST_BYTES:
        if nested_deeper(out, fmt.MAX_METADATA_DEPTH):  # a leaf under more levels than the limit
            raise RecorderError(deep)
        size = len(encode_indented({"metadata": out}))
    if size > fmt.MAX_MANIFEST_BYTES:
        raise RecorderError(
            f"metadata: {size} bytes as written in {fmt.MANIFEST}, more than the {fmt.MAX_MANIFEST_BYTES} "
            "bytes a reader accepts; store large data in a file of its own and name it in the metadata"
        )
    return out


def encode_indented(value: Any) -> bytes:
    """``value`` as JSON the way the manifest is written (indented, sorted keys, NaN allowed)."""
    return json.dumps(value, indent=2, sort_keys=True, allow_nan=True).encode()


def nested_deeper(value: Any, limit: int) -> bool:
    """Whether some node of ``value`` (a nesting of dicts, lists and tuples) lies more than ``limit``
    containers deep: ``value`` itself is at depth 0, the items of a list it is at depth 1.

    Level by level, without recursion (a value nested far deeper than the interpreter recurses is
    answered too), and it stops at the first level past ``limit``. This is how a reader counts the
    depth of a stored batch tree (:func:`trajscope.runformat.unflatten_batch`).
    """
    level = [value]
    for _ in range(limit):
        level = [c for node in level for c in _children(node)]
        if not level:
            return False
    return any(any(True for _ in _children(node)) for node in level)


def _children(node: Any) -> Iterable[Any]:
    if isinstance(node, dict):
        return node.values()
    if isinstance(node, (list, tuple)):
        return node
    return ()
