"""The line probe: the expensive part of the analysis, one model re-evaluation task per pair.

For the pair (t, t+1) it evaluates, on the *same* minibatch z_t,

* ℓ(α) = f(x_t + αΔ_t; z_t) and ℓ'(α) = ⟨∇f(x_t + αΔ_t; z_t), Δ_t⟩ on the α grid, by forward-mode
  AD (``torch.func.jvp``: value and directional derivative in one pass), the grid points batched
  with ``torch.func.vmap`` in chunks;
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
"""

from __future__ import annotations

import contextlib
import warnings
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, jvp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from trajscope.errors import AnalysisError, ObjectiveError
from trajscope.objective import Objective
from trajscope.pairs import TERMS, VECTORS, PairStats  # re-exported: the probe/metrics contract lives there
from trajscope.run import Snapshot

__all__ = ["ProbeSettings", "PairStats", "TERMS", "VECTORS", "alpha_grid", "probe_pair"]

def alpha_grid(points: int = 9, margin: float = 0.5) -> np.ndarray:
    """The α grid: ``points`` equally spaced points on [0, 1] extended by ``margin`` on each side.

    The spacing is h = 1/(points−1); the margin is rounded to whole steps, so 0 and 1 are always
    exact grid points. The default (9, 0.5) gives 17 points on [−0.5, 1.5].
    """
    if not isinstance(points, int) or points < 2:
        raise AnalysisError(f"points={points!r}: expected an int >= 2 (the grid needs α=0 and α=1)")
    if not margin >= 0:
        raise AnalysisError(f"margin={margin!r}: expected a number >= 0")
    n = int(round(margin * (points - 1)))
    return np.arange(-n, points + n, dtype=np.float64) / (points - 1)


@dataclass(frozen=True)
class ProbeSettings:
    """How a pair is probed. Part of the analysis' provenance (stored in the Dataset attrs)."""

    alphas: tuple[float, ...] = tuple(alpha_grid())
    device: str = "cpu"
    dtype: str = "float32"
    chunk_size: int | None = None  # α points per vmap call; None: all at once
    batched: bool = True  # False: evaluate α points one by one (debugging, exotic modules)
    sharpness: bool = False  # λ_max(∇²f(x_t; z_t)) by Lanczos (one double-backward per iteration)
    sharpness_max_iter: int = 100  # Lanczos iterations (Hessian-vector products) at most
    sharpness_tol: float | None = None  # Ritz residual / max|Ritz value|; None: 1e-5 f32, 1e-8 f64
    reference_step: int | None = None  # x* of convexity_ratio_ref (the snapshot passed as ``ref``)

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
            "batched": self.batched,
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
        return out


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
    for name, t in params.items():
        if name not in slots:
            raise ObjectiveError(
                f"parameter {name!r} is recorded but the objective's model has no such parameter "
                f"(model has {len(slots)}: {', '.join(list(slots)[:5])}{', …' if len(slots) > 5 else ''})"
            )
        if tuple(slots[name].shape) != tuple(t.shape):
            raise ObjectiveError(
                f"parameter {name!r}: recorded shape {tuple(t.shape)}, objective's model has "
                f"{tuple(slots[name].shape)}"
            )
    bslots = dict(objective.model.named_buffers())
    for name, t in buffers.items():
        if name in bslots and tuple(bslots[name].shape) != tuple(t.shape):
            raise ObjectiveError(
                f"buffer {name!r}: recorded shape {tuple(t.shape)}, objective's model has "
                f"{tuple(bslots[name].shape)}"
            )


