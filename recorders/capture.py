"""What the recorder copies: the parameters it names and the entries of a step's snapshot.

A recorded step's snapshot holds x_t, g_t (with ``Recorder(grads=False)``, only the names of the
parameters that had a gradient) and the minibatch z_t, and, when the model's forward pass was seen,
how each micro-batch's forward pass ran (:mod:`trajscope.recorders.forward`: RNG states, buffers,
autocast), and the memory format of every tensor not stored in its training layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from trajscope import runformat as fmt
from trajscope.errors import RecorderError
from trajscope.recorders.arguments import compiled_module_type, nested_deeper
from trajscope.recorders.forward import StepCapture, memory_formats
from trajscope.recorders.sharded import Sharding, clean_name
from trajscope.recorders.storage import dtype_name

if TYPE_CHECKING:
    from trajscope.recorders.schedule import Schedule

__all__ = [
    "Recording",
    "jsonable",
    "ParamIndex",
    "as_float",
    "unwrap_model",
    "gradient_entries",
    "batch_entries",
    "micro_entry",
    "stored_as_list",
    "micro_weights",
    "step_micro_batches",
    "with_buffers",
    "named_buffers",
    "optimizer_state_entries",
    "step_entries",
    "snapshot_entries",
]


class Recording(Protocol):
    """What the snapshot entries (:func:`step_entries`) and the manifest
    (:func:`trajscope.recorders.manifest.build_manifest`) read of a
    :class:`~trajscope.recorders.Recorder`: its settings and where it stands."""

    @property
    def model(self) -> torch.nn.Module: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def format(self) -> str: ...
    @property
    def objective(self) -> str | None: ...
    @property
    def schedule(self) -> Schedule: ...
    @property
    def accumulation(self) -> int: ...
    @property
    def accumulation_reduction(self) -> str: ...
    @property
    def batch_fn(self) -> str | None: ...
    @property
    def optimizer_state(self) -> bool: ...
    @property
    def grads(self) -> bool: ...
    @property
    def grad_scaler(self) -> Any: ...
    @property
    def world_size(self) -> int: ...
    @property
    def sharding(self) -> Sharding | None: ...
    @property
    def compiled(self) -> bool: ...
    @property
    def step(self) -> int: ...
    @property
    def metadata(self) -> dict[str, Any]: ...
    @property
    def created(self) -> str: ...


def jsonable(value: Any) -> Any:
    """Optimizer hyperparameters and state as JSON (tensors to numbers, tuples to lists, rest as repr)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)

Entries = list[tuple[str, torch.Tensor]]
"""Snapshot entries: (tensor key, tensor) in the order they are stored."""


