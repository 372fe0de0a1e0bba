"""One snapshot in memory (:class:`Snapshot`) and the one function that builds it from the stored form.

Every storage format reads a snapshot as ``(metadata, {key: tensor})`` (keys ``param/NAME``,
``grad/NAME``, ``buffer/NAME``, ``batch/I``, ``rng/…``, ``optim/NAME/KEY``; the metadata is the
``trajscope`` JSON object of ``docs/format.md``). :func:`snapshot_from_raw` turns that into a
:class:`Snapshot`, whatever the format; :func:`check_meta` type-checks the metadata. This module
knows no storage format, so the storage backends and :mod:`trajscope.store.run` both import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trajscope import runformat as fmt
from trajscope.errors import ObjectiveError, RunFormatError
from trajscope.store.names import Coordinates, coordinates
from trajscope.store.user_code import import_named

__all__ = ["Snapshot", "check_meta", "is_nonneg_int", "pair_coordinates", "snapshot_from_raw"]


@dataclass(frozen=True)
class Snapshot:
    """Everything recorded about x_t (CPU tensors, stored dtype).

    ``grads``, ``batch``, ``loss`` and ``rng`` are empty/None for the final state, which holds only
    parameters and buffers. ``grads`` is empty too for a step of a run recorded with
    ``Recorder(grads=False)``, which names the parameters that had a gradient instead
    (:attr:`grad_names`).
    """

    step: int
    kind: str
    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    batch: Any = None
    loss: float | None = None
    lr: list[float] = field(default_factory=list)
    training: bool | None = None
    micro_weights: list[float] | None = None
    """Set when the step consumed several micro-batches (gradient accumulation, data-parallel
    ranks): ``batch`` is then the list of micro-batches and f(x; z_t) = Σ_i w_i · loss(x; batch[i])."""
    batch_indices: Any = None
    """The stored sample indices when the run was recorded with ``batch_fn`` (``batch`` is rebuilt)."""
    optimizer_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per-parameter optimizer state (``optimizer_state=True`` runs), as the update at t used it."""
    clip_factor: float | None = None
    """c = ‖g_t‖ / ‖g_preclip‖ when the optimizer consumed a rescaled gradient (gradient clipping);
    None when the step was not clipped, or the run was recorded without clip measurement."""
    clip_uniform: bool | None = None
    """True when every parameter's gradient was scaled by the same c (``clip_grad_norm_``), so
    g_t = c·∇f(x_t; z_t); False for a non-uniform clip (``clip_grad_value_``); None unclipped."""
    unstored_grad_names: tuple[str, ...] | None = None
    """For a step recorded with ``grads=False`` (metadata ``grad_names``): the parameters that had
    a gradient, none of which is stored. None when the gradients are stored."""
    trainable: tuple[str, ...] | None = None
    """The parameters the optimizer updated at this step, when that set differed from the
    manifest's ``trainable`` flags (parameters unfrozen, frozen, added to or removed from the
    optimizer during training); None: the manifest's set."""
    micro_rng: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    """The RNG states of the step's later micro-batches' forward passes, by micro-batch index
    (1, 2, …), each keyed like :attr:`rng`; ``rng`` is micro-batch 0's."""
    autocast: dict[str, tuple[torch.dtype, bool]] = field(default_factory=dict)
    """The autocast the step's forward pass ran under: device type → (dtype, weight cache on)."""

    @property
    def autocast_label(self) -> str:
        """The dtype(s) of the step's autocast in words (``"bfloat16"``); ``""`` without autocast."""
        return "/".join(sorted({str(d).removeprefix("torch.") for d, _ in self.autocast.values()}))

    @property
    def has_grad(self) -> bool:
        """Whether the step had a gradient g_t (a training step; stored or not, :attr:`grads_stored`)."""
        return self.kind == fmt.KIND_STEP

    @property
    def grads_stored(self) -> bool:
        """Whether ``grads`` holds g_t: a training step of a run recorded with ``grads=True``."""
        return self.has_grad and self.unstored_grad_names is None

    @property
    def grad_names(self) -> tuple[str, ...]:
        """The parameters that had a gradient at this step: the keys of ``grads`` when stored,
        else the recorded ``grad_names``."""
        return tuple(self.grads) if self.unstored_grad_names is None else self.unstored_grad_names

    def loss_fn(self, loss: Callable[[torch.nn.Module, Any], torch.Tensor],
                around: Callable[[int], AbstractContextManager[Any]] | None = None,
                ) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
        """The minibatch loss f(x; z_t) of this step, as a function ``(model, batch) -> scalar``.

        For an ordinary step it is the objective's ``loss`` itself. For a step made of several
        micro-batches it is Σ_i w_i · loss(model, batch[i]) with the recorded weights: the loss
        whose gradient the optimizer consumed (e.g. the mean of the micro-batch losses for
        ``(loss / k).backward()`` accumulation, or the average over ranks under DDP). The
        micro-batches are evaluated in order. Each loss(model, batch[i]) runs inside ``around(i)``
        (the probe enters micro-batch i's recorded RNG state and autocast there: training ran each
        micro-batch's forward pass in an autocast region of its own); the weighting runs outside.
        """
        if self.micro_weights is None:
            if around is None:
                return loss

            def single(model: torch.nn.Module, batch: Any) -> torch.Tensor:
                with around(0):
                    return loss(model, batch)

            return single
        weights = list(self.micro_weights)

        def weighted(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            if not isinstance(batch, (list, tuple)) or len(batch) != len(weights):
                raise RunFormatError(
                    f"step {self.step}: expected {len(weights)} micro-batches, got "
                    f"{type(batch).__name__}"
                )
            total: torch.Tensor | None = None
            for i, (w, mb) in enumerate(zip(weights, batch, strict=True)):
                with around(i) if around is not None else nullcontext():
                    value = loss(model, mb)
                term = value * w
                total = term if total is None else total + term
            assert total is not None
            return total

        return weighted


_BATCH_FNS: dict[str, Callable[[Any], Any]] = {}


def _import_batch_fn(spec: str, where: Path) -> Callable[[Any], Any]:
    """Import a recorded ``batch_fn`` by name from the analyzing user's environment (the same
    rules as objectives: dotted identifiers only, never code inside a run directory)."""
    if spec not in _BATCH_FNS:
        obj = import_named(spec, f"batch_fn (recorded in {where})")
        if not callable(obj):
            raise ObjectiveError(f"batch_fn {spec!r}: not callable")
        _BATCH_FNS[spec] = obj
    return _BATCH_FNS[spec]


def snapshot_from_raw(meta: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                       where: Path) -> Snapshot:
    """Build a :class:`Snapshot` from the stored form (the same for every format)."""
    check_meta(meta, where)
    params: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    rng: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    leaves: dict[int, torch.Tensor] = {}
    for key, t in _in_layout(tensors, meta.get("memory_formats") or {}, where).items():
        prefix, _, name = key.partition("/")
        if prefix in ("param", "grad", "buffer", "rng", "optim"):
            fmt.check_name(name, f"{where}: tensor key {prefix}/…")
        if prefix == "param":
            params[name] = t
        elif prefix == "grad":
            grads[name] = t
        elif prefix == "buffer":
            buffers[name] = t
        elif prefix == "rng":
            rng[name] = t
        elif prefix == "optim":
            pname, _, skey = name.rpartition("/")
            optim.setdefault(pname, {})[skey] = t
        elif prefix == "batch" and name.isascii() and name.isdigit():
            leaves[int(name)] = t
    batch = None
    if "batch_tree" in meta:
        n = len(leaves)
        if sorted(leaves) != list(range(n)):
            raise RunFormatError(f"{where}: batch tensors are not numbered 0..{n - 1}")
        batch = fmt.unflatten_batch(meta["batch_tree"], [leaves[i] for i in range(n)],
                                    where=f"{where}: batch")
    micro = meta.get("micro_batches")
    weights = None
    if micro is not None:
        weights = micro.get("weights") if isinstance(micro, dict) else None
        if (not isinstance(weights, list) or not all(isinstance(w, (int, float)) for w in weights)
                or not isinstance(batch, list) or len(batch) != len(weights)):
            raise RunFormatError(
                f"{where}: 'micro_batches' must hold one weight per stored micro-batch"
            )
        weights = [float(w) for w in weights]
    indices = None
    if meta.get("batch_fn") and batch is not None:
        fn = _import_batch_fn(str(meta["batch_fn"]), where)
        indices = batch
        batch = [fn(ix) for ix in batch] if weights is not None else fn(batch)
    rng, micro_rng = _split_rng(rng, where)
    loss = meta.get("loss")
    clip = meta.get("clip_factor")
    names = meta.get("grad_names")
    if names is not None and grads:
        raise RunFormatError(f"{where}: holds both grad/ tensors and 'grad_names' (a run stores one or the other)")
    unknown = next((n for n in meta.get("trainable") or [] if n not in params), None)
    if unknown is not None:
        raise RunFormatError(f"{where}: snapshot 'trainable' names {unknown!r:.80}, a parameter it does not hold")
    return Snapshot(
        step=meta["step"],
        kind=meta.get("kind", fmt.KIND_STEP),
        params=params,
        grads=grads,
        buffers=buffers,
        rng=rng,
        batch=batch,
        loss=float(loss) if isinstance(loss, (int, float)) else None,
        lr=[float(x) for x in meta.get("lr", [])],
        training=meta.get("training"),
        micro_weights=weights,
        batch_indices=indices,
        optimizer_state=optim,
        clip_factor=float(clip) if clip is not None else None,
        clip_uniform=bool(meta.get("clip_uniform", False)) if clip is not None else None,
        unstored_grad_names=tuple(names) if names is not None else None,
        trainable=tuple(meta["trainable"]) if meta.get("trainable") is not None else None,
        micro_rng=micro_rng,
        autocast={dev: (_AUTOCAST_DTYPES[a["dtype"]], bool(a.get("cache", True)))
                  for dev, a in (meta.get("autocast") or {}).items()},
    )


def _in_layout(tensors: dict[str, torch.Tensor], layouts: dict[str, str], where: Path) -> dict[str, torch.Tensor]:
    """``tensors`` with those ``layouts`` names (the ``memory_formats`` field) back in the layout
    training's kernels saw: stored contiguous, a channels_last tensor rounds differently in them."""
    out = dict(tensors)
    for key, layout in layouts.items():
        t = out.get(key)
        if t is None:
            continue
        if t.dim() != _MEMORY_DIMS[layout]:
            raise RunFormatError(f"{where}: {key!r:.80} is {t.dim()}-d, not {layout}")
        out[key] = t.contiguous(memory_format=_MEMORY_FORMATS[layout])
    return out


def _split_rng(rng: dict[str, torch.Tensor], where: Path
               ) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """The first micro-batch's RNG states (``rng/<device>``) and the later ones' by index
    (``rng/micro<i>/<device>``, i ≥ 1)."""
    first: dict[str, torch.Tensor] = {}
    later: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in rng.items():
        if not name.startswith("micro"):
            first[name] = t
            continue
        index, _, dev = name.removeprefix("micro").partition("/")
        if not (index.isascii() and index.isdigit() and int(index) >= 1 and dev):
            raise RunFormatError(f"{where}: tensor key 'rng/{name:.80}': expected rng/micro<i>/<device>, i >= 1")
        later.setdefault(int(index), {})[dev] = t
    return first, later


_MEMORY_FORMATS = {"channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}
_MEMORY_DIMS = {"channels_last": 4, "channels_last_3d": 5}
_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                    "float64": torch.float64}


def check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """Type-check a snapshot's ``trajscope`` metadata field by field (every storage format)."""
    if not isinstance(meta, dict):
        raise RunFormatError(f"{path}: snapshot metadata is not a JSON object")
    step = meta.get("step")
    if not is_nonneg_int(step):
        raise RunFormatError(f"{path}: snapshot metadata lacks an integer 'step' (got {step!r:.40})")
    named = fmt.parse_step_filename(path.name)
    if named is not None and named != step:
        raise RunFormatError(
            f"{path}: file is named for step {named} but holds step {step}; refusing to mix up steps"
        )
    if meta.get("kind", fmt.KIND_STEP) not in (fmt.KIND_STEP, fmt.KIND_FINAL):
        raise RunFormatError(f"{path}: snapshot 'kind' must be 'step' or 'final'")
    lr = meta.get("lr", [])
    if not isinstance(lr, list) or not all(_is_number(x) for x in lr):
        raise RunFormatError(f"{path}: snapshot 'lr' must be a list of numbers")
    if not (meta.get("loss") is None or _is_number(meta["loss"])):
        raise RunFormatError(f"{path}: snapshot 'loss' must be a number or null")
    if not (meta.get("training") is None or isinstance(meta["training"], bool)):
        raise RunFormatError(f"{path}: snapshot 'training' must be true, false or null")
    clip = meta.get("clip_factor")
    if not (clip is None or (_is_number(clip) and math.isfinite(clip) and clip > 0)):
        raise RunFormatError(f"{path}: snapshot 'clip_factor' must be a positive number")
    if not isinstance(meta.get("clip_uniform", False), bool):
        raise RunFormatError(f"{path}: snapshot 'clip_uniform' must be true or false")
    names = meta.get("grad_names")
    if names is not None:
        if not isinstance(names, list):
            raise RunFormatError(f"{path}: snapshot 'grad_names' must be a list of parameter names")
        for i, n in enumerate(names):
            fmt.check_name(n, f"{path}: grad_names[{i}]")
    _check_forward_meta(meta, path)
    trainable = meta.get("trainable")
    if not (trainable is None or (isinstance(trainable, list) and all(isinstance(n, str) for n in trainable))):
        raise RunFormatError(f"{path}: snapshot 'trainable' must be a list of parameter names")
    return meta


def _check_forward_meta(meta: dict[str, Any], path: Path) -> None:
    """Type-check ``autocast`` and ``memory_formats`` (how the step's forward pass ran)."""
    autocast = meta.get("autocast")
    if autocast is not None and not (
        isinstance(autocast, dict) and all(
            isinstance(dev, str) and isinstance(a, dict) and a.get("dtype") in _AUTOCAST_DTYPES
            and isinstance(a.get("cache", True), bool) for dev, a in autocast.items())):
        raise RunFormatError(
            f"{path}: snapshot 'autocast' must map device types to {{\"dtype\": one of "
            f"{', '.join(_AUTOCAST_DTYPES)}, \"cache\": bool}}")
    layouts = meta.get("memory_formats")
    if layouts is not None and not (
        isinstance(layouts, dict) and all(isinstance(k, str) and v in _MEMORY_FORMATS for k, v in layouts.items())):
        raise RunFormatError(f"{path}: snapshot 'memory_formats' must map tensor keys to "
                             f"{' or '.join(_MEMORY_FORMATS)}")


def is_nonneg_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def pair_coordinates(snap: Snapshot, nxt: Snapshot, trainable: Sequence[str] | None) -> Coordinates:
    """The coordinates of x for the pair (``snap``, ``nxt``) = (x_t, x_{t+1}), by
    :func:`trajscope.store.names.coordinates`.

    The trainable set is the one step t recorded (``snap.trainable``), else ``trainable`` (the
    manifest's), else the parameters with a recorded gradient. Any other parameter whose value
    differs between x_t and x_{t+1} (exactly; NaN equals NaN at the same place) is a coordinate too,
    listed in ``unrecorded``: it moved, so it is part of Δ_t.
    """
    def changed(n: str) -> bool:
        b = nxt.params.get(n)
        return b is not None and not _same_values(snap.params[n], b)

    return coordinates(list(snap.params), set(snap.grad_names),
                       snap.trainable if snap.trainable is not None else trainable, changed)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of two tensors, a NaN equal to a NaN at the same place."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not a.is_floating_point():
        return False
    b = b.to(a.device)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())
