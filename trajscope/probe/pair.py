"""The line probe: the expensive part of the analysis, one model re-evaluation task per pair.

For the pair (t, t+1) it evaluates, on the *same* minibatch z_t,

* ℓ(α) = f(x_t + αΔ_t; z_t) and ℓ'(α) = ⟨∇f(x_t + αΔ_t; z_t), Δ_t⟩ on the α grid, by forward-mode
  AD (``torch.func.jvp``: value and directional derivative in one pass), the grid points batched
  with ``torch.func.vmap`` in chunks; or, for a model an op of which has no forward-mode rule, by
  one backward pass per point (``ProbeSettings.derivatives``, decided once per analysis by
  :func:`trajscope.analysis.plan.resolve_derivatives`);
* G0 = ∇f(x_t; z_t) and G1 = ∇f(x_{t+1}; z_t) by reverse-mode autograd;

and reduces everything the metrics need to small float64 numbers: the line arrays and, per
parameter tensor ("layer"), the inner products of a fixed set of vectors (:data:`TERMS`). Metrics
(:mod:`trajscope.metrics`) are pure functions of these, so no full-size vector leaves this task.

Parameters and buffers are swapped in with ``torch.func.functional_call`` on a wrapper module
whose ``forward`` calls the user's ``loss(model, batch)``: the swap is in force for the whole call,
so it holds for any method the loss uses (``training_step``, an HF model's loss), not only
``forward``. The recorded tensors are never mutated: each evaluation gets its own buffer copies.

Faithful replay of training conditions (see ``docs/metrics.md``, "Replay fidelity"):

* the model is put in the mode training used (``Snapshot.training``, captured at the step's first
  forward pass);
* a train-mode BatchNorm normalises with the *batch* statistics, so its running statistics do not
  enter ℓ; during the probe such modules have ``track_running_stats`` switched off
  (:func:`_batchnorm_replay`), so nothing writes into a buffer and ``vmap`` can batch the α points;
  eval-mode BatchNorm reads the recorded running statistics, which nothing writes either;
* every evaluation (each α chunk, G0, G1, f(x*), the sharpness graph) runs with the RNG state
  captured at the step's forward pass, so dropout draws the mask training drew, and the same mask
  along the whole line (``vmap(randomness="same")`` draws like the unbatched call: tested).

The line evaluation itself (batching, chunking, the point-by-point fallback) is in
:mod:`trajscope.probe.line`.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from trajscope.errors import AnalysisError, ForwardModeError, ObjectiveError
from trajscope.metrics.pair import TERMS, PairStats
from trajscope.objective import Objective
from trajscope.probe import line_plan
from trajscope.probe.grid import alpha_grid  # part of this module's API
from trajscope.probe.line import _replayed_rng, sdpa_math_kernel
from trajscope.probe.vectors import REPLAY_TERMS, layer_terms, pair_vectors
from trajscope.store.names import first, mismatches, shapes
from trajscope.store.snapshot import Snapshot, pair_coordinates
from trajscope.store.trees import tree_map

__all__ = ["DERIVATIVES", "ProbeSettings", "alpha_grid", "probe_pair"]

DERIVATIVES = ("auto", "forward", "reverse")
"""The ``derivatives=`` choices of an analysis; a ProbeSettings holds the resolved one."""


@dataclass(frozen=True)
class ProbeSettings:
    """How a pair is probed. Part of the analysis' provenance (stored in the Dataset attrs)."""

    alphas: tuple[float, ...] = tuple(alpha_grid())
    device: str = "cpu"
    dtype: str = "float32"
    chunk_size: int | None = None  # α points per vmap call; None: all at once
    batched: bool | None = True  # False: α points one by one; None: whichever is faster (trajscope.probe.line_plan)
    sharpness: bool = False  # λ_max(∇²f(x_t; z_t)) by Lanczos (one double-backward per iteration)
    sharpness_max_iter: int = 100  # Lanczos iterations (Hessian-vector products) at most
    sharpness_tol: float | None = None  # Ritz residual / max|Ritz value|; None: 1e-5 f32, 1e-8 f64
    reference_step: int | None = None  # x* of convexity_ratio_ref (the snapshot passed as ``ref``)
    derivatives: str = "forward"  # ℓ'(α) by "forward" (jvp, batched) or "reverse" (one backward per point)
    sdpa_math: bool = False  # hold scaled_dot_product_attention to its math kernel (forward mode needs it)
    derivatives_reason: str = field(default="", compare=False)  # why this path (Dataset attrs only)
    # Bytes the line evaluation of one worker may add to what it holds; 0: half the available memory;
    # None: no budget (all points in one vmap call, halved on a CUDA out-of-memory). trajscope.probe.memory
    max_memory: int | None = field(default=None, compare=False)
    plan_id: str = field(default="", compare=False)  # the analysis: line plans are decided once per analysis

    def __post_init__(self) -> None:
        if self.derivatives not in ("forward", "reverse"):
            raise AnalysisError(f"derivatives={self.derivatives!r}: expected forward or reverse (resolved)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]

    @property
    def lanczos_tol(self) -> float:
        # A float32 Hessian-vector product carries ~1e-7 relative noise, so a float32 residual
        # cannot shrink much below 1e-6·‖H‖: a tighter default would never report convergence.
        if self.sharpness_tol is not None:
            return self.sharpness_tol
        return 1e-8 if self.dtype == "float64" else 1e-5

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "alphas": list(self.alphas),
            "dtype": self.dtype,
            "batched": self.batched is not False,  # auto gives the same numbers: the same digest
            "chunk_size": self.chunk_size,
            "reference_step": self.reference_step,
            "sharpness": self.sharpness,
            # What a persisted pair holds: a pair saved before a term was added must not be
            # reused (the settings digest covers this JSON), or a metric would miss its term.
            "terms": hashlib.sha256(" ".join(f"{a}.{b}" for a, b in TERMS).encode()).hexdigest()[:12],
        }
        if self.sharpness:
            out["sharpness_max_iter"] = self.sharpness_max_iter
            out["sharpness_tol"] = self.lanczos_tol
        # Only a path other than plain forward mode is named: the digest of pairs persisted under
        # plain forward mode stays what it is, and a pair persisted under another path is not reused.
        if self.derivatives != "forward":
            out["derivatives"] = self.derivatives
        if self.sdpa_math:
            out["sdpa_math"] = True
        return out

    @property
    def derivatives_label(self) -> str:
        """The resolved path in words: ``forward``, ``forward (sdpa math kernel)`` or ``reverse``."""
        return self.derivatives + (" (sdpa math kernel)" if self.sdpa_math else "")


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
def _batchnorm_replay(model: torch.nn.Module) -> Iterator[None]:
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
class _Prepared:
    """A pair ready to evaluate: the points on the evaluation device and dtype, and f.

    Attributes:
        names: the coordinates of x (parameter names), the order of every per-layer array.
        x0, x1, delta: x_t, x_{t+1} and Δ_t = x_{t+1} − x_t, per parameter.
        f: x ↦ f(x; z_t), the loss on the step's minibatch with the step's buffers.
        model: the objective's model, on the device and in training's mode.
        replay: whether evaluations run under the RNG state captured at the step's forward pass.
        device, dtype: where and in which floating-point dtype everything is evaluated.
        unrecorded: coordinates that changed without a recorded gradient (:class:`~trajscope.store.names.Coordinates`).
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

    def on_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors[n]`` for every coordinate n, on the evaluation device and dtype."""
        return {n: _to(tensors[n], self.device, self.dtype) for n in self.names}