def _to(t: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _map_batch(batch: Any, device: str, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor):
        return _to(batch, device, dtype)
    if isinstance(batch, tuple):
        return tuple(_map_batch(b, device, dtype) for b in batch)
    if isinstance(batch, list):
        return [_map_batch(b, device, dtype) for b in batch]
    if isinstance(batch, dict):
        return {k: _map_batch(v, device, dtype) for k, v in batch.items()}
    return batch


@contextlib.contextmanager
def _replayed_rng(rng: Mapping[str, torch.Tensor], enabled: bool) -> Iterator[None]:
    """Run the block with the RNG state captured at the step's forward pass, then restore."""
    if not enabled or "cpu" not in rng:
        yield
        return
    saved = torch.get_rng_state()
    cuda_saved = {}
    try:
        torch.set_rng_state(rng["cpu"])
        for key, state in rng.items():
            if key.startswith("cuda") and torch.cuda.is_available():
                i = int(key[4:])
                if i < torch.cuda.device_count():
                    cuda_saved[i] = torch.cuda.get_rng_state(i)
                    torch.cuda.set_rng_state(state, i)
        yield
    finally:
        torch.set_rng_state(saved)
        for i, state in cuda_saved.items():
            torch.cuda.set_rng_state(state, i)


def _layer_terms(vec: Mapping[str, Mapping[str, torch.Tensor | None]],
                 names: Sequence[str]) -> dict[str, np.ndarray]:
    """Every TERMS inner product ⟨a, b⟩ per layer, summed in float64; NaN where a vector is absent.

    Each vector is cast to float64 once per layer (not once per term), and all the products go
    to the host in one transfer at the end: one device synchronisation per pair instead of one per
    term and layer (~120 for a small MLP, most of a GPU pair's fixed cost).
    """
    out: list[torch.Tensor] = []
    for n in names:
        device = vec["delta"][n].device  # type: ignore[union-attr]  (Δ_t always exists)
        flat: dict[str, torch.Tensor] = {}
        for a, b in TERMS:
            va, vb = vec[a][n], vec[b][n]
            if va is None or vb is None:
                out.append(torch.full((), float("nan"), dtype=torch.float64, device=device))
                continue
            for key, v in ((a, va), (b, vb)):
                if key not in flat:
                    flat[key] = v.reshape(-1).double()
            out.append(torch.dot(flat[a], flat[b]))
    if not out:  # a model without parameters: nothing to sum
        return {f"{a}.{b}": np.empty(0) for a, b in TERMS}
    values = torch.stack(out).cpu().numpy().reshape(len(names), len(TERMS))
    return {f"{a}.{b}": values[:, i].copy() for i, (a, b) in enumerate(TERMS)}


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

    Args:
        objective: the model skeleton and loss.
        snap, nxt: snapshots of x_t (with g_t and z_t) and x_{t+1}.
        settings: α grid, device, evaluation dtype, batching, sharpness.
        prev: snapshot of x_{t−1}, for the "previous step" cosines (optional).
        init: snapshot of x_0, for the distance from initialisation (optional).
        ref: snapshot of the reference point x* of ``convexity_ratio_ref`` (optional).
        trainable: names of the coordinates of x (default: every parameter with a gradient).
    """
    if snap.batch is None:
        raise AnalysisError(f"step {snap.step}: snapshot holds no minibatch; cannot probe the pair")
    if nxt.step != snap.step + 1:
        raise AnalysisError(f"pair ({snap.step}, {nxt.step}): steps are not consecutive")
    dev, dt = settings.device, settings.torch_dtype
    names = list(trainable) if trainable is not None else [n for n in snap.params if n in snap.grads]
    check_objective(objective, snap.params, snap.buffers)
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
    batch = _map_batch(snap.batch, dev, dt)
    replay = bool(snap.training) and bool(snap.rng)
    if replay and str(dev).startswith("cuda") and not any(k.startswith("cuda") for k in snap.rng):
        # Random ops (dropout) on a GPU draw from the CUDA generator, whose state this run did not
        # record (it trained on the CPU): masks will differ from training's, and the replay-error
        # metrics will show it. Analyze with device="cpu" to replay them exactly.
        warnings.warn(
            f"the run trained on the CPU but is analyzed on {dev}: random ops (dropout) "
            "cannot be replayed on another device's generator; use --device cpu for exact replay",
            RuntimeWarning, stacklevel=2,
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

    extras: dict[str, float] = {}
    alphas = torch.tensor(settings.alphas, dtype=dt, device=dev)
    with _batchnorm_replay(model):
        loss_line, dloss_line = _line(f, x0, delta, alphas, settings, snap.rng, replay)
        with _replayed_rng(snap.rng, replay):
            G0 = _grad(f, x0)
        with _replayed_rng(snap.rng, replay):
            G1 = _grad(f, x1)
        xref: dict[str, torch.Tensor] | None = None
        if ref is not None:
            xref = {n: _to(ref.params[n], dev, dt) for n in names}
            with torch.no_grad(), _replayed_rng(snap.rng, replay):
                extras["loss_ref"] = float(f(xref))
        if settings.sharpness:
            from trajscope.sharpness import hessian_max_eig

            # The Hessian graph is built by one forward pass under the replayed RNG state: every
            # Hessian-vector product then differentiates through the same dropout mask and the
            # same batch statistics as ℓ and G0.
            try:
                with _replayed_rng(snap.rng, replay):
                    res = hessian_max_eig(f, x0, max_iter=settings.sharpness_max_iter,
                                          tol=settings.lanczos_tol, seed=snap.step)
            except (ObjectiveError, AnalysisError):
                raise
            except RuntimeError as exc:
                raise AnalysisError(
                    f"step {snap.step}: sharpness needs Hessian-vector products (double backward) "
                    f"through the objective, which failed: {exc}; analyze without --sharpness"
                ) from exc
            extras["sharpness"] = res.value
            extras["sharpness_iterations"] = float(res.iterations)
            extras["sharpness_converged"] = float(res.converged)

    vec: dict[str, dict[str, torch.Tensor | None]] = {k: {} for k in VECTORS}
    for n in names:
        g = snap.grads.get(n)
        g = _to(g, dev, dt) if g is not None else torch.zeros_like(x0[n])  # None grad: unused param
        vec["delta"][n] = delta[n]
        vec["G0"][n] = G0[n]
        vec["G1"][n] = G1[n]
        vec["dG"][n] = G1[n] - G0[n]
        vec["g"][n] = g
        vec["G0_err"][n] = G0[n] - g
        vec["x"][n] = x0[n]
        vec["x_ref"][n] = x0[n] - xref[n] if xref is not None else None
        if nxt.has_grad:
            gn = nxt.grads.get(n)
            gn = _to(gn, dev, dt) if gn is not None else torch.zeros_like(x0[n])
            vec["g_next"][n] = gn
            vec["dg"][n] = gn - g
        else:
            vec["g_next"][n] = vec["dg"][n] = None
        if init is not None:
            vec["x_dist"][n] = x0[n] - _to(init.params[n], dev, dt)
        else:
            vec["x_dist"][n] = None
        if prev is not None and prev.step == snap.step - 1 and prev.has_grad:
            gp = prev.grads.get(n)
            vec["g_prev"][n] = _to(gp, dev, dt) if gp is not None else torch.zeros_like(x0[n])
            vec["delta_prev"][n] = x0[n] - _to(prev.params[n], dev, dt)
        else:
            vec["g_prev"][n] = vec["delta_prev"][n] = None
    terms = _layer_terms(vec, names)
    return PairStats(
        step=snap.step,
        alpha=np.asarray(settings.alphas, dtype=np.float64),
        loss_line=loss_line,
        dloss_line=dloss_line,
        terms=terms,
        layers=tuple(names),
        loss_recorded=snap.loss if snap.loss is not None else float("nan"),
        lr=np.asarray(snap.lr, dtype=np.float64),
        extras=extras,
    )


def _grad(f: Any, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """∇f(x) by plain reverse-mode autograd (works with any module, in-place buffers included)."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in x.items()}
    with torch.enable_grad():
        loss = f(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {
        n: (g.detach() if g is not None else torch.zeros_like(x[n]))
        for n, g in zip(leaves, grads)
    }


def _line(f: Any, x0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
          alphas: torch.Tensor, settings: ProbeSettings, rng: Mapping[str, torch.Tensor],
          replay: bool) -> tuple[np.ndarray, np.ndarray]:
    """ℓ(α) and ℓ'(α) at every grid point.

    Batched (the default): all α points in one ``vmap`` over stacked parameters, in chunks that
    shrink automatically when a chunk does not fit in memory. Point by point when
    ``settings.batched`` is False or the model cannot be vmapped (same numbers: both paths build
    x_t + αΔ_t with the same two roundings and run the same jvp; tested).
    """
    with torch.no_grad():
        if settings.batched:
            try:
                return _line_batched(f, x0, delta, alphas, settings.chunk_size, rng, replay,
                                     settings.device)
            except ObjectiveError:
                raise
            except Exception:  # noqa: BLE001 - modules vmap cannot batch: fall back, same result
                pass
        vals, ders = [], []
        try:
            for a in alphas:
                with _replayed_rng(rng, replay):
                    v, d = jvp(f, (_on_line(x0, delta, a),), (delta,))
                vals.append(float(v))
                ders.append(float(d))
        except Exception as exc:
            if _is_oom(exc):
                raise AnalysisError(
                    f"device={settings.device!r}: out of memory evaluating the loss at a single α "
                    "point; the model and minibatch do not fit on this device"
                ) from None
            raise
    return np.array(vals, dtype=np.float64), np.array(ders, dtype=np.float64)


def _on_line(x0: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
             a: torch.Tensor) -> dict[str, torch.Tensor]:
    """x_t + aΔ_t. ``a`` is a 0-d tensor (one point) or shaped ``[k, 1, …]`` (k stacked points):
    the same elementwise multiply-then-add either way, so batched and pointwise inputs are equal
    bit for bit."""
    return {n: x0[n] + a * delta[n] for n in x0}


# α points per vmap call known to fit, per (device, parameter count): learned on out-of-memory so
# that the following pairs start from a size that fits instead of failing again.
_CHUNK_HINTS: dict[tuple[str, int], int] = {}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc)
    # CPU allocation failures surface as plain RuntimeErrors from c10's allocator
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _release_cached_memory(device: str) -> None:
    _STACK_BUFFERS.clear()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


# The [k, …] parameter stacks of the last two chunk shapes (a line split into chunks ends with a
# shorter one), kept between calls; the probe runs one at a time per process. On the CPU a fresh
# k × (model size) allocation cost more than the line evaluation itself: memory freshly handed out
# by glibc was written at ~3 GB/s on the development VM (5.5 ms of the 10.7 ms a batched pair took
# for the 101k-parameter reference MLP at K = 17 and minibatch 16; 0.4 ms into reused buffers).
# CUDA's caching allocator already reuses its blocks.
_STACK_BUFFERS: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}


