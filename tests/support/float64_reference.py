"""A slow, obviously-correct float64 reference for every metric, independent of trajscope's probe.

It shares nothing with ``trajscope.probe.pair``/``trajscope.metrics``: parameters are flattened into
one float64 vector, loaded into a float64 copy of the model by ``copy_``, and every value comes
from plain reverse-mode autograd evaluated point by point (no jvp, no vmap, no functional_call).
Training conditions are reproduced the plain way: the model in the recorded mode, the recorded
buffers copied in before every evaluation (a train-mode BatchNorm may then update its own copy:
that does not change the loss), and ``torch.set_rng_state`` with the recorded state before every
evaluation (dropout). Sharpness comes from the dense Hessian (one double-backward per row) and
``numpy.linalg.eigvalsh``, not from Lanczos. Formulas are transcribed from ``metrics.md``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trajscope import Objective, open_run


def _to64(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to64(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _to64(v) for k, v in batch.items()}
    return batch


def div(a: float, b: float) -> float:
    """a / b, NaN when b = 0 (a ratio with an empty denominator is undefined, not infinite)."""
    return a / b if b != 0 else float("nan")


def norm(v: torch.Tensor | None) -> float:
    """‖v‖, NaN for a vector that is not available."""
    return float(v.norm()) if v is not None else float("nan")


def cos(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """⟨a, b⟩ / (‖a‖‖b‖), NaN when either vector is not available."""
    if a is None or b is None:
        return float("nan")
    return div(float(a @ b), float(a.norm() * b.norm()))


def simpson(y: list[float], h: float) -> float:
    n = len(y) - 1
    if n % 2:  # odd number of intervals: trapezoid
        return h * (y[0] / 2 + sum(y[1:-1]) + y[-1] / 2)
    total = y[0] + y[-1]
    for i in range(1, n):
        total += (4 if i % 2 else 2) * y[i]
    return h / 3 * total


class Reference:
    """Float64 re-evaluation of one run, point by point."""

    def __init__(self, run_dir: Path, factory: Callable[[], Objective]) -> None:
        self.run = open_run(run_dir)
        self.obj = factory()
        self.model = copy.deepcopy(self.obj.model).double()
        self.names = self.run.trainable
        params = dict(self.model.named_parameters())
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]

    def flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].double().reshape(-1) if n in tensors else torch.zeros(k, dtype=torch.float64)
                          for n, k in zip(self.names, self.sizes)])

    def layers(self, v: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(v, self.sizes))

    def _load(self, vec: torch.Tensor, snap: Any) -> dict[str, torch.nn.Parameter]:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in snap.params.items():
                if n not in self.names:
                    params[n].copy_(t.double())
            for n, piece, shape in zip(self.names, self.layers(vec), self.shapes):
                params[n].copy_(piece.view(shape))
            for n, b in self.model.named_buffers():
                if n in snap.buffers:
                    b.copy_(snap.buffers[n].to(b.dtype))
        self.model.train(bool(snap.training))
        self.model.zero_grad(set_to_none=True)
        return params

    def _loss(self, snap: Any) -> torch.Tensor:
        # the recorded RNG state for dropout; the caller's RNG stream is left as it was
        with torch.random.fork_rng(devices=[]):
            if snap.training and "cpu" in snap.rng:
                torch.set_rng_state(snap.rng["cpu"])
            return self.obj.loss(self.model, _to64(snap.batch))

    def loss_grad(self, vec: torch.Tensor, snap: Any) -> tuple[float, torch.Tensor]:
        params = self._load(vec, snap)
        loss = self._loss(snap)
        loss.backward()
        g = torch.cat([
            (params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])).reshape(-1)
            for n in self.names
        ])
        return float(loss.detach()), g.detach().clone()

    def hessian_max_eig(self, vec: torch.Tensor, snap: Any) -> float:
        """λ_max of the dense Hessian at ``vec`` on the snapshot's batch (row by row)."""
        params = self._load(vec, snap)
        leaves = [params[n] for n in self.names]
        loss = self._loss(snap)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        g = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                       for gi, p in zip(grads, leaves)])
        n = g.numel()
        H = np.zeros((n, n))
        if g.requires_grad:
            for i in range(n):
                row = torch.autograd.grad(g[i], leaves, retain_graph=True, allow_unused=True)
                H[i] = torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1)
                                  for r, p in zip(row, leaves)]).numpy()
        H = (H + H.T) / 2
        return float(np.linalg.eigvalsh(H)[-1])

    def pair(self, t: int, alphas: np.ndarray, *, sharpness: bool = False,
             reference: int | None = None) -> dict[str, Any]:
        run = self.run
        snap, nxt = run.snapshot(t), run.snapshot(t + 1)
        x0, x1 = self.flat(snap.params), self.flat(nxt.params)
        d = x1 - x0
        ell, dell = [], []
        for a in alphas:
            v, g = self.loss_grad(x0 + float(a) * d, snap)
            ell.append(v)
            dell.append(float(g @ d))
        i0 = int(np.argmin(np.abs(alphas)))
        i1 = int(np.argmin(np.abs(alphas - 1)))
        _, G0 = self.loss_grad(x0, snap)
        _, G1 = self.loss_grad(x1, snap)
        g = self.flat(snap.grads)
        g_next = self.flat(nxt.grads) if nxt.has_grad else None
        h = float(alphas[1] - alphas[0])
        rec = snap.loss if snap.loss is not None else float("nan")
        nan = float("nan")
        lr = snap.lr[0]
        clip = snap.clip_factor if snap.clip_factor is not None and snap.clip_uniform else 1.0
        # neighbours: x_{t−1} (a recorded step, not the final state), x_0, the reference x*
        prev = run.snapshot(t - 1) if (t - 1) in run.steps and t - 1 != run.final_step else None
        x_init = self.flat(run.snapshot(0).params) if 0 in run.steps else None
        ref_step = reference if reference is not None else run.final_step  # no final: no x*
        x_ref = self.flat(run.snapshot(ref_step).params) if ref_step is not None else None
        loss_ref = self.loss_grad(x_ref, snap)[0] if x_ref is not None else nan
        g_prev = self.flat(prev.grads) if prev is not None else None
        d_prev = x0 - self.flat(prev.params) if prev is not None else None

        sq = float(d @ d)
        gap = ell[i1] - ell[i0] - dell[i1]
        pathwise = max((dell[j] - dell[i0]) / (float(alphas[j]) * sq)
                       for j in range(len(alphas)) if 0 < alphas[j] <= 1)
        smooth = float((G1 - G0).norm() / d.norm())
        out = {
            "loss_line": np.array(ell),
            "dloss_line": np.array(dell),
            "loss_change": ell[i1] - ell[i0],
            "line_integral_residual": ell[i1] - ell[i0] - simpson(dell[i0 : i1 + 1], h),
            "line_argmin": float(alphas[int(np.argmin(ell))]),
            "inst_gap": gap,
            "inst_gap_fwd": ell[i0] + dell[i0] - ell[i1],
            "convexity_num": dell[i1],
            "convexity_den": ell[i1] - ell[i0],
            "convexity_ref_num": float(G0 @ (x0 - x_ref)) if x_ref is not None else nan,
            "convexity_ref_den": ell[i0] - loss_ref,
            "weak_convexity": max(0.0, 2 * gap / sq),
            "directional_curvature": 2 * (ell[i1] - ell[i0] - dell[i0]) / sq,
            "inst_smoothness": smooth,
            "inst_smoothness_xbatch": norm(g_next - g) / norm(d) if g_next is not None else nan,
            "pathwise_smoothness": pathwise,
            "stability_ratio": smooth * lr / 2,
            "update_corr": float(g_next @ d) if g_next is not None else nan,
            "update_corr_same_batch": float(G1 @ d),
            "grad_norm": float(g.norm()),
            "update_norm": float(d.norm()),
            "param_norm": float(x0.norm()),
            "dist_from_init": norm(x0 - x_init) if x_init is not None else nan,
            "grad_cos_prev": cos(g, g_prev),
            "update_cos_prev": cos(d, d_prev),
            "update_grad_cos": cos(d, -g),
            "effective_lr": float(d.norm() / g.norm()),
            "replay_grad_norm": float(G0.norm()),
            "loss_replay_error": abs(ell[i0] - rec) / abs(rec),
            "loss_resolution": nan,  # evaluated without autocast: nothing rounds below the dtype
            # a uniform recorded clip c: training consumed g_t = c·G0
            "grad_replay_error": float((clip * G0 - g).norm() / g.norm()),
            "clip_factor": snap.clip_factor if snap.clip_factor is not None else 1.0,
            "grad_replay_cos": cos(G0, g),
        }
        out |= self._by_layer(g=g, d=d, G0=G0, G1=G1, x0=x0, x_dist=x0 - x_init if x_init is not None else None,
                              g_prev=g_prev, d_prev=d_prev)
        if sharpness:
            out["sharpness"] = self.hessian_max_eig(x0, snap)
        return out

    def _by_layer(self, *, g: torch.Tensor, d: torch.Tensor, G0: torch.Tensor, G1: torch.Tensor,
                  x0: torch.Tensor, x_dist: torch.Tensor | None, g_prev: torch.Tensor | None,
                  d_prev: torch.Tensor | None) -> dict[str, np.ndarray]:
        """The ``<name>_by_layer`` values: each metric on each parameter tensor's slice."""

        def by_layer(fn: Callable[..., float], *vs: torch.Tensor | None) -> np.ndarray:
            if any(v is None for v in vs):
                return np.full(len(self.sizes), float("nan"))
            return np.array([fn(*parts) for parts in zip(*(self.layers(v) for v in vs))])

        return {
            "grad_norm_by_layer": by_layer(lambda a: float(a.norm()), g),
            "update_norm_by_layer": by_layer(lambda a: float(a.norm()), d),
            "inst_smoothness_by_layer": by_layer(lambda a, b: div(float(a.norm()), float(b.norm())), G1 - G0, d),
            "param_norm_by_layer": by_layer(lambda a: float(a.norm()), x0),
            "dist_from_init_by_layer": by_layer(lambda a: float(a.norm()), x_dist),
            "grad_cos_prev_by_layer": by_layer(cos, g, g_prev),
            "update_cos_prev_by_layer": by_layer(cos, d, d_prev),
            "update_grad_cos_by_layer": by_layer(lambda a, b: cos(a, -b), d, g),
            "effective_lr_by_layer": by_layer(lambda a, b: div(float(a.norm()), float(b.norm())), d, g),
            "replay_grad_norm_by_layer": by_layer(lambda a: float(a.norm()), G0),
        }

    def all_pairs(self, steps: list[int], alphas: np.ndarray, *, sharpness: bool = False,
                  reference: int | None = None) -> dict[str, np.ndarray]:
        rows = [self.pair(t, alphas, sharpness=sharpness, reference=reference) for t in steps]
        out = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        # series over the analyzed pairs, in order (NaN terms add nothing to a running sum, which is
        # NaN before its first defined term)
        out["convexity_ratio"] = np.cumsum(out["convexity_num"]) / np.cumsum(out["convexity_den"])
        out["convexity_ratio_ref"] = (np.cumsum(out["convexity_ref_num"])
                                      / np.cumsum(out["convexity_ref_den"]))
        L = np.array([max(out["inst_smoothness"][: i + 1]) for i in range(len(steps))])
        i0 = int(np.argmin(np.abs(alphas)))
        out["descent_lemma_gap"] = (out["loss_change"] - out["dloss_line"][:, i0]
                                    - L / 2 * out["update_norm"] ** 2)
        uc = out["update_corr"]
        out["update_corr_cumsum"] = np.where(np.cumsum(~np.isnan(uc)) > 0, np.cumsum(np.nan_to_num(uc, nan=0.0)),
                                             np.nan)
        out["loss_change_cumsum"] = np.cumsum(out["loss_change"])
        return out


