"""The reference part of a pair: the two results that depend on the reference point x*.

Of everything a pair task computes for the pair (t, t+1), only two values depend on x*, the
reference point of ``convexity_ratio_ref`` (by default the final recorded state):

* ``extras["loss_ref"]`` = f(x*; z_t), the loss at x* on step t's minibatch (loss units);
* ``terms["G0.x_ref"]`` = ⟨G0, x_t − x*⟩ per parameter tensor, G0 = ∇f(x_t; z_t) (loss units).

They are persisted apart from the rest of the pair (:mod:`trajscope.analysis.persist`), tagged with the
step of x* and the identity of its snapshot (:func:`snapshot_identity`), and recording the identity of
the x_t they were computed at, so that a new x* (a run that gains its final state, or another
``reference=``) recomputes only them:
:func:`probe_reference` costs one backward pass at x_t (for G0) and one forward pass at x*,
where the full probe evaluates the whole line and a second gradient. :func:`split` and
:func:`merge` take a pair's :class:`PairStats` apart and put it back together.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from trajscope.errors import TrajscopeError
from trajscope.metrics.pair import TERMS, VECTORS, PairStats
from trajscope.objective import Objective
from trajscope.probe.line import replayed_rng, sdpa_math_kernel
from trajscope.probe.settings import ProbeSettings
from trajscope.probe.stages import batchnorm_replay, grad, prepare
from trajscope.probe.vectors import Difference, Vectors, layer_terms
from trajscope.store import Snapshot, Storage

__all__ = ["REF_EXTRA", "REF_TERM", "ReferencePart", "merge", "probe_reference", "snapshot_identity",
           "split"]

REF_TERM = "G0.x_ref"
"""The per-layer inner product that depends on x*: ⟨G0, x_t − x*⟩ (a :data:`TERMS` key)."""
REF_EXTRA = "loss_ref"
"""The scalar that depends on x*: f(x*; z_t) (a :attr:`PairStats.extras` key)."""


@dataclass(frozen=True)
class ReferencePart:
    """The results of pair t that depend on the reference point x* (float64).

    Attributes:
        step: t, the pair's start step.
        reference: the step of x*.
        layers: parameter names, the order of ``x_ref``.
        loss_ref: f(x*; z_t); NaN when x* could not be used.
        x_ref: ⟨G0, x_t − x*⟩ per layer (shape ``[n_layer]``); NaN when x* could not be used.
    """

    step: int
    reference: int
    layers: tuple[str, ...]
    loss_ref: float
    x_ref: np.ndarray

    @classmethod
    def absent(cls, step: int, reference: int, layers: tuple[str, ...]) -> ReferencePart:
        """The part of a pair whose x* is unusable (damaged): NaN, as :func:`merge` with None."""
        return cls(step, reference, layers, float("nan"), np.full(len(layers), np.nan))

    def to_tensors(self) -> dict[str, np.ndarray]:
        """Flat name → array mapping, the keys :meth:`PairStats.to_tensors` gives the same values."""
        return {f"extra/{REF_EXTRA}": np.array([self.loss_ref], dtype=np.float64),
                f"term/{REF_TERM}": np.asarray(self.x_ref, dtype=np.float64)}

    @classmethod
    def from_tensors(cls, step: int, reference: int, layers: tuple[str, ...],
                     t: Mapping[str, np.ndarray]) -> ReferencePart:
        return cls(step, reference, layers, float(t[f"extra/{REF_EXTRA}"][0]), t[f"term/{REF_TERM}"])


def split(stats: PairStats, reference: int | None) -> tuple[PairStats, ReferencePart | None]:
    """``stats`` without its reference part, and that part (None when the pair has no f(x*):
    no reference point, or x* was unusable; nothing to keep then)."""
    terms = {k: v for k, v in stats.terms.items() if k != REF_TERM}
    extras = {k: v for k, v in stats.extras.items() if k != REF_EXTRA}
    rest = dataclasses.replace(stats, terms=terms, extras=extras)
    if reference is None or REF_EXTRA not in stats.extras:
        return rest, None
    x_ref = np.asarray(stats.terms.get(REF_TERM, np.full(len(stats.layers), np.nan)), dtype=np.float64)
    return rest, ReferencePart(stats.step, reference, tuple(stats.layers), stats.extras[REF_EXTRA], x_ref)


def merge(stats: PairStats, part: ReferencePart | None) -> PairStats:
    """``stats`` with the reference part ``part``: what the probe gives with x* in one task.

    Without a part (no reference point) the term is NaN and ``loss_ref`` absent, as the probe
    leaves them without x*. The terms keep the order of :data:`TERMS`.

    A part computed alone may cover fewer layers than its pair: the probe's coordinates include
    parameters that changed between x_t and x_{t+1} without a recorded gradient, which a part,
    reading no x_{t+1}, cannot see. Its values then describe another point (x* with those
    parameters held at x_t), so they are not used: the pair's reference values are NaN.
    """
    extras = {k: v for k, v in stats.extras.items() if k != REF_EXTRA}
    x_ref = np.full(len(stats.layers), np.nan)
    if part is not None and tuple(part.layers) == tuple(stats.layers):
        x_ref = np.asarray(part.x_ref, dtype=np.float64)
        extras[REF_EXTRA] = part.loss_ref
    given = {**stats.terms, REF_TERM: x_ref}
    order = [f"{a}.{b}" for a, b in TERMS]
    terms = {k: given[k] for k in order if k in given}
    terms.update({k: v for k, v in given.items() if k not in terms})
    return dataclasses.replace(stats, terms=terms, extras=extras)


def probe_reference(objective: Objective, snap: Snapshot, ref: Snapshot, settings: ProbeSettings, *,
                    trainable: list[str] | None = None) -> ReferencePart:
    """f(x*; z_t) and ⟨G0, x_t − x*⟩ per layer for the pair starting at ``snap`` (x_t, z_t),
    x* = ``ref``: the reference part alone, evaluated as :func:`trajscope.probe.pair.probe_pair`
    evaluates it (the same f from ``prepare``, training's mode, BatchNorm without running-stat
    writes, the step's replayed RNG state, ``settings.sdpa_math``; the inner products summed in
    float64 by the same reduction).

    Costs one backward pass at x_t and one forward pass at x*; x_{t+1} is not read.

    Raises:
        AnalysisError: no minibatch, or x* lacks a coordinate.
        ObjectiveError: the recorded tensors do not fit the objective's model.
    """
    same = dataclasses.replace(snap, step=snap.step + 1)  # f alone is needed: Δ_t = 0 is fine
    prep = prepare(objective, snap, same, settings, ref=ref, trainable=trainable)
    with batchnorm_replay(prep.model), sdpa_math_kernel(settings.sdpa_math):
        with replayed_rng(snap.rng, prep.replay):
            G0 = grad(prep.f, prep.x0)
        xref = prep.on_device(ref.params)
        with torch.no_grad(), replayed_rng(snap.rng, prep.replay):
            loss_ref = float(prep.f(xref))
    vec: Vectors = {k: dict.fromkeys(prep.names) for k in VECTORS}
    vec["delta"].update(prep.delta)
    vec["G0"].update(G0)
    vec["x_ref"].update({n: Difference(prep.x0[n], xref[n]) for n in prep.names})
    x_ref = layer_terms(vec, prep.names)[REF_TERM]
    return ReferencePart(snap.step, ref.step, tuple(prep.names), loss_ref, x_ref)


def snapshot_identity(storage: Storage, step: int) -> str | None:
    """What identifies the parameters of the snapshot of ``step``: 16 hex digits of the SHA-256 of
    every parameter's name, dtype, shape and bytes, in name order; None if it cannot be read.

    The content rather than the file's stat: a run copied without its mtimes, or an HDF5 container
    that grew by new rows, keeps the identity; a snapshot replaced by other parameters changes it.
    """
    try:
        params = storage.read_params(step).params
    except (TrajscopeError, OSError):
        return None
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]
