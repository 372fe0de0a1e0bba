"""The last two stages of the line probe (:func:`trajscope.probe.pair.probe_pair`): the vectors of a pair,
and their inner products per parameter tensor.

:func:`pair_vectors` forms every vector of :data:`~trajscope.metrics.pair.VECTORS` from what the probe
evaluated (G0, G1, Δ_t, …) and what the snapshots recorded (g_t, g_{t±1}, x_0, x_{t−1});
:func:`layer_terms` reduces them to the float64 inner products of :data:`~trajscope.metrics.pair.TERMS`,
the only thing a pair hands to the metrics.

g_t is the gradient the optimizer consumed. A run recorded with ``Recorder(grads=False)`` stores
none; for its steps g_t is recomputed from the replayed G0 = ∇f(x_t; z_t) and the recorded clip
(:func:`consumed_gradient`), and every vector that would need another stored gradient (g_{t+1},
g_{t−1}) or that compares the replay with the stored g_t (G0 − g_t, ⟨G0, g_t⟩) is unavailable: its
terms are NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from trajscope.metrics.pair import TERMS, VECTORS
from trajscope.store.snapshot import Snapshot

if TYPE_CHECKING:
    from trajscope.probe.stages import Evaluation, Prepared

__all__ = ["REPLAY_TERMS", "consumed_gradient", "layer_terms", "pair_vectors"]

Vectors = dict[str, dict[str, torch.Tensor | None]]
"""Vector name → parameter name → tensor (None where the vector is unavailable)."""

REPLAY_TERMS = frozenset({"G0.g"})
"""Terms that compare the replay with the stored g_t. For a step recorded without gradients
(``grads=False``) g_t is c·G0 itself, so they would compare the replay with itself: NaN instead."""


TERMS_CHUNK = 2**22
"""Elements per float64 cast of a vector in :func:`layer_terms` (32 MiB of float64)."""


def layer_terms(vec: Mapping[str, Mapping[str, torch.Tensor | None]], names: Sequence[str],
                unavailable: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Every TERMS inner product ⟨a, b⟩ = Σ_i a_i·b_i per layer, summed in float64; NaN where a
    vector is absent or the term (``"a.b"``) is ``unavailable``.

    Each vector is cast to float64 once per layer, not once per term, :data:`TERMS_CHUNK` elements
    at a time (the float64 copies of all the vectors of a whole 38.6M-element embedding would take
    4 GB); all the products go to the host in one transfer at the end: one device synchronisation
    per pair instead of one per term and layer.
    """
    out: list[torch.Tensor] = []
    for n in names:
        delta = vec["delta"][n]
        assert delta is not None  # Δ_t always exists
        sums = [torch.full((), float("nan"), dtype=torch.float64, device=delta.device)] * len(TERMS)
        for start in range(0, max(1, delta.numel()), TERMS_CHUNK):
            flat: dict[str, torch.Tensor] = {}
            for i, (a, b) in enumerate(TERMS):
                va, vb = vec[a][n], vec[b][n]
                if va is None or vb is None or f"{a}.{b}" in unavailable:
                    continue  # NaN
                for key, v in ((a, va), (b, vb)):
                    if key not in flat:
                        flat[key] = v.reshape(-1)[start:start + TERMS_CHUNK].double()
                part = torch.dot(flat[a], flat[b])
                sums[i] = part if start == 0 else sums[i] + part
        out.extend(sums)
    if not out:  # a model without parameters: nothing to sum
        return {f"{a}.{b}": np.empty(0) for a, b in TERMS}
    values = torch.stack(out).cpu().numpy().reshape(len(names), len(TERMS))
    return {f"{a}.{b}": values[:, i].copy() for i, (a, b) in enumerate(TERMS)}


def _stored(prep: Prepared, s: Snapshot, n: str) -> torch.Tensor:
    """The stored gradient of parameter ``n`` at ``s`` on the evaluation device and dtype; zero
    when the parameter had none (unused in the step)."""
    g = s.grads.get(n)
    return g.to(device=prep.device, dtype=prep.dtype) if g is not None else torch.zeros_like(prep.x0[n])


def consumed_gradient(prep: Prepared, ev: Evaluation, snap: Snapshot) -> dict[str, torch.Tensor | None]:
    """g_t per coordinate, the gradient the optimizer consumed.

    Stored (``grads=True``): the recorded gradient, zero for a parameter without one. Not stored
    (``grads=False``): g_t = c·G0 with c the recorded clip factor of a uniform clip
    (``clip_grad_norm_``; 1 for an unclipped step) on the parameters that had a gradient
    (``Snapshot.grad_names``), zero on the others. It equals the stored g_t up to the replay error.
    None (unavailable) after a non-uniform clip (``clip_grad_value_``): no c·G0 is that gradient.
    """
    if snap.grads_stored or not snap.has_grad:
        return {n: _stored(prep, snap, n) for n in prep.names}
    if snap.clip_factor is not None and not snap.clip_uniform:
        return dict.fromkeys(prep.names)
    c = snap.clip_factor if snap.clip_factor is not None else 1.0
    had = set(snap.grad_names)
    return {n: c * ev.G0[n] if n in had else torch.zeros_like(prep.x0[n]) for n in prep.names}


def pair_vectors(prep: Prepared, ev: Evaluation, snap: Snapshot, nxt: Snapshot, *,
                 prev: Snapshot | None, init: Snapshot | None) -> Vectors:
    """The :data:`VECTORS` of the pair (``snap``, ``nxt``), name → parameter → tensor (None where
    a vector is unavailable).

    g_t is :func:`consumed_gradient`; G0_err = G0 − g_t needs g_t stored. g_next and
    dg = g_{t+1} − g_t need step t+1's gradient stored; x_dist = x_t − x_0 needs ``init``;
    delta_prev = x_t − x_{t−1} needs ``prev`` to be step t−1, and g_prev its gradient stored too;
    x_ref = x_t − x* needs a reference point. A gradient not stored at t−1 or t+1 is not
    recomputed: that would take a backward pass on that step's minibatch.
    """
    x0, delta, G0, G1, xref = prep.x0, prep.delta, ev.G0, ev.G1, ev.xref
    if prev is not None and not (prev.step == snap.step - 1 and prev.has_grad):
        prev = None
    g_t = consumed_gradient(prep, ev, snap)
    x_init = prep.on_device(init.params) if init is not None else None
    x_prev = prep.on_device(prev.params) if prev is not None else None
    g_prev_of = prev if prev is not None and prev.grads_stored else None
    vec: Vectors = {k: {} for k in VECTORS}
    for n in prep.names:
        g = g_t[n]
        vec["delta"][n] = delta[n]
        vec["G0"][n] = G0[n]
        vec["G1"][n] = G1[n]
        vec["dG"][n] = G1[n] - G0[n]
        vec["g"][n] = g
        vec["G0_err"][n] = G0[n] - g if g is not None and snap.grads_stored else None
        vec["x"][n] = x0[n]
        vec["x_ref"][n] = x0[n] - xref[n] if xref is not None else None
        gn = _stored(prep, nxt, n) if nxt.grads_stored else None
        vec["g_next"][n] = gn
        vec["dg"][n] = gn - g if gn is not None and g is not None else None
        vec["x_dist"][n] = x0[n] - x_init[n] if x_init is not None else None
        vec["delta_prev"][n] = x0[n] - x_prev[n] if x_prev is not None else None
        vec["g_prev"][n] = _stored(prep, g_prev_of, n) if g_prev_of is not None else None
    return vec