def _stack_on_line(x0: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                   a: torch.Tensor) -> dict[str, torch.Tensor]:
    """x_t + aΔ_t for k points at once (``a`` of shape [k]), as [k, …] tensors.

    Computed as ``a·Δ`` then ``+ x_t`` into reused buffers: the same two roundings as
    :func:`_on_line`, so every slice equals the pointwise parameters bit for bit (tested).
    """
    first = next(iter(x0.values()))
    if first.device.type != "cpu":
        return {n: x0[n] + a.view((-1,) + (1,) * x0[n].dim()) * delta[n] for n in x0}
    key = (len(a), first.dtype, tuple((n, tuple(t.shape)) for n, t in x0.items()))
    bufs = _STACK_BUFFERS.get(key)
    if bufs is None:
        while len(_STACK_BUFFERS) >= 2:
            del _STACK_BUFFERS[next(iter(_STACK_BUFFERS))]
        bufs = _STACK_BUFFERS[key] = {
            n: torch.empty((len(a),) + tuple(t.shape), dtype=t.dtype) for n, t in x0.items()
        }
    for n, t in x0.items():
        torch.mul(delta[n], a.view((-1,) + (1,) * t.dim()), out=bufs[n])
        bufs[n].add_(t)
    return bufs


def _line_batched(f: Any, x0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                  alphas: torch.Tensor, chunk: int | None, rng: Mapping[str, torch.Tensor],
                  replay: bool, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    # The parameters of a chunk of k points are stacked once, as [k, …] tensors, and vmap maps the
    # jvp over that leading dim. Stacking outside vmap is cheaper than letting vmap broadcast
    # x_t + αΔ_t per op, and the tangent Δ_t stays unbatched, so Δ_t·h products become one large
    # matmul over k·batch rows. randomness="same": one dropout mask for all α, drawn from the
    # replayed state, which is the mask the unbatched evaluation at that state would draw.
    batched = vmap(lambda p: jvp(f, (p,), (delta,)), randomness="same" if replay else "error")
    n = len(alphas)
    key = (device, sum(t.numel() for t in x0.values()))
    size = min(n, max(1, chunk) if chunk else n, _CHUNK_HINTS.get(key, n))
    vals: list[torch.Tensor] = []
    ders: list[torch.Tensor] = []
    i = 0
    while i < n:
        a = alphas[i : i + size]
        stacked: dict[str, torch.Tensor] | None = None
        oom = False
        try:
            with _replayed_rng(rng, replay):
                stacked = _stack_on_line(x0, delta, a)
                v, d = batched(stacked)
        except Exception as exc:
            if size == 1 or not _is_oom(exc):
                raise
            oom = True  # handled below, once the exception (and the memory it pins) is released
        if oom:
            stacked = None
            size = max(1, size // 2)
            _CHUNK_HINTS[key] = size
            _release_cached_memory(device)
            continue
        vals.append(v.detach().double().cpu())
        ders.append(d.detach().double().cpu())
        del stacked, v, d
        i += size
    return torch.cat(vals).numpy(), torch.cat(ders).numpy()
