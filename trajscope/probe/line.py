"""The line ℓ(α) = f(x_t + αΔ_t; z_t) and ℓ'(α) = ⟨∇f(x_t + αΔ_t; z_t), Δ_t⟩ on the α grid.

Two derivative paths (``ProbeSettings.derivatives``):

* ``"forward"``: one forward-mode pass per point (``torch.func.jvp``: value and directional
  derivative together). The points are batched with ``torch.func.vmap`` in chunks, or evaluated
  one by one. Under a memory budget (``ProbeSettings.max_memory``, set by every analysis) the chunk
  is planned from one point's measured cost, and a calibration on the first pair picks the faster
  of the two (:mod:`trajscope.probe.line_plan`); without one, all points go in one call and a chunk that
  raises out-of-memory (CUDA) is halved. A model ``vmap`` cannot batch is evaluated point by point
  instead, with the same numbers and a :class:`~trajscope.errors.ProbeWarning` that names the
  reason. An op without a forward-mode AD rule raises :class:`~trajscope.errors.ForwardModeError`
  naming it (:func:`forward_ad_failure`).
* ``"reverse"``: one forward and one backward pass per point (``torch.autograd.grad``), then
  ℓ'(α) = Σ_n ⟨∇_n f, Δ_n⟩ summed in float64. Works wherever training's backward works.

Both build x_t + αΔ_t the same way (:func:`_on_line`) and run every evaluation under the RNG state
captured at the step's forward pass (:func:`replayed_rng`), so they agree to rounding (tested).
With ``sdpa_math``, every evaluation runs with ``F.scaled_dot_product_attention`` held to its math
kernel (:func:`sdpa_math_kernel`), which has forward-mode rules where the fused kernels have none.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.func import jvp, vmap

from trajscope.errors import AnalysisError, ForwardModeError, ObjectiveError, ProbeWarning, one_line

__all__: list[str] = []  # the probe's own (trajscope.probe.stages, .line_plan, .trials)

Loss = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""f(x; z_t) of named parameter tensors, a 0-d tensor."""
Point = Callable[[Loss, dict[str, torch.Tensor], dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
"""(f, x, Δ) ↦ (f(x), ⟨∇f(x), Δ⟩) at one point."""


@contextlib.contextmanager
def replayed_rng(rng: Mapping[str, torch.Tensor], enabled: bool) -> Iterator[None]:
    """Run the block with the RNG state captured at the step's forward pass, then restore."""
    if not enabled or "cpu" not in rng:
        yield
        return
    saved = torch.get_rng_state()
    cuda_saved = {i: torch.cuda.get_rng_state(i) for i in _cuda_devices(rng)}
    try:
        set_rng_states(rng)
        yield
    finally:
        torch.set_rng_state(saved)
        for i, state in cuda_saved.items():
            torch.cuda.set_rng_state(state, i)


def _cuda_devices(rng: Mapping[str, torch.Tensor]) -> list[int]:
    """The CUDA devices of this process that ``rng`` holds a state of (``cuda<i>`` keys)."""
    if not torch.cuda.is_available():
        return []
    found = (int(k[4:]) for k in rng if k.startswith("cuda") and k[4:].isdigit())
    return [i for i in found if i < torch.cuda.device_count()]


def set_rng_states(rng: Mapping[str, torch.Tensor]) -> None:
    """Set the CPU generator (and each CUDA device's present here) to the recorded states."""
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    for i in _cuda_devices(rng):
        torch.cuda.set_rng_state(rng[f"cuda{i}"], i)


def sdpa_math_kernel(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Hold ``F.scaled_dot_product_attention`` to its math kernel while the block runs (when
    ``enabled``). The math kernel computes the same attention from ordinary ops, which have
    forward-mode AD and vmap rules; the fused kernels (flash, memory-efficient) have none."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


_FORWARD_AD_OP = re.compile(r"forward AD with (\S+) that does not support it")


def forward_ad_failure(exc: BaseException) -> str | None:
    """What lacks a forward-mode AD rule, when ``exc`` says that forward mode is not available
    (an aten op without a forward formula, a custom ``autograd.Function`` without ``jvp`` or
    ``setup_context``); None for any other error.

    Returns ``"aten::<op>"``, ``"the custom autograd.Function <Name>"`` or, when torch's message
    does not name it, ``"an op"``.
    """
    if not isinstance(exc, (NotImplementedError, RuntimeError)):
        return None
    msg = str(exc)
    m = _FORWARD_AD_OP.search(msg)
    if m is not None:
        return f"aten::{m.group(1)}"
    if ("custom autograd.Function" in msg and "forward mode AD" in msg) or "functorch transforms" in msg:
        return f"the custom autograd.Function {_custom_function(exc)}"
    low = msg.lower()
    if "forward ad" in low or "forward-mode ad" in low or "forward mode ad" in low:
        return "an op"
    return None


def _custom_function(exc: BaseException) -> str:
    """The name of the ``autograd.Function`` whose ``apply`` raised ``exc`` (from the traceback)."""
    tb = exc.__traceback__
    name = "(unnamed)"
    while tb is not None:
        cls = tb.tb_frame.f_locals.get("cls")
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and cls is not torch.autograd.Function:
            name = cls.__qualname__
        tb = tb.tb_next
    return name


def forward_mode_error(exc: BaseException, what: str) -> ForwardModeError:
    return ForwardModeError(
        f"forward-mode AD failed: {what} used by the loss has no forward-mode AD rule "
        f"({type(exc).__name__}: {one_line(str(exc).splitlines()[0] if str(exc) else '', 200)}); "
        "use --derivatives reverse (or auto)",
        what=what,
    )


def _line(f: Loss, x0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
          alphas: torch.Tensor, settings: Any, rng: Mapping[str, torch.Tensor],
          replay: bool) -> tuple[np.ndarray, np.ndarray]:
    """ℓ(α) and ℓ'(α) at every grid point (float64 arrays); see :func:`line_and_path`."""
    vals, ders, _ = line_and_path(f, x0, delta, alphas, settings, rng, replay)
    return vals, ders


def line_and_path(f: Loss, x0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                   alphas: torch.Tensor, settings: Any, rng: Mapping[str, torch.Tensor],
                   replay: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """ℓ(α), ℓ'(α) at every grid point and whether the batched path computed them.

    Batched (``settings.batched``): all α points in one ``vmap`` over stacked parameters, in
    chunks (``settings.chunk_size``) that shrink automatically when a chunk raises out-of-memory.
    Under a memory budget, :func:`trajscope.probe.line_plan.line_with_plan` plans the chunk instead.
    Point by point when ``settings.batched`` is False, or, with a
    :class:`~trajscope.errors.ProbeWarning` naming the exception, when the batched path fails
    (a module ``vmap`` cannot batch). Both paths build x_t + αΔ_t with the same two roundings and
    run the same jvp, so they give the same numbers (tested). An ObjectiveError (the loss is not
    a scalar) is raised at once: the point loop would only fail the same way.

    ``settings`` is a :class:`~trajscope.probe.settings.ProbeSettings` (``derivatives``, ``batched``,
    ``chunk_size``, ``device``). With ``derivatives="reverse"`` the points are evaluated one by one
    by :func:`reverse_point` (the third result is False). A forward-mode failure raises
    :class:`~trajscope.errors.ForwardModeError` at once, batched or not.
    """
    if getattr(settings, "derivatives", "forward") == "reverse":
        with torch.no_grad():
            vals, ders = line_pointwise(f, x0, delta, alphas, settings.device, rng, replay, reverse_point)
        return vals, ders, False
    return forward_line(f, x0, delta, alphas, settings, rng, replay, batched=settings.batched is not False,
                        chunk=settings.chunk_size)


def forward_line(f: Loss, x0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                 alphas: torch.Tensor, settings: Any, rng: Mapping[str, torch.Tensor],
                 replay: bool, *, batched: bool, chunk: int | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """The forward-mode line: batched in chunks of ``chunk`` points (None: all) when ``batched``,
    falling back to the point loop (with a ProbeWarning) when vmap fails; else point by point."""
    fallback: str | None = None
    with torch.no_grad():
        if batched:
            try:
                vals, ders = line_batched(f, x0, delta, alphas, chunk, rng, replay, settings.device)
                return vals, ders, True
            except ObjectiveError:
                raise
            except Exception as exc:  # noqa: BLE001 - modules vmap cannot batch: the point loop gives the same result
                fallback = vmap_failure(exc)
        try:
            vals, ders = line_pointwise(f, x0, delta, alphas, settings.device, rng, replay, jvp_point)
        except (NotImplementedError, RuntimeError) as exc:
            what = forward_ad_failure(exc)
            if what is None:
                raise
            raise forward_mode_error(exc, what) from None
    if fallback is not None:
        # Warned only once the point loop has succeeded: when it fails too, its error says why.
        warn_fallback(fallback)
    return vals, ders, False


def vmap_failure(exc: Exception) -> str:
    """Why the batched path failed, in one line (the point loop gives the same numbers); raises
    :class:`~trajscope.errors.ForwardModeError` when the point loop would fail the same way."""
    what = forward_ad_failure(exc)
    if what is not None:
        raise forward_mode_error(exc, what) from None
    # Only the text is kept: the exception's frames would pin the failed chunk's memory.
    return f"{type(exc).__name__}: {one_line(exc, 300)}"


def warn_fallback(reason: str) -> None:
    warnings.warn(
        f"the α points of the line could not be evaluated batched with vmap ({reason}); they "
        "were evaluated one by one instead (same numbers, slower)",
        ProbeWarning, stacklevel=4,
    )


def jvp_point(f: Loss, x: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), ⟨∇f(x), Δ⟩) by one forward-mode pass."""
    out = jvp(f, (x,), (delta,))  # (value, tangent): no aux
    return out[0], out[1]


def reverse_point(f: Loss, x: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), ⟨∇f(x), Δ⟩) by one forward and one backward pass: ⟨∇f, Δ⟩ = Σ_n Σ_i ∂f/∂x_{n,i}·Δ_{n,i},
    summed in float64. A parameter the loss does not use contributes 0."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in x.items()}
    with torch.enable_grad():
        v = f(leaves)
        grads = torch.autograd.grad(v, list(leaves.values()), allow_unused=True)
    d = torch.zeros((), dtype=torch.float64, device=v.device)
    for (n, _), g in zip(leaves.items(), grads, strict=True):
        if g is not None:
            d = d + torch.dot(g.reshape(-1).double(), delta[n].reshape(-1).double())
    return v.detach(), d


def line_pointwise(f: Loss, x0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                    alphas: torch.Tensor, device: str, rng: Mapping[str, torch.Tensor],
                    replay: bool, point: Point = jvp_point) -> tuple[np.ndarray, np.ndarray]:
    """ℓ(α), ℓ'(α) by one ``point`` evaluation per grid point (:func:`jvp_point` or
    :func:`reverse_point`), each under the replayed RNG state."""
    vals, ders = [], []
    try:
        for a in alphas:
            with replayed_rng(rng, replay):
                v, d = point(f, _on_line(x0, delta, a), delta)
            vals.append(float(v))
            ders.append(float(d))
    except Exception as exc:
        if _is_oom(exc):
            raise AnalysisError(
                f"device={device!r}: out of memory evaluating the loss at a single α "
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
# shorter one), kept between calls; the probe runs one at a time per process. On the CPU, writing
# a fresh k × (model size) allocation (memory newly handed out by glibc) can cost more than the
# line evaluation itself (docs/performance.md); writing into reused buffers does not. CUDA's caching
# allocator already reuses its blocks.
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


def line_batched(f: Any, x0: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                  alphas: torch.Tensor, chunk: int | None, rng: Mapping[str, torch.Tensor],
                  replay: bool, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """ℓ(α), ℓ'(α) by ``vmap(jvp(f))`` over chunks of α points; raises what vmap raises.

    A chunk that runs out of memory is halved (down to one point) and the size that fit is kept
    in :data:`_CHUNK_HINTS` for the next pairs on this device and model size.
    """
    # The parameters of a chunk of k points are stacked once, as [k, …] tensors, and vmap maps the
    # jvp over that leading dim. Stacking outside vmap is cheaper than letting vmap broadcast
    # x_t + αΔ_t per op, and the tangent Δ_t stays unbatched, so Δ_t·h products become one large
    # matmul over k·batch rows. randomness="same": one dropout mask for all α, drawn from the
    # replayed state, which is the mask the unbatched evaluation at that state would draw.
    batched = vmap(lambda p: jvp_point(f, p, delta), randomness="same" if replay else "error")
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
            with replayed_rng(rng, replay):
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
