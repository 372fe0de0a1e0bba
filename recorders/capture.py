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
from trajscope.recorders.forward import StepCapture
from trajscope.recorders.hooks import grad_hooks
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
    "optimizer_state_entries",
    "step_entries",
    "PreclipNorms",
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
        index = cls(list(model.named_parameters()), [], [], model=model)
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
        current = dict(self.model.named_parameters(remove_duplicate=False))  # a name tied to another tensor too
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
        out = [(fmt.PARAM + n, dtype_name(p.dtype), tuple(p.shape)) for n, p in self.params]
        if grads:
            out += [(fmt.GRAD + n, dtype_name(p.dtype), tuple(p.shape)) for n, p in self.trainable]
        out += [(fmt.BUFFER + n, dtype_name(b.dtype), tuple(b.shape)) for n, b in model.named_buffers()]
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
    return tensors + [(fmt.BUFFER + n, b) for n, b in model.named_buffers() if fmt.BUFFER + n not in keys]


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
                 trainable: list[tuple[str, torch.nn.Parameter]], preclip: PreclipNorms,
                 forward: StepCapture) -> Entries:
    """A recorded step's entries besides x_t, in the order they are stored, and their fields of
    ``meta``: g_t (only its names with ``rec.grads`` False) and the clip ``preclip`` measured,
    z_t (:func:`batch_entries`; a list of micro-batches whenever there are several or a weight is
    not 1), the forward state ``forward`` holds, and the optimizer state when ``rec`` stores it."""
    tensors = gradient_entries(trainable, step, meta, store=rec.grads)
    preclip.measure(rec.grad_scaler, meta)
    as_micro = stored_as_list(rec, [mb["weight"] for mb in micro])
    tensors += batch_entries(micro, as_micro, meta)
    if rec.batch_fn is not None:
        meta["batch_fn"] = rec.batch_fn
    tensors += forward.entries(rec.model, meta)
    if rec.optimizer_state:
        tensors += optimizer_state_entries(rec.optimizer, trainable, meta)
    return tensors


class PreclipNorms:
    """The pre-clip gradient norm of a recorded step, and the clip the optimizer step saw.

    Clipping (``clip_grad_norm_``, ``clip_grad_value_``) rescales ``p.grad`` in place after
    backward and before ``optimizer.step()``, so the stored g_t is the clipped gradient while the
    analyzer's replayed ∇f(x_t; z_t) is not. :meth:`on_grad` runs from each trainable parameter's
    post-accumulate-grad hook (armed on recorded steps only) and keeps ‖∂f/∂p‖² as backward
    completed it: with gradient accumulation each micro-batch's firing overwrites the last, so
    the step sees the accumulated gradient. The squares stay float64 tensors on the parameter's
    device; :meth:`measure` syncs with the host once per recorded step. The recorder arms the
    hooks in a single process only: under data parallelism ``p.grad`` is averaged over the ranks
    after its hook fired, so the two norms would not describe the same gradient.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self._params = [p for p in params if p.requires_grad]
        self._sq: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def arm(self, on: bool) -> None:
        """Register the parameters' hooks (``on``, the coming step is recorded) or remove them."""
        if on and not self._handles:
            self._handles = grad_hooks(self.on_grad, self._params)
        elif not on and self._handles:
            for h in self._handles:
                h.remove()
            self._handles = []
        self.clear()

    def track(self, params: list[torch.nn.Parameter]) -> None:
        """Measure ``params`` from now on (the trainable set changed); armed hooks move with them.

        Norms already kept for this step stay: a change seen after backward loses nothing."""
        params = [p for p in params if p.requires_grad]  # only those get a post-accumulate-grad hook
        if [id(p) for p in params] == [id(p) for p in self._params]:
            return
        armed = bool(self._handles)
        for h in self._handles:
            h.remove()
        self._params = params
        self._handles = grad_hooks(self.on_grad, params) if armed else []

    def on_grad(self, p: torch.Tensor) -> None:
        """A post-accumulate-grad hook fired for ``p``: keep ‖p.grad‖² (float64, on its device)."""
        if p.grad is not None and p.grad.layout == torch.strided:
            self._sq[id(p)] = _sq_norm(p.grad)

    def clear(self) -> None:
        self._sq.clear()

    def measure(self, grad_scaler: Any, meta: dict[str, Any]) -> None:
        """Add the clip fields to ``meta`` when the consumed gradient is a rescaled pre-clip one.

        With c = ‖g_consumed‖ / ‖g_preclip‖ over the parameters whose gradient both saw:
        ``grad_norm_preclip`` (‖g_preclip‖), ``clip_factor`` (c) and ``clip_uniform`` (every
        parameter's own ratio equals c within rounding, as ``clip_grad_norm_`` scales). Nothing is
        added for a uniform c that is 1 within rounding, or an exact power of two: that is a
        loss-scale unscale (AMP ``GradScaler``), not a clip. A non-uniform rescale is recorded
        whatever its global c. The pre-clip norms are divided by
        ``grad_scaler``'s scale S (the scale the backward's gradients carried; 1 without a scaler).
        """
        if not self._handles:
            return
        loss_scale = 1.0
        if grad_scaler is not None and grad_scaler.is_enabled():
            loss_scale = float(grad_scaler.get_scale())  # update() runs after step: S of this backward
        pairs = [(p, self._sq[id(p)]) for p in self._params
                 if p.grad is not None and p.grad.layout == torch.strided and id(p) in self._sq]
        self.clear()
        if not pairs:
            return
        dev = pairs[0][1].device
        pre = torch.stack([s.to(dev) for _, s in pairs]) / (float(loss_scale) ** 2)
        post = torch.stack([_sq_norm(p.grad).to(dev) for p, _ in pairs])  # type: ignore[arg-type]
        pre_sum, post_sum = pre.sum(), post.sum()
        c = torch.sqrt(post_sum / pre_sum)
        # Per-parameter deviation of the ratio from c (relative); a parameter whose pre-clip
        # gradient is 0 but whose consumed one is not was not rescaled at all: infinite.
        ratio = torch.sqrt(post / torch.where(pre > 0, pre, torch.ones_like(pre)))
        dev_i = torch.where(pre > 0, (ratio - c).abs() / c, torch.where(post > 0, torch.inf, 0.0))
        pre_norm, factor, spread = torch.stack([pre_sum.sqrt(), c, dev_i.max()]).tolist()
        eps = max(torch.finfo(p.grad.dtype).eps for p, _ in pairs)  # type: ignore[union-attr]
        tol = 8 * eps  # the rescale rounds each element once: ratios agree to ~eps
        if not (math.isfinite(factor) and factor > 0 and pre_norm > 0):
            return
        uniform = bool(spread <= tol)
        if uniform and abs(math.log2(factor) - round(math.log2(factor))) <= tol:
            return  # c = 1, or an exact power of two: a GradScaler's unscale, not a clip
        meta["grad_norm_preclip"] = pre_norm
        meta["clip_factor"] = factor
        meta["clip_uniform"] = bool(uniform)


def _sq_norm(g: torch.Tensor) -> torch.Tensor:
    """‖g‖² in float64, on g's device."""
    return torch.linalg.vector_norm(g.detach(), dtype=torch.float64).square()
