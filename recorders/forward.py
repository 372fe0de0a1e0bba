"""How a recorded step's forward passes ran: the state the analyzer needs to evaluate the loss as
training did.

For each micro-batch's forward pass the recorder keeps:

* the RNG states (CPU, and each initialised CUDA device) as the pass began: what dropout drew its
  masks from. Every micro-batch has its own, so a loop that draws from the global RNG between
  micro-batches (nanoGPT's ``get_batch``) still replays each micro-batch's masks;
* for the step's first micro-batch, every buffer (BatchNorm's running statistics) as it was then;
* the autocast in force, per device type (:func:`autocast_state`): its dtype and whether its weight
  cache was on. A forward decorated with ``torch.autocast`` (accelerate's and the Hugging Face
  ``Trainer``'s mixed precision replace ``model.forward`` with one) enters autocast only after the
  model's forward pre-hook ran, so the decorator is read from the forward itself.

The memory format of a recorded tensor (:func:`memory_format`) is read when the snapshot is taken.
Nothing here modifies the model, the RNG or autocast: every read is a copy or a query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trajscope import runformat as fmt
from trajscope.recorders.sharded import clean_name
from trajscope.recorders.storage import dtype_name

__all__ = [
    "ForwardState", "StepCapture", "autocast_state", "capture_forward", "cpu_copy", "memory_format", "memory_formats",
]

Entries = list[tuple[str, torch.Tensor]]

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")
"""Device types whose autocast state a forward pass records."""


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous CPU copy of ``t``."""
    # copy=True guarantees a fresh tensor even on CPU: the optimizer updates x and g in place next.
    return t.detach().to("cpu", copy=True).contiguous()


def memory_format(t: torch.Tensor) -> str | None:
    """``"channels_last"`` or ``"channels_last_3d"`` when ``t`` is laid out so (and not also plain
    contiguous, as a tensor with unit dimensions can be), else None. Snapshots store every tensor
    contiguous; the analyzer restores this layout, since kernels (convolutions, BatchNorm) round
    differently in each."""
    if t.layout != torch.strided or t.is_contiguous():
        return None
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return None


def _describe(ac: torch.autocast) -> dict[str, dict[str, Any]]:
    """A ``torch.autocast`` instance as the snapshot's ``autocast`` entry (empty when disabled)."""
    if not getattr(ac, "_enabled", False):
        return {}
    return {str(ac.device): {"dtype": dtype_name(ac.fast_dtype), "cache": bool(getattr(ac, "_cache_enabled", True))}}


def _decorating_autocast(fn: Any, depth: int = 0) -> torch.autocast | None:
    """The ``torch.autocast`` instance that decorates ``fn`` (through ``functools.wraps`` chains,
    closures and callable wrapper objects, a few levels deep), or None."""
    if depth > 6 or fn is None:
        return None
    if isinstance(fn, torch.autocast):
        return fn
    inner: list[Any] = [getattr(fn, "__func__", None), getattr(fn, "__wrapped__", None)]
    inner += [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if _filled(c)]
    if not callable(fn) or isinstance(fn, type):
        return None
    if not hasattr(fn, "__code__") and hasattr(fn, "__dict__"):  # a callable wrapper object
        inner += [v for v in vars(fn).values() if callable(v) or isinstance(v, torch.autocast)]
    for obj in inner:
        if obj is not None and obj is not fn:
            found = _decorating_autocast(obj, depth + 1)
            if found is not None:
                return found
    return None


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def autocast_state(module: torch.nn.Module | None = None,
                   given: torch.autocast | None = None) -> dict[str, dict[str, Any]]:
    """The autocast a forward pass starting now runs under, per device type:
    ``{device_type: {"dtype": "bfloat16", "cache": bool}}``, empty without autocast.

    Read from the autocast in force; else from ``given`` (an adapter's knowledge of the framework's
    autocast, e.g. Lightning's precision plugin); else from a ``torch.autocast`` decorating
    ``module.forward`` (accelerate's ``prepare``)."""
    out: dict[str, dict[str, Any]] = {}
    for dev in AUTOCAST_DEVICES:
        if torch.is_autocast_enabled(dev):
            out[dev] = {"dtype": dtype_name(torch.get_autocast_dtype(dev)), "cache": torch.is_autocast_cache_enabled()}
    if out:
        return out
    if given is not None:
        return _describe(given)
    found = _decorating_autocast(getattr(module, "forward", None)) if module is not None else None
    return _describe(found) if found is not None else {}