def as_float(loss: Any) -> float | None:
    """A loss as a Python float (None stays None)."""
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().item())  # full precision: a float64 loss stays exact
    return float(loss)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names the analyzer's objective uses: the plain model under any
    nesting of ``torch.compile`` (``OptimizedModule._orig_mod``), DDP and DataParallel (``.module``).

    FSDP is not unwrapped: its wrapped module holds flattened, sharded parameters whose names and
    shapes are not the plain model's, so unwrapping would not make them analyzable.
    """
    wrappers: tuple[type, ...] = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    compiled = compiled_module_type()
    while True:
        if compiled is not None and isinstance(model, compiled):
            model = cast(torch.nn.Module, model._orig_mod)
        elif isinstance(model, wrappers):
            model = cast(torch.nn.Module, model.module)
        else:
            return model


@dataclass
class ParamIndex:
    """The model's parameters by ``named_parameters`` name, as the optimizer groups them.

    The trainable set may change during training (a layer unfrozen with ``requires_grad_(True)``, a
    group added with ``optimizer.add_param_group``, a parameter frozen): :meth:`refresh` follows it.
    So it does a parameter the model replaced (``model.fc.weight = nn.Parameter(...)``), or refuses
    it when the optimizer still trains the tensor it replaced (:meth:`follow_replaced`).

    Attributes:
        params: every parameter of the model, recorded at every snapshot.
        trainable: the parameters some optimizer group holds and that require grad or hold a
            gradient (the optimizer updates a parameter with a ``.grad`` whatever its
            ``requires_grad``), each once, as of the last :meth:`refresh`: those whose gradient a
            step's snapshot stores (or names, with ``grads=False``).
        group_names: the parameter names of each optimizer param group, in group order.
        initial: the names in ``trainable`` when the index was built: the manifest's ``trainable``
            flags. A step whose set differs records its own (:meth:`step_trainable`).
        model: the model whose ``named_parameters`` :meth:`follow_replaced` compares with ``params``.
    """

    params: list[tuple[str, torch.nn.Parameter]]
    trainable: list[tuple[str, torch.nn.Parameter]]
    group_names: list[list[str]]
    initial: frozenset[str] = frozenset()
    model: torch.nn.Module | None = None

    @classmethod
    def of(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> ParamIndex:
        """Index ``model``'s parameters; every tensor the optimizer updates must be one of them."""
        index = cls([(clean_name(n), p) for n, p in model.named_parameters()], [], [], model=model)
        index.refresh(optimizer)
        index.initial = frozenset(n for n, _ in index.trainable)
        return index

    def refresh(self, optimizer: torch.optim.Optimizer, step: int | None = None) -> bool:
        """Follow replaced parameters (:meth:`follow_replaced`) and read the trainable set and the
        groups from ``optimizer``; True when any of them changed.

        One pass over the model's and the optimizer's parameters (a dict lookup each): cheap enough
        for every recorded step. ``step`` names the step in the error.

        Raises:
            RecorderError: a group holds a tensor that is not a parameter of the model, or a
                parameter was replaced in a way that cannot be recorded (:meth:`follow_replaced`).
        """
        replaced = self.follow_replaced(optimizer, step)
        names = {id(p): n for n, p in self.params}
        trainable: list[tuple[str, torch.nn.Parameter]] = []
        group_names: list[list[str]] = []
        seen: set[int] = set()
        for gi, group in enumerate(optimizer.param_groups):
            gnames = []
            for p in group["params"]:
                if id(p) not in names:
                    raise RecorderError(
                        f"{'' if step is None else f'step {step}: '}optimizer param group {gi} holds a "
                        f"tensor of shape {tuple(p.shape)} that is not a parameter of the model; the "
                        "recorder names tensors by model.named_parameters()"
                    )
                gnames.append(names[id(p)])
                if (p.requires_grad or p.grad is not None) and id(p) not in seen:
                    seen.add(id(p))
                    trainable.append((names[id(p)], p))
            group_names.append(gnames)
        changed = [n for n, _ in trainable] != [n for n, _ in self.trainable] or group_names != self.group_names
        self.trainable, self.group_names = trainable, group_names
        return changed or replaced

    def follow_replaced(self, optimizer: torch.optim.Optimizer, step: int | None = None) -> bool:
        """Index the tensor the model holds under each recorded name whose tensor was replaced
        (``model.fc.weight = nn.Parameter(...)``); True when one was.

        A replaced parameter is recorded from then on when the optimizer trains the new tensor (it
        was put into ``optimizer.param_groups`` too) or neither (a frozen parameter). When the
        optimizer still holds the tensor it replaced, the new parameter is not being trained, while
        x_t would silently keep recording the old one: that is refused, as is a new tensor of
        another shape or dtype (the run's coordinates x_t keep theirs).

        Raises:
            RecorderError: naming the step and the parameter.
        """
        if self.model is None:
            return False
        current = {clean_name(n): p for n, p in self.model.named_parameters(remove_duplicate=False)}  # a name
        # tied to another tensor too
        changed = [(i, n, p) for i, (n, p) in enumerate(self.params) if current.get(n) is not p]
        if not changed:
            return False
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        at = "" if step is None else f"step {step}: "
        for i, name, old in changed:
            new = current.get(name)
            if new is None:
                raise RecorderError(f"{at}parameter {name!r} is not a parameter of the model any more; the "
                                    "recorder records the parameters the model had when recording started")
            if id(old) in held:
                raise RecorderError(
                    f"{at}parameter {name!r} of the model is a new tensor, but the optimizer still updates "
                    "the one it replaced: the new parameter is not being trained. Give the optimizer the "
                    "new parameter (replace the old one in optimizer.param_groups, or create the optimizer "
                    "after the model), or change the parameter in place (with torch.no_grad(): "
                    "param.copy_(new))"
                )
            if new.shape != old.shape or new.dtype != old.dtype:
                raise RecorderError(
                    f"{at}parameter {name!r} of the model is a new tensor of shape {tuple(new.shape)} "
                    f"{dtype_name(new.dtype)}; it was recorded as {tuple(old.shape)} {dtype_name(old.dtype)}, "
                    "and a run's parameters keep their shape and dtype"
                )
            self.params[i] = (name, new)
        return True

    def step_trainable(self) -> list[str] | None:
        """The trainable names in ``params`` order when they differ from :attr:`initial` (a snapshot's
        ``trainable`` metadata), else None."""
        now = {n for n, _ in self.trainable}
        return None if now == self.initial else [n for n, _ in self.params if n in now]

    def declared(self, model: torch.nn.Module, grads: bool = True) -> list[tuple[str, str, tuple[int, ...]]]:
        """Tensors with a fixed shape for the whole run, as (key, dtype, shape): an HDF5 dataset each.

        Gradients are declared for the parameters trainable now; a gradient that appears later (a
        parameter unfrozen during training) is stored in the HDF5 blob. ``grads=False`` (a run that
        stores no gradients) declares no ``grad/`` tensor."""
        out = [(fmt.PARAM + n, dtype_name(p.dtype), tuple(p.shape)) for n, p in self.params]  # HDF5: whole
        if grads:
            out += [(fmt.GRAD + n, dtype_name(p.dtype), tuple(p.shape)) for n, p in self.trainable]
        out += [(fmt.BUFFER + n, dtype_name(b.dtype), tuple(b.shape)) for n, b in named_buffers(model)]
        return out