@dataclass
class _Evaluation:
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


def probe_pair(
    objective: Objective,
    snap: Snapshot,
    nxt: Snapshot,
    settings: ProbeSettings,
    *,
    prev: Snapshot | None = None,
    init: Snapshot | None = None,
    ref: Snapshot | None = None,
    trainable: list[str] | None = None,
) -> PairStats:
    """Probe the pair (snap.step, nxt.step) and reduce it to :class:`PairStats`.

    Four stages: :func:`_prepare` (checks, points on the device, f), :func:`_evaluate` (ℓ, ℓ',
    G0, G1, f(x*), sharpness), :func:`~trajscope.probe.vectors.pair_vectors` (the
    :data:`~trajscope.metrics.pair.VECTORS` per layer) and :func:`~trajscope.probe.vectors.layer_terms` (the
    :data:`TERMS` inner products). ``extras["line_batched"]`` is 1.0
    when ``vmap`` computed the line, 0.0 when it was evaluated point by point.

    Args:
        objective: the model skeleton and loss.
        snap, nxt: snapshots of x_t (with g_t and z_t) and x_{t+1}.
        settings: α grid, device, evaluation dtype, batching, sharpness.
        prev: snapshot of x_{t−1}, for the "previous step" cosines (optional).
        init: snapshot of x_0, for the distance from initialisation (optional).
        ref: snapshot of the reference point x* of ``convexity_ratio_ref`` (optional).
        trainable: the coordinates of x (default: the parameters with a gradient) unless step t
            recorded its own set; changed parameters join them (:func:`trajscope.store.snapshot.pair_coordinates`).
    """
    prep = _prepare(objective, snap, nxt, settings, ref=ref, trainable=trainable)
    ev = _evaluate(prep, snap, settings, ref=ref)
    if prep.unrecorded:
        ev.extras["unrecorded_params"] = float(len(prep.unrecorded))
    vec = pair_vectors(prep, ev, snap, nxt, prev=prev, init=init)
    return PairStats(
        step=snap.step,
        alpha=np.asarray(settings.alphas, dtype=np.float64),
        loss_line=ev.loss_line,
        dloss_line=ev.dloss_line,
        terms=layer_terms(vec, prep.names, frozenset() if snap.grads_stored else REPLAY_TERMS),
        layers=tuple(prep.names),
        loss_recorded=snap.loss if snap.loss is not None else float("nan"),
        lr=np.asarray(snap.lr, dtype=np.float64),
        extras=ev.extras,
    )


