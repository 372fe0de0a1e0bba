"""The line probe: the expensive part of the analysis, one model re-evaluation task per pair.

For the pair (t, t+1) it evaluates, on the *same* minibatch z_t,

* ℓ(α) = f(x_t + αΔ_t; z_t) and ℓ'(α) = ⟨∇f(x_t + αΔ_t; z_t), Δ_t⟩ on the α grid, by forward-mode
  AD (``torch.func.jvp``: value and directional derivative in one pass), the grid points batched
  with ``torch.func.vmap`` in chunks; or, for a model an op of which has no forward-mode rule, by
  one backward pass per point (``ProbeSettings.derivatives``, decided once per analysis by
  :func:`trajscope.probe.trials.resolve_derivatives`);
* G0 = ∇f(x_t; z_t) and G1 = ∇f(x_{t+1}; z_t) by reverse-mode autograd;

and reduces everything the metrics need to small float64 numbers: the line arrays and, per
parameter tensor ("layer"), the inner products of a fixed set of vectors
(:data:`~trajscope.metrics.pair.TERMS`). Metrics
(:mod:`trajscope.metrics`) are pure functions of these, so no full-size vector leaves this task.

Faithful replay of training conditions (see ``docs/metrics.md``, "Replay fidelity"):

* the model is put in the mode training used (``Snapshot.training``, captured at the step's first
  forward pass);
* a train-mode BatchNorm normalises with the *batch* statistics, so its running statistics do not
  enter ℓ; during the probe such modules have ``track_running_stats`` switched off
  (:func:`~trajscope.probe.stages.batchnorm_replay`), so nothing writes into a buffer and ``vmap``
  can batch the α points; eval-mode BatchNorm reads the recorded running statistics, which nothing
  writes either;
* every evaluation (each α chunk, G0, G1, f(x*), the sharpness graph) runs with the RNG state
  captured at the step's forward pass, so dropout draws the mask training drew, and the same mask
  along the whole line (``vmap(randomness="same")`` draws like the unbatched call: tested).

The stages that run the model are in :mod:`trajscope.probe.stages`, the line evaluation itself
(batching, chunking, the point-by-point fallback) in :mod:`trajscope.probe.line`, the last two
stages in :mod:`trajscope.probe.vectors`.
"""

from __future__ import annotations

import numpy as np

from trajscope.metrics.pair import PairStats
from trajscope.objective import Objective
from trajscope.probe.settings import ProbeSettings
from trajscope.probe.stages import evaluate, prepare
from trajscope.probe.vectors import REPLAY_TERMS, layer_terms, pair_vectors
from trajscope.store.snapshot import Snapshot

__all__ = ["probe_pair"]


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

    Four stages: :func:`~trajscope.probe.stages.prepare` (checks, points on the device, f),
    :func:`~trajscope.probe.stages.evaluate` (ℓ, ℓ', G0, G1, f(x*), sharpness),
    :func:`~trajscope.probe.vectors.pair_vectors` (the :data:`~trajscope.metrics.pair.VECTORS` per
    layer) and :func:`~trajscope.probe.vectors.layer_terms` (the
    :data:`~trajscope.metrics.pair.TERMS` inner products). ``extras["line_batched"]`` is 1.0 when
    ``vmap`` computed the line, 0.0 when it was evaluated point by point.

    Args:
        objective: the model skeleton and loss.
        snap, nxt: snapshots of x_t (with g_t and z_t) and x_{t+1}.
        settings: α grid, device, evaluation dtype, batching, sharpness.
        prev: snapshot of x_{t−1}, for the "previous step" cosines (optional).
        init: snapshot of x_0, for the distance from initialisation (optional).
        ref: snapshot of the reference point x* of ``convexity_ratio_ref`` (optional).
        trainable: the coordinates of x (default: the parameters with a gradient) unless step t
            recorded its own set; changed parameters join them
            (:func:`trajscope.store.snapshot.pair_coordinates`).
    """
    prep = prepare(objective, snap, nxt, settings, ref=ref, trainable=trainable)
    ev = evaluate(prep, snap, settings, ref=ref)
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
