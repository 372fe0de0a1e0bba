"""A slow, obviously-correct float64 reference for every metric, independent of trajscope's probe.

It shares nothing with ``trajscope.probe``/``trajscope.metrics``: parameters are flattened into
one float64 vector, loaded into a float64 copy of the model by ``copy_``, and every value comes
from plain reverse-mode autograd evaluated point by point (no jvp, no vmap, no functional_call).
Formulas are transcribed from ``metrics.md``.
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

    def loss_grad(self, vec: torch.Tensor, snap: Any) -> tuple[float, torch.Tensor]:
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
        loss = self.obj.loss(self.model, _to64(snap.batch))
        loss.backward()
        g = torch.cat([
            (params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])).reshape(-1)
            for n in self.names
        ])
        return float(loss.detach()), g.detach().clone()

    def pair(self, t: int, alphas: np.ndarray) -> dict[str, Any]:
        snap, nxt = self.run.snapshot(t), self.run.snapshot(t + 1)
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
        out = {
            "loss_line": np.array(ell),
            "dloss_line": np.array(dell),
            "loss_change": ell[i1] - ell[i0],
            "line_integral_residual": ell[i1] - ell[i0] - simpson(dell[i0 : i1 + 1], h),
            "inst_gap": ell[i1] - ell[i0] - dell[i1],
            "inst_gap_fwd": ell[i0] + dell[i0] - ell[i1],
            "convexity_num": dell[i1],
            "convexity_den": ell[i1] - ell[i0],
            "inst_smoothness": float((G1 - G0).norm() / d.norm()),
            "update_corr": float(g_next @ d) if g_next is not None else float("nan"),
            "update_corr_same_batch": float(G1 @ d),
            "grad_norm": float(g.norm()),
            "update_norm": float(d.norm()),
            "loss_replay_error": abs(ell[i0] - rec) / abs(rec),
            "grad_replay_error": float((G0 - g).norm() / g.norm()),
            "grad_norm_by_layer": np.array([float(p.norm()) for p in self.layers(g)]),
            "update_norm_by_layer": np.array([float(p.norm()) for p in self.layers(d)]),
            "inst_smoothness_by_layer": np.array([
                float(a.norm() / b.norm()) for a, b in zip(self.layers(G1 - G0), self.layers(d))
            ]),
        }
        return out

    def all_pairs(self, steps: list[int], alphas: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.pair(t, alphas) for t in steps]
        out = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        num = np.cumsum(out["convexity_num"])
        den = np.cumsum(out["convexity_den"])
        out["convexity_ratio"] = num / den
        return out
