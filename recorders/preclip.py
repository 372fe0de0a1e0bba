"""The gradient norm before clipping, and the clip factor a recorded step's optimizer saw.

Clipping (``clip_grad_norm_``, ``clip_grad_value_``) rescales ``p.grad`` in place between backward
and ``optimizer.step()``: the recorded g_t is the clipped gradient, the analyzer's replayed
∇f(x_t; z_t) is not. :class:`PreclipNorms` measures both norms so that the replay can compare
c·∇f with g_t (``docs/recording.md``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trajscope.recorders.hooks import grad_hooks
from trajscope.recorders.sharded import Sharding

__all__ = ["PreclipNorms"]


class PreclipNorms:
    """The pre-clip gradient norm of a recorded step, and the clip the optimizer step saw.

    Clipping (``clip_grad_norm_``, ``clip_grad_value_``) rescales ``p.grad`` in place after
    backward and before ``optimizer.step()``, so the stored g_t is the clipped gradient while the
    analyzer's replayed ∇f(x_t; z_t) is not. :meth:`on_grad` runs from each trainable parameter's
    post-accumulate-grad hook (armed on recorded steps only) and keeps ‖∂f/∂p‖² as backward
    completed it: with gradient accumulation each micro-batch's firing overwrites the last, so
    the step sees the accumulated gradient. The squares stay float64 tensors on the parameter's
    device; :meth:`measure` syncs with the host once per recorded step. The recorder arms the
    hooks in a single process and under FSDP2 (whose hooks fire on the sharded gradient the
    optimizer consumes, summed over the ranks in :meth:`measure`), not under DDP: there ``p.grad``
    is averaged over the ranks after its hook fired, so the two norms would not describe the same
    gradient.
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

    def measure(self, grad_scaler: Any, meta: dict[str, Any], share: Sharding | None = None) -> None:
        """Add the clip fields to ``meta`` when the consumed gradient is a rescaled pre-clip one.

        With c = ‖g_consumed‖ / ‖g_preclip‖ over the parameters whose gradient both saw:
        ``grad_norm_preclip`` (‖g_preclip‖), ``clip_factor`` (c) and ``clip_uniform`` (every
        parameter's own ratio equals c within rounding, as ``clip_grad_norm_`` scales). Nothing is
        added for a uniform c that is 1 within rounding, or an exact power of two: that is a
        loss-scale unscale (AMP ``GradScaler``), not a clip. A non-uniform rescale is recorded
        whatever its global c. The pre-clip norms are divided by
        ``grad_scaler``'s scale S (the scale the backward's gradients carried; 1 without a scaler).
        Under sharding (``share``; collective, every rank calls it) the squares of the local shards
        are summed over the ranks (:meth:`Sharding.counts` says which pieces count), so the norms
        are the whole gradient's.
        """
        if not self._handles:
            return
        loss_scale = 1.0
        if grad_scaler is not None and grad_scaler.is_enabled():
            loss_scale = float(grad_scaler.get_scale())  # update() runs after step: S of this backward
        pairs = [(p, self._sq[id(p)]) for p in self._params
                 if p.grad is not None and p.grad.layout == torch.strided and id(p) in self._sq
                 and (share is None or share.counts(p))]
        self.clear()
        if not pairs and share is None:
            return
        dev = pairs[0][1].device if pairs else torch.device("cpu")
        pre = torch.stack([s.to(dev) for _, s in pairs] or [torch.zeros((), dtype=torch.float64)]) / (
            float(loss_scale) ** 2)
        post = torch.stack([_sq_norm(p.grad).to(dev) for p, _ in pairs]  # type: ignore[arg-type]
                           or [torch.zeros((), dtype=torch.float64)])
        # Per-parameter deviation of the ratio from c (relative); a parameter whose pre-clip
        # gradient is 0 but whose consumed one is not was not rescaled at all: infinite.
        ratio = torch.sqrt(post / torch.where(pre > 0, pre, torch.ones_like(pre)))
        if share is None:
            pre_sum, post_sum = pre.sum(), post.sum()
            c = torch.sqrt(post_sum / pre_sum)
            dev_i = torch.where(pre > 0, (ratio - c).abs() / c, torch.where(post > 0, torch.inf, 0.0)).max()
        else:  # one collective: every rank's sums and extreme ratios; max |ratio - c| is at one of those
            inf = torch.tensor(torch.inf, dtype=torch.float64, device=dev)
            every = share.gather(torch.stack([
                pre.sum(), post.sum(), torch.where(pre > 0, ratio, -inf).max(),
                torch.where(pre > 0, -ratio, -inf).max(), ((pre == 0) & (post > 0)).any().to(torch.float64)]))
            pre_sum, post_sum = every[:, 0].sum(), every[:, 1].sum()
            c = torch.sqrt(post_sum / pre_sum)
            top, low = every[:, 2].max(), -every[:, 3].max()
            dev_i = torch.where(every[:, 4].max() > 0, inf, torch.maximum(top - c, c - low).clamp(min=0) / c)
        pre_norm, factor, spread = torch.stack([pre_sum.sqrt(), c, dev_i]).tolist()
        eps = max([torch.finfo(p.grad.dtype).eps for p, _ in pairs]  # type: ignore[union-attr]
                  or [torch.finfo(torch.float32).eps])
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
    """‖g‖² in float64, on g's device; of a DTensor's local shard (a norm of the DTensor itself would
    be a collective, here called from backward hooks)."""
    local = g.to_local() if hasattr(g, "to_local") else g
    return torch.linalg.vector_norm(local.detach(), dtype=torch.float64).square()