def gradient_entries(trainable: list[tuple[str, torch.nn.Parameter]], step: int, meta: dict[str, Any], *,
                     store: bool = True) -> Entries:
    """``grad/<name>`` of every trainable parameter that has a gradient (dense only).

    With ``store=False`` (``Recorder(grads=False)``) no tensor is copied: ``meta["grad_names"]``
    lists those parameters instead, in ``trainable`` order (the analyzer's coordinates of x,
    whose g_t it recomputes).
    """
    if not store:
        meta["grad_names"] = [name for name, p in trainable if p.grad is not None]
        return []
    out: Entries = []
    for name, p in trainable:
        if p.grad is not None:
            if p.grad.layout != torch.strided:
                raise RecorderError(f"step {step}: gradient of {name!r} is sparse; not supported")
            out.append((fmt.GRAD + name, p.grad))
    return out


def with_buffers(tensors: Entries, model: torch.nn.Module) -> Entries:
    """``tensors`` and ``buffer/<name>`` of every buffer of ``model`` not among them: buffers not
    captured at the forward pass are stored as they are now."""
    keys = {k for k, _ in tensors}
    return tensors + [(fmt.BUFFER + n, b) for n, b in named_buffers(model) if fmt.BUFFER + n not in keys]


def named_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``model``'s buffers by the plain model's names (:func:`~trajscope.recorders.sharded.clean_name`)."""
    return [(clean_name(n), b) for n, b in model.named_buffers()]


def micro_entry(rec: Recording, batch: Any, loss: torch.Tensor | float | None, weight: float | None) -> dict[str, Any]:
    """One micro-batch named by ``rec.batch`` for step ``rec.step``, as the recorder holds it until
    the step is taken.

    With ``rec.batch_fn`` the batch is the sample indices, as an int64 tensor. Only a recorded step
    holds a reference to the batch (it is copied at the step), and only there is its nesting checked
    against the readers' :data:`~trajscope.runformat.MAX_BATCH_DEPTH`: a stored tree nested deeper
    is refused here rather than recorded into every snapshot and refused by every reader.

    Raises:
        RecorderError: ``weight`` is not a finite number, the indices are not a sequence of ints, or
            the batch is nested deeper than a reader accepts.
    """
    step = rec.step
    if weight is not None and not (isinstance(weight, (int, float)) and math.isfinite(weight)):
        raise RecorderError(f"step {step}: weight={weight!r}: expected a finite number")
    if rec.batch_fn is not None and not isinstance(batch, torch.Tensor):
        try:
            batch = torch.as_tensor(batch, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise RecorderError(
                f"step {step}: with batch_fn, rec.batch() takes the sample indices "
                f"(a sequence of ints), got {type(batch).__name__}"
            ) from exc
    keep = rec.schedule(step)
    if keep:
        # A step of several micro-batches stores their list: one level of the readers' depth.
        listed = stored_as_list(rec, [1.0 if weight is None else float(weight)])
        limit = fmt.MAX_BATCH_DEPTH - int(listed)
        if nested_deeper(batch, limit):
            raise RecorderError(
                f"step {step}: rec.batch(): the batch is nested deeper than {limit} levels of tuples, lists "
                f"and dicts{' (one level is the list of micro-batches)' if listed else ''}, more than a "
                "reader accepts; flatten it"
            )
    return {"batch": batch if keep else None, "loss": loss, "weight": weight}


def stored_as_list(rec: Recording, weights: list[float]) -> bool:
    """Whether a step's snapshot stores its minibatch as the list of its micro-batches: whenever
    there may be several (gradient accumulation, data-parallel ranks) or a weight is not 1."""
    return rec.accumulation > 1 or rec.world_size > 1 or any(w != 1.0 for w in weights)


def micro_weights(micro: list[dict[str, Any]], reduction: str) -> list[float]:
    """Each micro-batch's weight w_i in the step's loss f = Σ w_i · f_i: its own ``weight``, else
    1/m over the m micro-batches (``reduction="mean"``) or 1 (``"sum"``)."""
    default = 1.0 / len(micro) if reduction == "mean" else 1.0
    return [float(mb["weight"]) if mb["weight"] is not None else default for mb in micro]


def step_micro_batches(micro: list[dict[str, Any]], reduction: str) -> list[dict[str, Any]]:
    """The micro-batches named for a step as its snapshot takes them: ``batch``, ``weight`` w_i
    (:func:`micro_weights`) and ``loss`` as a float (None when not given)."""
    weights = micro_weights(micro, reduction)
    return [{"batch": mb["batch"], "weight": w, "loss": as_float(mb["loss"])} for mb, w in zip(micro, weights)]


def batch_entries(micro: list[dict[str, Any]], as_micro: bool, meta: dict[str, Any]) -> Entries:
    """``batch/<i>`` leaves of the step's minibatch (the list of micro-batches when ``as_micro``).

    Sets ``meta["batch_tree"]``, ``meta["loss"]`` (f = Σ w_i · f_i over the micro-batches, None
    when a loss is missing) and, when ``as_micro``, ``meta["micro_batches"]``.
    """
    batch = [mb["batch"] for mb in micro] if as_micro else micro[0]["batch"]
    tree, leaves = fmt.flatten_batch(batch)
    meta["batch_tree"] = tree
    losses = [mb["loss"] for mb in micro]
    meta["loss"] = (None if any(v is None for v in losses)
                    else math.fsum(mb["weight"] * mb["loss"] for mb in micro))
    if as_micro:
        meta["micro_batches"] = {"weights": [mb["weight"] for mb in micro], "losses": losses}
    return [(f"{fmt.BATCH}{i}", leaf) for i, leaf in enumerate(leaves)]


def optimizer_state_entries(optimizer: torch.optim.Optimizer, trainable: list[tuple[str, torch.nn.Parameter]],
                            meta: dict[str, Any]) -> Entries:
    """``optim/<name>/<key>`` of each tensor in the optimizer's per-parameter state.

    Non-tensor state (e.g. a step count) goes to ``meta["optimizer_scalars"]`` as JSON.
    """
    out: Entries = []
    scalars: dict[str, dict[str, Any]] = {}
    for name, p in trainable:
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out.append((f"{fmt.OPTIM}{name}/{k}", v))
            else:
                scalars.setdefault(name, {})[str(k)] = jsonable(v)
    if scalars:
        meta["optimizer_scalars"] = scalars
    return out


def step_entries(rec: Recording, step: int, micro: list[dict[str, Any]], meta: dict[str, Any], *,
                 trainable: list[tuple[str, torch.nn.Parameter]], clip: dict[str, Any],
                 forward: StepCapture) -> Entries:
    """A recorded step's entries besides x_t, in the order they are stored, and their fields of
    ``meta``: g_t (only its names with ``rec.grads`` False) and the clip (``clip``, what
    :meth:`~trajscope.recorders.preclip.PreclipNorms.measure` found),
    z_t (:func:`batch_entries`; a list of micro-batches whenever there are several or a weight is
    not 1), the forward state ``forward`` holds, and the optimizer state when ``rec`` stores it."""
    tensors = gradient_entries(trainable, step, meta, store=rec.grads)
    meta.update(clip)
    as_micro = stored_as_list(rec, [mb["weight"] for mb in micro])
    tensors += batch_entries(micro, as_micro, meta)
    if rec.batch_fn is not None:
        meta["batch_fn"] = rec.batch_fn
    tensors += forward.entries(rec.model, meta)
    if rec.optimizer_state:
        tensors += optimizer_state_entries(rec.optimizer, trainable, meta)
    return tensors


def snapshot_entries(rec: Recording, index: ParamIndex, step: int, kind: str, micro: list[dict[str, Any]] | None,
                     clip: dict[str, Any] | None, forward: StepCapture) -> tuple[Entries, dict[str, Any]]:
    """What the snapshot of ``step`` holds, entries and metadata: x_t, and for a recorded step
    (``kind`` step) :func:`step_entries`, or, without ``micro`` (a sharded run's rank other than
    0), g_t alone; the buffers; and under sharding this rank's pieces of them
    (:meth:`Sharding.parts`)."""
    tensors: Entries = [(fmt.PARAM + n, p) for n, p in index.params]
    meta: dict[str, Any] = {"step": step, "kind": kind, "lr": [float(g["lr"]) for g in rec.optimizer.param_groups]}
    if kind == fmt.KIND_STEP:
        if (names := index.step_trainable()) is not None:
            meta["trainable"] = names  # the step's own set differs from the manifest's
        if micro is None:
            tensors += gradient_entries(index.trainable, step, meta, store=rec.grads)
        else:
            tensors += step_entries(rec, step, micro, meta, trainable=index.trainable, clip=clip or {},
                                    forward=forward)
    tensors = with_buffers(tensors, rec.model)
    if formats := memory_formats(tensors):  # stored contiguous: the analyzer restores the layout
        meta["memory_formats"] = formats
    if rec.sharding is not None:  # this rank's pieces, placed by an index
        tensors, meta = rec.sharding.parts(tensors, rec.sharding.owners(index.params), meta)
    return tensors, meta