def _prepare(objective: Objective, snap: Snapshot, nxt: Snapshot, settings: ProbeSettings, *,
             ref: Snapshot | None, trainable: list[str] | None) -> _Prepared:
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
    # f(x; z_t): the objective's loss, or the weighted sum over the step's micro-batches.
    bound = _Bound(model, snap.loss_fn(objective.loss))
    x0 = {n: _to(snap.params[n], dev, dt) for n in names}
    x1 = {n: _to(nxt.params[n], dev, dt) for n in names}
    delta = {n: x1[n] - x0[n] for n in names}
    fixed = {f"model.{n}": _to(t, dev, dt) for n, t in snap.params.items() if n not in x0}
    buffers = {f"model.{n}": _to(t, dev, dt) for n, t in snap.buffers.items()}
    batch = tree_map(lambda t: _to(t, dev, dt), snap.batch, leaf=torch.Tensor)
    replay = bool(snap.training) and bool(snap.rng)
    if replay and str(dev).startswith("cuda") and not any(k.startswith("cuda") for k in snap.rng):
        # Random ops (dropout) on a GPU draw from the CUDA generator, whose state this run did not
        # record (it trained on the CPU): masks will differ from training's, and the replay-error
        # metrics will show it. Analyze with device="cpu" to replay them exactly.
        warnings.warn(
            f"the run trained on the CPU but is analyzed on {dev}: random ops (dropout) "
            "cannot be replayed on another device's generator; use --device cpu for exact replay",
            RuntimeWarning, stacklevel=3,
        )

    def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
        # Fresh buffer copies per call: a module may write a buffer in place (train-mode BatchNorm
        # is patched not to, others may), and such writes must never reach the recorded state or
        # the next evaluation.
        state = {**fixed, **{k: v.clone() for k, v in buffers.items()}}
        state.update({f"model.{n}": p for n, p in params.items()})
        out = functional_call(bound, state, (batch,))
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ObjectiveError(
                f"objective loss returned {type(out).__name__}"
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}; expected a scalar tensor"
            )
        return out.reshape(())

    return _Prepared(names, x0, x1, delta, f, model, replay, dev, dt, coords.unrecorded)