@dataclass
class ForwardState:
    """The state a forward pass began with: what its dropout masks and running statistics used.

    Attributes:
        tensors: ``rng/cpu`` (and ``rng/cuda<i>`` for each initialised CUDA device) and, for a
            step's first micro-batch, a copy of every buffer as ``buffer/<name>``, keyed as in
            the snapshot.
        training: the module's ``training`` flag at that moment.
        autocast: the autocast in force (:func:`autocast_state`).
    """

    tensors: dict[str, torch.Tensor]
    training: bool
    autocast: dict[str, dict[str, Any]] = field(default_factory=dict)

    def rng(self) -> dict[str, torch.Tensor]:
        """The RNG states, keyed by device (``cpu``, ``cuda<i>``)."""
        return {k.removeprefix(fmt.RNG): t for k, t in self.tensors.items() if k.startswith(fmt.RNG)}


def capture_forward(module: torch.nn.Module, *, buffers: bool = True,
                    autocast: torch.autocast | None = None) -> ForwardState:
    """Copy the RNG states, and ``module``'s buffers when ``buffers``, now (nothing is modified)."""
    tensors = {fmt.RNG + "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            tensors[f"{fmt.RNG}cuda{i}"] = torch.cuda.get_rng_state(i)
    if buffers:
        for name, b in module.named_buffers():
            tensors[fmt.BUFFER + clean_name(name)] = cpu_copy(b)
    return ForwardState(tensors, module.training, autocast_state(module, autocast))


@dataclass
class StepCapture:
    """The forward states held for the optimizer step being recorded.

    Attributes:
        pending: captured at the first training forward pass since the last ``rec.batch(...)``;
            it belongs to the micro-batch that the next ``rec.batch`` names.
        of_step: the forward state of the step's first micro-batch, adopted from ``pending`` by
            the step's first ``rec.batch``: the state the snapshot stores.
        later: the RNG states of the step's later micro-batches, by micro-batch index (1, 2, …),
            for those whose forward pass was seen.
    """

    pending: ForwardState | None = None
    of_step: ForwardState | None = None
    later: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def on_batch(self, index: int) -> None:
        """``rec.batch`` named the step's micro-batch ``index``: the pending state is now its."""
        if index == 0:
            self.of_step = self.pending
            self.later = {}
        elif self.pending is not None:
            self.later[index] = self.pending.rng()
        self.pending = None

    def micro_rng(self, count: int) -> list[dict[str, torch.Tensor] | None]:
        """The RNG states of the step's ``count`` micro-batches, in order (None: forward not seen)."""
        first = self.of_step.rng() if self.of_step is not None else None
        return [first, *(self.later.get(i) for i in range(1, count))]

    def adopt_gathered(self, rngs: list[dict[str, torch.Tensor] | None]) -> None:
        """Take the RNG states of the global batch's micro-batches (every rank's, in the order the
        snapshot stores them) as those of micro-batches 1, 2, …; micro-batch 0 is this rank's own."""
        self.later = {i: rng for i, rng in enumerate(rngs) if i >= 1 and rng is not None}

    def for_snapshot(self) -> ForwardState | None:
        """The state to store with the step: the step's own, else one captured since its batch."""
        return self.of_step if self.of_step is not None else self.pending

    def entries(self, model: torch.nn.Module, meta: dict[str, Any]) -> Entries:
        """The snapshot's forward-state entries (``rng/micro<i>/<device>`` for a later micro-batch
        i); sets ``meta["training"]``, ``meta["captured_at"]`` (``forward``, or ``step`` when no
        forward pass was seen) and, under autocast, ``meta["autocast"]``."""
        forward = self.for_snapshot()
        meta["training"] = forward.training if forward is not None else model.training
        meta["captured_at"] = "forward" if forward is not None else "step"
        if forward is None:
            return []
        if forward.autocast:
            meta["autocast"] = forward.autocast
        out = list(forward.tensors.items())
        if forward is self.of_step:
            out += [(f"{fmt.RNG}micro{i}/{dev}", t) for i, rng in sorted(self.later.items()) for dev, t in rng.items()]
        return out

    def clear(self) -> None:
        """The step was taken: nothing captured so far belongs to the next one."""
        self.pending = self.of_step = None
        self.later = {}


def memory_formats(tensors: Entries) -> dict[str, str]:
    """The snapshot's ``memory_formats`` entry: each key whose tensor is not laid out contiguous."""
    return {k: f for k, t in tensors if (f := memory_format(t)) is not None}

