"""The baseline: a minimal hand-written loop doing the same evaluations as the analyzer.

What a careful user would write without trajscope: one pass over the recorded steps, each snapshot
read once with safetensors (the previous one kept for the "previous step" terms), the loss and its
directional derivative at the K points of the line by ``functional_call`` + ``jvp`` (batched over
α with ``vmap``, or point by point), the two full gradients by autograd, the loss at the reference
point x* (the final state) on the same minibatch, and the same per-layer float64 inner products the
analyzer reduces a pair to. No dask, no persistence, no Dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp, vmap

# The inner products the analyzer keeps per parameter tensor (trajscope.metrics.pair.TERMS; checked at
# run time, so this baseline cannot silently do less work than the analyzer).
TERMS = [("delta", "delta"), ("G0", "G0"), ("G1", "G1"), ("dG", "dG"), ("G0", "delta"),
         ("G1", "delta"), ("g", "g"), ("g", "delta"), ("g_next", "delta"), ("g_next", "g_next"),
         ("dg", "dg"), ("G0_err", "G0_err"), ("x", "x"), ("x_dist", "x_dist"), ("g", "g_prev"),
         ("g_prev", "g_prev"), ("delta", "delta_prev"), ("delta_prev", "delta_prev"), ("G0", "g"),
         ("G0", "x_ref")]


def _read(path: Path) -> dict[str, Any]:
    tensors = safetensors.torch.load(path.read_bytes())
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        meta = json.loads(json.loads(fh.read(n))["__metadata__"]["trajscope"])
    out: dict[str, Any] = {"param": {}, "grad": {}, "batch": {}, "meta": meta}
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        if kind in out:
            out[kind][name] = t
    return out


def hand_loop(run_dir: Path, model: torch.nn.Module, steps: list[int], alphas: list[float],
              device: str = "cpu", batched: bool = True) -> list[dict[str, Any]]:
    """Probe pairs (t, t+1) of a classifier trained with cross-entropy on batches ``(x, y)``,
    for t in ``steps`` (consecutive, all recorded); returns per-pair results."""
    from trajscope.metrics.pair import TERMS as ANALYZER_TERMS

    if set(TERMS) != set(ANALYZER_TERMS):
        raise SystemExit(f"hand loop out of date: the analyzer computes {ANALYZER_TERMS}")
    step_file = lambda s: run_dir / "steps" / f"step_{s:08d}.safetensors"  # noqa: E731
    final = json.loads((run_dir / "trajscope.json").read_text())["final_step"]
    model = model.to(device)
    init = {n: t.to(device) for n, t in _read(step_file(0))["param"].items()}
    xref = {n: t.to(device) for n, t in _read(step_file(final))["param"].items()}
    a = torch.tensor(alphas, device=device)
    prev = _read(step_file(steps[0] - 1)) if steps[0] > 0 else None
    cur = _read(step_file(steps[0]))
    results = []
    for t in steps:
        nxt = _read(step_file(t + 1))
        x0 = {n: v.to(device) for n, v in cur["param"].items()}
        x1 = {n: v.to(device) for n, v in nxt["param"].items()}
        delta = {n: x1[n] - x0[n] for n in x0}
        batch = (cur["batch"]["0"].to(device), cur["batch"]["1"].to(device))

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, p, (batch[0],)), batch[1])

        with torch.no_grad():
            if batched:
                shape = {n: (-1,) + (1,) * v.dim() for n, v in x0.items()}
                stacked = {n: x0[n] + a.view(shape[n]) * delta[n] for n in x0}
                ell, dell = vmap(lambda p: jvp(f, (p,), (delta,)), randomness="same")(stacked)
            else:
                pts = [jvp(f, ({n: x0[n] + ai * delta[n] for n in x0},), (delta,)) for ai in a]
                ell, dell = torch.stack([p[0] for p in pts]), torch.stack([p[1] for p in pts])

        def grad(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            leaves = {n: v.detach().requires_grad_(True) for n, v in x.items()}
            gs = torch.autograd.grad(f(leaves), list(leaves.values()))
            return dict(zip(leaves, gs))

        G0, G1 = grad(x0), grad(x1)
        with torch.no_grad():
            loss_ref = float(f(xref))
        g = {n: v.to(device) for n, v in cur["grad"].items()}
        gn = {n: v.to(device) for n, v in nxt["grad"].items()} if nxt["grad"] else None
        vec: dict[str, Any] = {
            "delta": delta, "G0": G0, "G1": G1, "dG": {n: G1[n] - G0[n] for n in x0}, "g": g,
            "G0_err": {n: G0[n] - g[n] for n in x0}, "x": x0,
            "x_dist": {n: x0[n] - init[n] for n in x0},
            "g_next": gn, "dg": {n: gn[n] - g[n] for n in x0} if gn else None,
            "g_prev": None, "delta_prev": None, "x_ref": {n: x0[n] - xref[n] for n in x0},
        }
        if prev is not None:
            vec["g_prev"] = {n: v.to(device) for n, v in prev["grad"].items()}
            vec["delta_prev"] = {n: x0[n] - prev["param"][n].to(device) for n in x0}
        terms = {}
        for u, v in TERMS:
            if vec[u] is None or vec[v] is None:
                terms[f"{u}.{v}"] = np.full(len(x0), np.nan)
            else:
                terms[f"{u}.{v}"] = np.array([float(torch.sum(vec[u][n].double() * vec[v][n].double()))
                                              for n in x0])
        results.append({"step": t, "loss_line": ell.double().cpu().numpy(),
                        "dloss_line": dell.double().cpu().numpy(), "terms": terms,
                        "loss_ref": loss_ref})
        prev, cur = cur, nxt
    return results
