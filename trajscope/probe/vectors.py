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
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from trajscope.metrics.pair import TERMS, VECTORS
from trajscope.store.snapshot import Snapshot

if TYPE_CHECKING:
    from trajscope.probe.stages import Evaluation, Prepared

__all__ = ["REPLAY_TERMS", "Difference", "consumed_gradient", "layer_terms", "pair_vectors"]

class Difference(NamedTuple):
    """The vector ``a − b`` of one parameter, formed a chunk at a time where it is summed
    (:func:`layer_terms`): a pair never holds its difference vectors whole, which for a large model
    are several parameter-sized tensors. Each chunk is subtracted in the operands' dtype, so the
    sums equal those of the whole difference formed first."""

    a: torch.Tensor
    b: torch.Tensor


Vector = torch.Tensor | Difference
Vectors = dict[str, dict[str, Vector | None]]
"""Vector name → parameter name → tensor or :class:`Difference` (None where the vector is unavailable)."""


def _numel(v: Vector) -> int:
    return v.a.numel() if isinstance(v, Difference) else v.numel()

REPLAY_TERMS = frozenset({"G0.g"})
"""Terms that compare the replay with the stored g_t. For a step recorded without gradients
(``grads=False``) g_t is c·G0 itself, so they would compare the replay with itself: NaN instead."""


TERMS_CHUNK = 2**22
"""Elements per float64 cast of a vector in :func:`layer_terms` (32 MiB of float64)."""


def layer_terms(vec: Mapping[str, Mapping[str, Vector | None]], names: Sequence[str],
                unavailable: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Every TERMS inner product ⟨a, b⟩ = Σ_i a_i·b_i per layer, summed in float64; NaN where a
    vector is absent or the term (``"a.b"``) is ``unavailable``.

    Each vector (a :class:`Difference` formed there) is cast to float64 once per layer, not once
    per term, :data:`TERMS_CHUNK` elements at a time (the float64 copies of all the vectors of a
    whole 38.6M-element embedding would take 4 GB), into buffers reused from chunk to chunk
    (:class:`_Chunks`); all the products go to the host in one transfer at the end: one device
    synchronisation per pair instead of one per term and layer.
    """
    out: list[torch.Tensor] = []
    chunks: _Chunks | None = None
    for n in names:
        delta = vec["delta"][n]
        assert delta is not None  # Δ_t always exists
        device = delta.a.device if isinstance(delta, Difference) else delta.device
        if chunks is None:
            chunks = _Chunks(min(TERMS_CHUNK, max(_numel(vec["delta"][m]) for m in names)), device)  # type: ignore[arg-type]
        sums = [torch.full((), float("nan"), dtype=torch.float64, device=device)] * len(TERMS)
        for start in range(0, max(1, _numel(delta)), TERMS_CHUNK):
            flat: dict[str, torch.Tensor] = {}
            for i, (a, b) in enumerate(TERMS):
                va, vb = vec[a][n], vec[b][n]
                if va is None or vb is None or f"{a}.{b}" in unavailable:
                    continue  # NaN
                for key, v in ((a, va), (b, vb)):
                    if key not in flat:
                        flat[key] = chunks.float64(key, v, start)
                part = torch.dot(flat[a], flat[b])
                sums[i] = part if start == 0 else sums[i] + part
        out.extend(sums)
    if not out:  # a model without parameters: nothing to sum
        return {f"{a}.{b}": np.empty(0) for a, b in TERMS}
    values = torch.stack(out).cpu().numpy().reshape(len(names), len(TERMS))
    return {f"{a}.{b}": values[:, i].copy() for i, (a, b) in enumerate(TERMS)}


class _Chunks:
    """The float64 chunks of :func:`layer_terms`, written into one buffer per vector (and one
    scratch buffer per dtype for the differences), allocated once per call: fresh blocks per chunk
    would be freed between small allocations that split them, so the heap could not reuse them and
    the resident set would grow chunk after chunk (by several GB over GPT-2's embedding)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = max(1, size), device
        self.buffers: dict[str, torch.Tensor] = {}
        self.scratch: dict[torch.dtype, torch.Tensor] = {}

    def _buffer(self, store: dict[Any, torch.Tensor], key: Any, dtype: torch.dtype) -> torch.Tensor:
        if key not in store:
            store[key] = torch.empty(self.size, dtype=dtype, device=self.device)
        return store[key]

    def float64(self, key: str, v: Vector, start: int) -> torch.Tensor:
        """Elements ``start`` … ``start + TERMS_CHUNK`` of ``v`` in float64 (a view of a buffer
        that the next chunk overwrites). A difference is subtracted in its operands' dtype, as the
        whole difference would be, then cast."""
        m = max(0, min(self.size, _numel(v) - start))
        out = self._buffer(self.buffers, key, torch.float64)[:m]
        if isinstance(v, Difference):
            a, b = (t.reshape(-1)[start:start + m] for t in (v.a, v.b))
            if a.dtype == torch.float64:
                return torch.sub(a, b, out=out)
            return out.copy_(torch.sub(a, b, out=self._buffer(self.scratch, a.dtype, a.dtype)[:m]))
        return out.copy_(v.reshape(-1)[start:start + m])


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
    recomputed: that would take a backward pass on that step's minibatch. The differences are
    :class:`Difference` values, formed chunk by chunk where they are summed.
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
        vec["dG"][n] = Difference(G1[n], G0[n])
        vec["g"][n] = g
        vec["G0_err"][n] = Difference(G0[n], g) if g is not None and snap.grads_stored else None
        vec["x"][n] = x0[n]
        vec["x_ref"][n] = Difference(x0[n], xref[n]) if xref is not None else None
        gn = _stored(prep, nxt, n) if nxt.grads_stored else None
        vec["g_next"][n] = gn
        vec["dg"][n] = Difference(gn, g) if gn is not None and g is not None else None
        vec["x_dist"][n] = Difference(x0[n], x_init[n]) if x_init is not None else None
        vec["delta_prev"][n] = Difference(x0[n], x_prev[n]) if x_prev is not None else None
        vec["g_prev"][n] = _stored(prep, g_prev_of, n) if g_prev_of is not None else None
    return vec