def _evaluate(prep: _Prepared, snap: Snapshot, settings: ProbeSettings, *,
              ref: Snapshot | None) -> _Evaluation:
    """Every evaluation of f for the pair, each under the step's replayed RNG state (and, with
    ``settings.sdpa_math``, with attention held to its math kernel):

    * ℓ(α) = f(x_t + αΔ_t) and ℓ'(α) = ⟨∇f(x_t + αΔ_t), Δ_t⟩ on the α grid
      (``settings.derivatives``: forward or reverse mode);
    * G0 = ∇f(x_t) and G1 = ∇f(x_{t+1}) (reverse mode);
    * ``extras["loss_ref"]`` = f(x*) when a reference snapshot is given;
    * ``extras["sharpness"]`` = λ_max(∇²f(x_t)) and its Lanczos diagnostics, when asked for;
    * ``extras["line_batched"]``: 1.0 if ``vmap`` computed the line, 0.0 if the point loop did;
    * ``extras["clip_factor"]``, ``extras["clip_uniform"]`` when the step's gradient was clipped;
    * ``extras["g_recomputed"]`` = 1.0 when the step's g_t was not stored (``grads=False``).
    """
    f, rng, replay = prep.f, snap.rng, prep.replay
    extras: dict[str, float] = {}
    alphas = torch.tensor(settings.alphas, dtype=prep.dtype, device=prep.device)
    with _batchnorm_replay(prep.model), sdpa_math_kernel(settings.sdpa_math):
        try:
            loss_line, dloss_line, batched, plan = line_plan.line_and_path(f, prep.x0, prep.delta, alphas,
                                                                           settings, rng, replay)
        except ForwardModeError as exc:
            raise ForwardModeError(f"step {snap.step}: {exc}", exc.what) from None
        with _replayed_rng(rng, replay):
            G0 = _grad(f, prep.x0)
        with _replayed_rng(rng, replay):
            G1 = _grad(f, prep.x1)
        xref: dict[str, torch.Tensor] | None = None
        if ref is not None:
            xref = prep.on_device(ref.params)
            with torch.no_grad(), _replayed_rng(rng, replay):
                extras["loss_ref"] = float(f(xref))
        if settings.sharpness:
            extras.update(_sharpness(prep, snap, settings))
    extras["line_batched"] = float(batched)
    if snap.clip_factor is not None:  # the recorded gradient clip: g_t = c·G0 when uniform
        extras["clip_factor"] = snap.clip_factor
        extras["clip_uniform"] = float(bool(snap.clip_uniform))
    if snap.has_grad and not snap.grads_stored:
        extras["g_recomputed"] = 1.0
    if plan is not None:
        extras.update(plan.extras())
    return _Evaluation(loss_line, dloss_line, G0, G1, xref, extras)


def _sharpness(prep: _Prepared, snap: Snapshot, settings: ProbeSettings) -> dict[str, float]:
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
        with _replayed_rng(snap.rng, prep.replay):
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


def _grad(f: Any, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """∇f(x) by plain reverse-mode autograd (works with any module, in-place buffers included)."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in x.items()}
    with torch.enable_grad():
        loss = f(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {
        n: (g.detach() if g is not None else torch.zeros_like(x[n]))
        for n, g in zip(leaves, grads, strict=True)
    }
