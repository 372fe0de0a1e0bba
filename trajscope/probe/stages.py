"""The stages of a pair's probe that run the model: :func:`prepare` (the pair's points on the
evaluation device, and f) and :func:`evaluate` (every evaluation of f: the line, G0, G1, f(x*),
sharpness). :func:`trajscope.probe.pair.probe_pair` runs them, and
:mod:`trajscope.probe.trials` and :mod:`trajscope.probe.reference_point` evaluate f through them.

Parameters and buffers are swapped in with ``torch.func.functional_call`` on a wrapper module
whose ``forward`` calls the user's ``loss(model, batch)``: the swap is in force for the whole call,
so it holds for any method the loss uses (``training_step``, an HF model's loss), not only
``forward``. The recorded tensors are never mutated: each evaluation gets its own buffer copies.
How training is replayed (train mode, BatchNorm, dropout's RNG state): :mod:`trajscope.probe.pair`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from trajscope.errors import AnalysisError, ForwardModeError, ObjectiveError, ProbeWarning
from trajscope.objective import Objective
from trajscope.probe import line_plan
from trajscope.probe.line import Loss, replayed_rng, sdpa_math_kernel, set_rng_states
from trajscope.probe.settings import ProbeSettings
from trajscope.store.names import first, mismatches, shapes
from trajscope.store.snapshot import Snapshot, pair_coordinates
from trajscope.store.trees import tree_map

__all__ = ["Evaluation", "Prepared", "batchnorm_replay", "check_objective", "evaluate", "grad", "prepare"]


class _Bound(torch.nn.Module):
    """``forward(batch) = loss(model, batch)``: lets functional_call cover any method the loss uses."""

    def __init__(self, model: torch.nn.Module, loss: Any) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss(self.model, batch)


def check_objective(objective: Objective, params: Mapping[str, torch.Tensor],
                    buffers: Mapping[str, torch.Tensor]) -> None:
    """Raise ObjectiveError unless every recorded tensor has a same-shaped slot in the model."""
    slots = dict(objective.model.named_parameters())
    m = first(mismatches(shapes(params), shapes(slots)), "missing", "shape")
    if m is not None and m.kind == "missing":
        raise ObjectiveError(
            f"parameter {m.name!r} is recorded but the objective's model has no such parameter "
            f"(model has {len(slots)}: {', '.join(list(slots)[:5])}{', …' if len(slots) > 5 else ''})"
        )
    if m is not None:
        raise ObjectiveError(
            f"parameter {m.name!r}: recorded shape {m.expected}, objective's model has {m.actual}"
        )
    b = first(mismatches(shapes(buffers), shapes(dict(objective.model.named_buffers()))), "shape")
    if b is not None:
        raise ObjectiveError(f"buffer {b.name!r}: recorded shape {b.expected}, objective's model has {b.actual}")


def _to(t: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device``; floating-point tensors also cast to the evaluation ``dtype``."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


@contextlib.contextmanager
def batchnorm_replay(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate train-mode BatchNorm as training computed the loss, without its side effect.

    In train mode ``_BatchNorm.forward`` normalises with the batch statistics whatever
    ``track_running_stats`` says; the flag only decides whether it also updates the running
    statistics in place (and ``num_batches_tracked``). Switching it off for the probe therefore
    leaves ℓ unchanged, writes into no buffer (the recorded ones stay as recorded) and lets
    ``vmap`` batch the α points, which an in-place write of a batched mean into an unbatched
    buffer forbids. Eval-mode modules are left alone: they read the recorded running statistics.
    """
    patched = [
        m for m in model.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    for m in patched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in patched:
            m.track_running_stats = True


@dataclass
class Prepared:
    """A pair ready to evaluate: the points on the evaluation device and dtype, and f.

    Attributes:
        names: the coordinates of x (parameter names), the order of every per-layer array.
        x0, x1, delta: x_t, x_{t+1} and Δ_t = x_{t+1} − x_t, per parameter.
        f: x ↦ f(x; z_t), the loss on the step's minibatch with the step's buffers.
        model: the objective's model, on the device and in training's mode.
        replay: whether evaluations run under the RNG state captured at the step's forward pass.
        device, dtype: where and in which floating-point dtype everything is evaluated.
        unrecorded: coordinates that changed without a recorded gradient (:class:`~trajscope.store.names.Coordinates`).
        f_full: f evaluated without the step's autocast (in ``dtype`` throughout), when f runs under
            it: the full-precision reference of the pair's loss resolution; None otherwise.
    """

    names: list[str]
    x0: dict[str, torch.Tensor]
    x1: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    f: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    model: torch.nn.Module
    replay: bool
    device: str
    dtype: torch.dtype
    unrecorded: tuple[str, ...] = ()
    f_full: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None

    def on_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors[n]`` for every coordinate n, on the evaluation device and dtype."""
        return {n: _to(tensors[n], self.device, self.dtype) for n in self.names}


@dataclass
class Evaluation:
    """What the model re-evaluation produced (the only stage that runs f).

    Attributes:
        loss_line, dloss_line: ℓ(α) and ℓ'(α) on the α grid (float64).
        G0, G1: ∇f(x_t; z_t) and ∇f(x_{t+1}; z_t), per parameter.
        xref: x* (the reference point) per parameter, when one was given.
        extras: the scalar results that go to :attr:`PairStats.extras`.
    """

    loss_line: np.ndarray
    dloss_line: np.ndarray
    G0: dict[str, torch.Tensor]
    G1: dict[str, torch.Tensor]
    xref: dict[str, torch.Tensor] | None
    extras: dict[str, float]


def prepare(objective: Objective, snap: Snapshot, nxt: Snapshot, settings: ProbeSettings, *,
             ref: Snapshot | None, trainable: list[str] | None) -> Prepared:
    """Check the pair, put x_t, x_{t+1} and Δ_t = x_{t+1} − x_t on the device, and build
    f(x) = loss(model with parameters x and the step's buffers, z_t).

    Raises:
        AnalysisError: no minibatch, steps not consecutive, a neighbour lacks a coordinate.
        ObjectiveError: the recorded tensors do not fit the objective's model.
    """
    if snap.batch is None:
        raise AnalysisError(f"step {snap.step}: snapshot holds no minibatch; cannot probe the pair")
    if nxt.step != snap.step + 1:
        raise AnalysisError(f"pair ({snap.step}, {nxt.step}): steps are not consecutive")
    dev, dt = settings.device, settings.torch_dtype
    check_objective(objective, snap.params, snap.buffers)
    coords = pair_coordinates(snap, nxt, trainable)
    names = list(coords.names)
    for other in (nxt, ref):
        if other is None:
            continue
        missing = [n for n in names if n not in other.params]
        if missing:
            raise AnalysisError(f"step {other.step}: snapshot lacks parameter {missing[0]!r}")

    model = objective.model
    model.to(device=dev)
    if snap.training is not None:
        model.train(snap.training)
    replay = bool(snap.training) and bool(snap.rng)
    x0 = {n: _to(snap.params[n], dev, dt) for n in names}
    x1 = {n: _to(nxt.params[n], dev, dt) for n in names}
    delta = {n: x1[n] - x0[n] for n in names}
    fixed = {f"model.{n}": _to(t, dev, dt) for n, t in snap.params.items() if n not in x0}
    buffers = {f"model.{n}": _to(t, dev, dt) for n, t in snap.buffers.items()}
    batch = tree_map(lambda t: _to(t, dev, dt), snap.batch, leaf=torch.Tensor)
    if replay and str(dev).startswith("cuda") and not any(k.startswith("cuda") for k in snap.rng):
        # Random ops (dropout) on a GPU draw from the CUDA generator, whose state this run did not
        # record (it trained on the CPU): masks will differ from training's, and the replay-error
        # metrics will show it. Analyze with device="cpu" to replay them exactly.
        warnings.warn(
            f"the run trained on the CPU but is analyzed on {dev}: random ops (dropout) "
            "cannot be replayed on another device's generator; use --device cpu for exact replay",
            ProbeWarning, stacklevel=3,
        )

    def evaluator(cast: Callable[[], contextlib.AbstractContextManager[Any]] | None) -> Loss:
        # f(x; z_t): the objective's loss, or the weighted sum over the step's micro-batches,
        # each micro-batch in an autocast region of its own and, with several, from the RNG
        # state its own forward pass began with.
        bound = _Bound(model, snap.loss_fn(objective.loss, _around(snap, replay, cast)))

        def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
            # Fresh buffer copies per call: a module may write a buffer in place (train-mode
            # BatchNorm is patched not to, others may), and such writes must never reach the
            # recorded state or the next evaluation.
            state = {**fixed, **{k: v.clone() for k, v in buffers.items()}}
            state.update({f"model.{n}": p for n, p in params.items()})
            try:
                out = functional_call(bound, state, (batch,))
            except SystemExit as exc:  # an analysis that exits 0 with nothing computed would be silent
                raise ObjectiveError(f"objective loss called sys.exit({exc.code!r}); expected a scalar "
                                     "tensor") from None
            if not isinstance(out, torch.Tensor) or out.numel() != 1:
                raise ObjectiveError(
                    f"objective loss returned {type(out).__name__}"
                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}; expected a scalar tensor"
                )
            return out.reshape(()).to(dt)

        return f

    cast = training_autocast(snap, dev) if settings.autocast else None
    return Prepared(names, x0, x1, delta, evaluator(cast), model, replay, dev, dt, coords.unrecorded,
                    f_full=evaluator(None) if cast is not None else None)



def training_autocast(snap: Snapshot, device: str) -> Callable[[], contextlib.AbstractContextManager[Any]] | None:
    """A factory of the autocast the step's forward pass ran under, on ``device``'s type (None: it
    ran without). Recorded for another device type (a CUDA run analyzed on the CPU), the same dtype
    is applied on ``device``: the ops autocast lowers are the same on every device type."""
    if not snap.autocast:
        return None
    kind = torch.device(device).type
    dtype, cache = snap.autocast.get(kind, next(iter(snap.autocast.values())))
    return lambda: torch.autocast(device_type=kind, dtype=dtype, cache_enabled=cache)


def _around(snap: Snapshot, replay: bool, cast: Callable[[], contextlib.AbstractContextManager[Any]] | None
            ) -> Callable[[int], contextlib.AbstractContextManager[Any]] | None:
    """What each micro-batch i's loss runs inside: its recorded RNG state (a step of several
    micro-batches with later states recorded, when replaying) and the step's autocast (``cast``)."""
    states = {0: snap.rng, **snap.micro_rng} if replay and snap.micro_rng else {}
    if cast is None and not states:
        return None

    @contextlib.contextmanager
    def around(i: int) -> Iterator[None]:
        if i in states:
            set_rng_states(states[i])
        with cast() if cast is not None else contextlib.nullcontext():
            yield

    return around


def evaluate(prep: Prepared, snap: Snapshot, settings: ProbeSettings, *,
              ref: Snapshot | None) -> Evaluation:
    """Every evaluation of f for the pair, each under the step's replayed RNG state (with
    ``settings.sdpa_math``, the line and sharpness hold attention to its math kernel; the gradient
    passes run the kernel training ran):

    * ℓ(α) = f(x_t + αΔ_t) and ℓ'(α) = ⟨∇f(x_t + αΔ_t), Δ_t⟩ on the α grid
      (``settings.derivatives``: forward or reverse mode);
    * G0 = ∇f(x_t) and G1 = ∇f(x_{t+1}) (reverse mode);
    * ``extras["loss_x0"]``, ``extras["loss_x1"]`` = f(x_t), f(x_{t+1}) from the passes that gave
      G0 and G1 (the computation training ran: ``loss_replay_error`` compares the first). For a
      run trained compiled under autocast (``settings.compiled``) these two passes run compiled
      too (:func:`compiled_as_trained`);
    * ``extras["loss_resolution"]`` when f runs under the step's autocast (:func:`_resolution`);
    * ``extras["loss_ref"]`` = f(x*) when a reference snapshot is given;
    * ``extras["sharpness"]`` = λ_max(∇²f(x_t)) and its Lanczos diagnostics, when asked for;
    * ``extras["line_batched"]``: 1.0 if ``vmap`` computed the line, 0.0 if the point loop did;
    * ``extras["clip_factor"]``, ``extras["clip_uniform"]`` when the step's gradient was clipped;
    * ``extras["g_recomputed"]`` = 1.0 when the step's g_t was not stored (``grads=False``).
    """
    f, rng, replay = prep.f, snap.rng, prep.replay
    extras: dict[str, float] = {}
    alphas = torch.tensor(settings.alphas, dtype=prep.dtype, device=prep.device)
    with batchnorm_replay(prep.model):
        try:
            with sdpa_math_kernel(settings.sdpa_math):  # the line's forward mode only: G0, G1 run
                loss_line, dloss_line, batched, plan = line_plan.line_with_plan(  # training's kernel
                    f, prep.x0, prep.delta, alphas, settings, rng, replay)
        except ForwardModeError as exc:
            raise ForwardModeError(f"step {snap.step}: {exc}", exc.what) from None
        with compiled_as_trained(settings.compiled) as compile_f:
            f_grad = compile_f(f)
            with replayed_rng(rng, replay):
                G0, extras["loss_x0"] = grad_and_value(f_grad, prep.x0)
            with replayed_rng(rng, replay):
                G1, extras["loss_x1"] = grad_and_value(f_grad, prep.x1)
        if prep.f_full is not None:
            extras["loss_resolution"] = _resolution(prep, snap, settings, loss_line, extras)
        xref: dict[str, torch.Tensor] | None = None
        if ref is not None:
            xref = prep.on_device(ref.params)
            with torch.no_grad(), replayed_rng(rng, replay):
                extras["loss_ref"] = float(f(xref))
        if settings.sharpness:
            with sdpa_math_kernel(settings.sdpa_math):  # double backward: the fused kernels have none
                extras.update(_sharpness(prep, snap, settings))
    extras["line_batched"] = float(batched)
    if snap.clip_factor is not None:  # the recorded gradient clip: g_t = c·G0 when uniform
        extras["clip_factor"] = snap.clip_factor
        extras["clip_uniform"] = float(bool(snap.clip_uniform))
    if snap.has_grad and not snap.grads_stored:
        extras["g_recomputed"] = 1.0
    if plan is not None:
        extras.update(plan.extras())
    return Evaluation(loss_line, dloss_line, G0, G1, xref, extras)


def _sharpness(prep: Prepared, snap: Snapshot, settings: ProbeSettings) -> dict[str, float]:
    """λ_max(∇²f(x_t; z_t)) by Lanczos: ``sharpness``, ``sharpness_iterations``,
    ``sharpness_converged`` (1.0/0.0).

    The Hessian graph is built by one forward pass under the replayed RNG state: every
    Hessian-vector product then differentiates through the same dropout mask and the same batch
    statistics as ℓ and G0.

    Raises:
        AnalysisError: the objective does not support double backward.
    """
    from trajscope.probe.sharpness import hessian_max_eig

    try:
        with replayed_rng(snap.rng, prep.replay):
            res = hessian_max_eig(prep.f, prep.x0, max_iter=settings.sharpness_max_iter,
                                  tol=settings.lanczos_tol, seed=snap.step)
    except (ObjectiveError, AnalysisError):
        raise
    except RuntimeError as exc:
        raise AnalysisError(
            f"step {snap.step}: sharpness needs Hessian-vector products (double backward) "
            f"through the objective, which failed: {exc}; analyze without --sharpness"
        ) from exc
    return {
        "sharpness": res.value,
        "sharpness_iterations": float(res.iterations),
        "sharpness_converged": float(res.converged),
    }


@contextlib.contextmanager
def compiled_as_trained(enabled: bool) -> Iterator[Callable[[Loss], Loss]]:
    """A function that compiles f as training's ``torch.compile`` did (inductor, dropout drawn
    from torch's generator: ``fallback_random``), or leaves it as it is when not ``enabled``.

    Inductor's fused kernels keep the intermediates of an autocast region in float32 where an eager
    pass rounds each op's output to bf16/fp16, so only a compiled pass reproduces the gradient of a
    run trained compiled under autocast. The compiled f is used for the gradient passes only (the
    line's jvp and vmap run eagerly). Each pair compiles a new closure of the same code, which
    dynamo's cache serves after the first. When compiling fails (no C++ compiler on a CPU
    machine), f runs eagerly with a :class:`~trajscope.errors.ProbeWarning`.
    """
    if not enabled:
        yield lambda f: f
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield lambda f: _or_eager(torch.compile(f), f)


def _or_eager(compiled: Loss, f: Loss) -> Loss:
    """``compiled``, falling back to ``f`` (with one ProbeWarning) when compiling it fails."""
    def call(params: dict[str, torch.Tensor]) -> torch.Tensor:
        try:
            return compiled(params)
        except ObjectiveError:
            raise
        except Exception as exc:  # the backend failed (re-raised otherwise): f computes it eagerly
            if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                warnings.warn(f"compiling the replay as training was compiled failed ({type(exc).__name__}); "
                              "the gradient is replayed eagerly and differs from training's fused kernels by "
                              "the autocast's rounding", ProbeWarning, stacklevel=2)
                return f(params)
            raise

    return call


def grad(f: Any, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """∇f(x) by plain reverse-mode autograd (works with any module, in-place buffers included)."""
    return grad_and_value(f, x)[0]


def grad_and_value(f: Any, x: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """(∇f(x), f(x)) by one plain forward and backward pass: the computation training ran."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in x.items()}
    with torch.enable_grad():
        loss = f(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    out = {n: (g.detach() if g is not None else torch.zeros_like(x[n])) for n, g in zip(leaves, grads, strict=True)}
    return out, float(loss.detach())


def _resolution(prep: Prepared, snap: Snapshot, settings: ProbeSettings, loss_line: np.ndarray,
                extras: dict[str, float]) -> float:
    """The loss resolution of an evaluation under the step's autocast: the largest deviation of an
    as-trained value of f at x_t or x_{t+1} (the line's ℓ(0) and ℓ(1), and the plain passes that
    gave G0 and G1) from f evaluated in ``prep.dtype`` throughout, in loss units. A difference of
    two as-trained values smaller than twice this cannot be told from rounding."""
    assert prep.f_full is not None
    full = []
    for x in (prep.x0, prep.x1):
        with torch.no_grad(), replayed_rng(snap.rng, prep.replay):
            full.append(float(prep.f_full(x)))
    values = [(extras["loss_x0"], full[0]), (extras["loss_x1"], full[1])]
    for a, ref in ((0.0, full[0]), (1.0, full[1])):
        if a in settings.alphas:
            values.append((float(loss_line[settings.alphas.index(a)]), ref))
    return max(abs(v - ref) for v, ref in values)