PROPERTY_CHECKS: dict[str, Callable[[np.ndarray], bool]] = {
    # Solver diagnostics have no reference value; they must say the solver did its job.
    "sharpness_converged": lambda v: bool(np.all(v == 1)),
    "sharpness_iterations": lambda v: bool(np.all((v >= 1) & (v <= 100) & (v == np.round(v)))),
}
"""Produced variables that are checked by a property instead of a reference value."""


def assert_matches_reference(ds: Any, ref: dict[str, np.ndarray]) -> None:
    """Every variable of the analyzer's Dataset ``ds`` equals the reference ``ref`` (from
    :meth:`Reference.all_pairs`) or passes its :data:`PROPERTY_CHECKS`; none is left unchecked."""
    checked = set()
    for name, want in ref.items():
        got = ds[name].values
        scale = np.nanmax(np.abs(want))
        if name in ("line_integral_residual", "descent_lemma_gap", "convexity_ref_den"):
            # differences of O(loss) numbers: rounding is relative to the loss, not to the result
            scale = np.nanmax(np.abs(ref["loss_line"]))
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * scale, err_msg=name)
        assert ds[name].attrs["description"], name
        checked.add(name)
    for name, ok in PROPERTY_CHECKS.items():
        if name in ds:
            assert ok(ds[name].values), (name, ds[name].values)
            checked.add(name)
    produced = {v for v in ds.data_vars}
    # every variable the analyzer produces is covered by the reference
    assert produced <= checked, produced - checked
