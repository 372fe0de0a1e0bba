"""Trouble the analysis works around instead of stopping: damaged or missing snapshots, non-finite
values, zero-length updates.

* A damaged or missing snapshot costs only the pairs that need it. Reading it
  (:meth:`trajscope.analysis.loading.SnapshotRef.resolve`) hands its
  :class:`~trajscope.errors.RunFormatError` to the pair task as a :class:`BadSnapshot` value,
  the pair task turns it into a :class:`SkippedPair` (:func:`skip_reason`), and the Dataset lists
  every skipped pair and why in its ``skipped_pairs`` attribute (:func:`record_skipped`), with a
  :class:`~trajscope.errors.DamagedRunWarning`.
* Non-finite values (NaN/Inf in parameters, gradients, losses, or in the replay) never stop the
  analysis: the affected metrics are NaN (never ±Inf) and the ``pair_flags`` coordinate says why,
  bit by bit, in the CF ``flag_masks``/``flag_meanings`` convention (:func:`pair_flags`).
* A zero-length update (Δ_t = 0) makes ratio metrics 0/0: they are NaN and flagged
  ``zero_update`` (whole step) or ``zero_update_layer`` (some parameter tensors did not move).
* A replay that disagrees with training (wrong objective, missing ``zero_grad``, a batch changed
  after ``rec.batch``) does not stop the analysis either, but is never silent: the replay gate
  (:func:`replay_failures`) counts the pairs whose ``loss_replay_error`` or ``grad_replay_error``
  exceeds its bound (a NaN error, e.g. ``grad_replay_error`` of a run that stores no gradients, is
  not available: it counts neither way), and the analysis warns (:func:`replay_warning`) and the
  headline says so when there are more than a few.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from trajscope import runformat as fmt
from trajscope.errors import DamagedRunWarning, TrajscopeError
from trajscope.metrics.registry import get_metrics, holds_bound
from trajscope.store.names import first, mismatches, shapes

if TYPE_CHECKING:
    import torch
    import xarray as xr

    from trajscope.metrics.pair import PairStats
    from trajscope.store import Run, Snapshot

__all__ = [
    "FLAGS",
    "SkippedPair",
    "BadSnapshot",
    "snapshot_problem",
    "skip_reason",
    "usable",
    "pair_flags",
    "flags_for",
    "losses_given",
    "sanitize_values",
    "add_flags",
    "record_skipped",
    "ReplayCheck",
    "replay_bound",
    "replay_failures",
    "replay_warning",
    "nonfinite_loss_warning",
    "nothing_computed",
    "unrecorded_warning",
]

FLAGS: dict[str, tuple[int, str]] = {
    "nonfinite_params": (1, "x_t or x_{t+1} holds NaN/Inf"),
    "nonfinite_grad": (2, "the recorded gradient g_t holds NaN/Inf"),
    "nonfinite_loss": (4, "the recorded loss f(x_t; z_t) is NaN/Inf"),
    "nonfinite_replay_loss": (8, "the replayed ℓ(α) or ℓ'(α) is NaN/Inf somewhere on the grid"),
    "nonfinite_replay_grad": (16, "a replayed gradient G0 or G1 holds NaN/Inf"),
    "zero_update": (32, "Δ_t = 0: x_{t+1} = x_t, so ratios over ‖Δ_t‖ are NaN"),
    "zero_update_layer": (64, "some (not all) parameter tensors have a zero update"),
    "nonfinite_next_grad": (128, "the next step's recorded gradient g_{t+1} holds NaN/Inf"),
    "clipped": (256, "training clipped g_t uniformly (clip_factor c): the replay compares c·G0 with g_t"),
    "clipped_nonuniform": (512, "training clipped g_t non-uniformly (e.g. clip_grad_value_): the "
                                "replay compares the unclipped G0 with g_t, so grad_replay_error shows it"),
    "unrecorded_update": (1024, "a parameter without a recorded gradient changed between x_t and x_{t+1} (the "
                                "trainable set changed during training and the run does not record it): it "
                                "is a coordinate of x, its g_t counts as 0, so grad_replay_error shows it"),
    "below_resolution": (2048, "evaluated under training's autocast, |loss_change| or |inst_gap| is at most "
                               "twice loss_resolution (the rounding of one evaluation of ℓ): its sign cannot "
                               "be told at this precision, so the headline fractions leave the pair out"),
}
"""``pair_flags`` bits: name → (mask, meaning). The clip bits describe training, not a problem."""

NONFINITE = 1 | 2 | 4 | 8 | 16 | 128
CLIPPED = 256 | 512
"""The bits that describe training (a clip) rather than a problem."""


# --- damage is local -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedPair:
    """A pair the analysis could not compute because its data is damaged or missing."""

    step: int
    reason: str


@dataclass(frozen=True)
class BadSnapshot:
    """A snapshot that failed to load, passed as a value to the pair tasks that need it."""

    step: int
    reason: str


def snapshot_problem(snap: Snapshot | BadSnapshot, model: torch.nn.Module) -> str | None:
    """Why a loaded snapshot cannot be used with ``model`` (None: it can).

    ``model`` is the objective's model, already checked against the run's manifest, so a snapshot
    that disagrees with it is damaged: one that failed to load, lacks a parameter, holds one the
    run does not have, or has a parameter or buffer of another shape.
    """
    if isinstance(snap, BadSnapshot):
        return snap.reason
    slots = shapes(dict(model.named_parameters()))
    m = first(mismatches(slots, shapes(snap.params)))
    if m is not None and m.kind == "missing":
        return f"step {snap.step}: snapshot lacks parameter {m.name!r}"
    if m is not None and m.kind == "shape":
        return (f"step {snap.step}: parameter {m.name!r} has shape {m.actual}, the run's "
                f"parameter has {m.expected}")
    if m is not None:
        return f"step {snap.step}: snapshot holds parameter {m.name!r}, which the run does not have"
    b = first(mismatches(shapes(dict(model.named_buffers())), shapes(snap.buffers)), "shape")
    if b is not None:
        return (f"step {snap.step}: buffer {b.name!r} has shape {b.actual}, the model's has "
                f"{b.expected}")
    return None


def skip_reason(snap: Snapshot | BadSnapshot, nxt: Snapshot | BadSnapshot,
                model: torch.nn.Module) -> SkippedPair | None:
    """Why the pair of these loaded snapshots cannot be probed with ``model`` (None: it can).

    Catches what would otherwise abort the whole analysis: a snapshot that failed to load or
    disagrees with the run (:func:`snapshot_problem`), a step snapshot without its minibatch.
    """
    step = nxt.step - 1 if isinstance(snap, BadSnapshot) else snap.step
    for s in (snap, nxt):
        why = snapshot_problem(s, model)
        if why is not None:
            return SkippedPair(step, why)
    if isinstance(snap, BadSnapshot):  # reported by snapshot_problem above
        return SkippedPair(step, snap.reason)
    if snap.batch is None:
        return SkippedPair(step, f"step {step}: snapshot holds no minibatch")
    return None


def usable(snap: Snapshot | BadSnapshot | None, model: torch.nn.Module) -> Snapshot | None:
    """``snap`` if it can serve as a neighbour (x_{t-1}, x_0) of a pair, else None: a damaged
    neighbour costs only the terms that need it (they are NaN), not the pair."""
    if snap is None or isinstance(snap, BadSnapshot) or snapshot_problem(snap, model) is not None:
        return None
    return snap


def record_skipped(ds: xr.Dataset, skipped: Mapping[int, str], total: int) -> xr.Dataset:
    """Warn about skipped pairs and list them in ``ds.attrs['skipped_pairs']`` (JSON)."""
    items = [{"step": int(t), "reason": r} for t, r in sorted(skipped.items())]
    ds.attrs["skipped_pairs"] = json.dumps(items)
    if items:
        first = items[0]
        warnings.warn(
            f"skipped {len(items)} of {total} pair(s) because their snapshots are damaged or "
            f"missing (listed in the Dataset's 'skipped_pairs' attribute); first: pair "
            f"{first['step']}: {first['reason']}",
            DamagedRunWarning,
            stacklevel=3,
        )
    return ds


# --- non-finite values and zero updates ----------------------------------------------------------


def _finite(a: Any) -> bool:
    return bool(np.all(np.isfinite(np.asarray(a, dtype=np.float64))))


def pair_flags(stats: PairStats, loss_given: bool = False, next_has_grad: bool = False) -> int:
    """The ``pair_flags`` bits of one pair's :class:`~trajscope.metrics.pair.PairStats`.

    Inner products of non-finite vectors are non-finite, so the per-layer terms tell which inputs
    were affected without touching the tensors again. (A squared norm that overflows float64 is
    flagged too: its ratios would be meaningless.) PairStats stores "no loss recorded" as NaN, so a
    NaN recorded loss is flagged only when ``loss_given`` says training logged one; likewise the
    g_{t+1} terms are NaN by design when step t+1 is the final state or its gradient is not stored,
    so they are checked only when ``next_has_grad``. A g_t that was not stored (``extras``
    ``g_recomputed``) is c·G0, whose non-finite values are the replay's (bit 16), not the record's.
    """
    t = stats.terms
    flags = 0
    if not (_finite(t.get("x.x", 0.0)) and _finite(t.get("delta.delta", 0.0))):
        flags |= 1
    if stats.extras.get("g_recomputed") != 1.0 and not _finite(t.get("g.g", 0.0)):
        flags |= 2
    if np.isinf(stats.loss_recorded) or (np.isnan(stats.loss_recorded) and loss_given):
        flags |= 4
    if not (_finite(stats.loss_line) and _finite(stats.dloss_line)):
        flags |= 8
    if not (_finite(t.get("G0.G0", 0.0)) and _finite(t.get("G1.G1", 0.0))):
        flags |= 16
    if next_has_grad and not _finite(t.get("g_next.g_next", 0.0)):
        flags |= 128
    dd = np.asarray(t.get("delta.delta", np.array([np.nan])), dtype=np.float64)
    if dd.size and np.all(np.isfinite(dd)):
        if float(np.sum(dd)) == 0.0:
            flags |= 32
        elif np.any(dd == 0.0):
            flags |= 64
    if stats.extras.get("unrecorded_params", 0.0) > 0:
        flags |= FLAGS["unrecorded_update"][0]
    if _below_resolution(stats):
        flags |= FLAGS["below_resolution"][0]
    if np.isfinite(stats.extras.get("clip_factor", np.nan)):
        flags |= FLAGS["clipped"][0] if stats.extras.get("clip_uniform") == 1.0 else FLAGS["clipped_nonuniform"][0]
    return flags


def _below_resolution(stats: PairStats) -> bool:
    """Whether ℓ(1) − ℓ(0) or ℓ(1) − ℓ(0) − ℓ'(1) (loss_change, inst_gap) is within twice the
    pair's ``loss_resolution`` (a difference of two evaluations, each off by up to it)."""
    res = stats.extras.get("loss_resolution", np.nan)
    if not np.isfinite(res):
        return False
    alpha = np.asarray(stats.alpha, dtype=np.float64)
    at0, at1 = np.flatnonzero(alpha == 0.0), np.flatnonzero(alpha == 1.0)
    if not (at0.size and at1.size):
        return False
    l0, l1 = float(stats.loss_line[at0[0]]), float(stats.loss_line[at1[0]])
    d1 = float(stats.dloss_line[at1[0]])
    return abs(l1 - l0) <= 2 * res or abs(l1 - l0 - d1) <= 2 * res


def losses_given(run: Run) -> set[int]:
    """Steps for which ``scalars.jsonl`` holds a logged loss (NaN included); empty if unreadable."""
    try:
        return {int(r["step"]) for r in run.scalars
                if not r.get("skipped") and r.get("loss", None) is not None}
    except TrajscopeError:
        return set()


def flags_for(stats: Sequence[PairStats], run: Run | None = None) -> np.ndarray:
    """``pair_flags`` of each pair, using the run (when given) to tell a NaN that means "not
    recorded" from a NaN in the data."""
    given = losses_given(run) if run is not None else set()
    out = []
    for s in stats:
        nxt = s.step + 1
        next_has_grad = (run is not None and run.grads_recorded and nxt in run.steps
                         and run.kind(nxt) == fmt.KIND_STEP)
        out.append(pair_flags(s, s.step in given, next_has_grad))
    return np.array(out, dtype=np.int16)


def sanitize_values(stats: Sequence[PairStats], values: Sequence[dict[str, np.ndarray]],
                    run: Run | None = None) -> list[dict[str, np.ndarray]]:
    """Metric values with ±Inf replaced by NaN in every pair that has a non-finite flag, so an
    affected metric is NaN (undefined), never an infinity that would poison cumulative series."""
    out = []
    for f, v in zip(flags_for(stats, run), values):
        if int(f) & NONFINITE:
            v = {k: np.where(np.isinf(a), np.nan, a) for k, a in v.items()}
        out.append(v)
    return out


def add_flags(ds: xr.Dataset, stats: Sequence[PairStats], run: Run | None = None) -> xr.Dataset:
    """Add the ``pair_flags`` coordinate (dim ``step``, CF flag attributes) to ``ds``."""
    flags = flags_for(list(stats), run)
    names = list(FLAGS)
    # A coordinate, not a data variable: it travels with every metric DataArray selected from the
    # Dataset (``ds.inst_smoothness.where(ds.pair_flags & ~768 == 0)``) and is not mistaken for a metric.
    ds.coords["pair_flags"] = ("step", flags, {
        "long_name": "pair health flags",
        "units": "1",
        "flag_masks": np.array([FLAGS[n][0] for n in names], dtype=np.int16),
        "flag_meanings": " ".join(names),
        "description": "bitwise OR of: " + "; ".join(f"{FLAGS[n][0]} {n}: {FLAGS[n][1]}" for n in names)
                       + f". Metrics affected by a non-finite input are NaN. The clipped bits describe "
                       f"training, not a problem: (pair_flags & ~{CLIPPED}) == 0 keeps the clean pairs.",
        "holds_if": "== 0",
    })
    return ds


# --- replay is a gate ----------------------------------------------------------------------------


def _pair_flags(ds: xr.Dataset, n: int) -> np.ndarray:
    if "pair_flags" in ds.variables:
        return np.asarray(ds["pair_flags"].values, dtype=np.int64)
    return np.zeros(n, dtype=np.int64)


REPLAY_METRICS = ("loss_replay_error", "grad_replay_error")
REPLAY_FAIL_FRACTION = 0.1
"""The replay gate fails when more than this fraction of the analyzed pairs (and at least one)
replay above the bound (:func:`replay_bound`) of a metric of :data:`REPLAY_METRICS`."""


@dataclass(frozen=True)
class ReplayCheck:
    """How well the replay f(x_t; z_t), G0 reproduces the recorded loss and gradient.

    ``failed`` counts the pairs where ``loss_replay_error`` or ``grad_replay_error`` exceeds its
    bound (:func:`replay_bound`); a NaN error is not available (a run recorded with
    ``grads=False`` has no stored g_t to compare G0 with) and neither fails nor passes: the gate
    then rests on the errors there are. A non-uniformly clipped pair (``pair_flags`` bit
    ``clipped_nonuniform``) whose only excess is ``grad_replay_error`` is expected (the replay
    compares the unclipped G0) and is counted in ``nonuniform`` instead. ``ok`` is False when
    ``failed`` ≥ 1 and ``failed`` > :data:`REPLAY_FAIL_FRACTION` · ``pairs``.
    """

    failed: int
    pairs: int
    nonuniform: int

    @property
    def ok(self) -> bool:
        return not (self.failed >= 1 and self.failed > REPLAY_FAIL_FRACTION * self.pairs)


ROUNDING_FACTOR = {"loss_replay_error": 16.0, "grad_replay_error": 32.0}
"""A replay that does not reproduce training's rounding (a run trained in low precision, or under an
autocast the evaluation leaves out) agrees with training only to that rounding: the gate's bound of
a replay error is max(its ``holds_if`` bound, ROUNDING_FACTOR · u), u the Dataset's
``training_rounding`` attribute (the unit roundoff of the dtype: 2⁻⁸ for bfloat16). The gradient's
factor is twice the loss's: it is rounded in the backward pass as well as the forward."""


def replay_bound(ds: xr.Dataset, name: str) -> float | None:
    """The replay gate's bound of the metric ``name`` (None: it has no comparison bound)."""
    spec = get_metrics().get(name)
    bound = holds_bound(spec.holds_if if spec is not None else None)
    if bound is None:
        return None
    return max(bound, ROUNDING_FACTOR.get(name, 16.0) * float(ds.attrs.get("training_rounding", 0.0)))


def _exceeds(ds: xr.Dataset, name: str, n: int) -> np.ndarray:
    bound = replay_bound(ds, name)
    if name not in ds or bound is None:
        return np.zeros(n, dtype=bool)
    v = np.asarray(ds[name].values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(v) & (v > bound)


def replay_failures(ds: xr.Dataset) -> ReplayCheck:
    """Count the pairs whose replay disagrees with the recorded loss or gradient (:class:`ReplayCheck`)."""
    n = int(ds.sizes.get("step", 0))
    loss_bad = _exceeds(ds, "loss_replay_error", n)
    grad_bad = _exceeds(ds, "grad_replay_error", n)
    nonuniform = (_pair_flags(ds, n) & FLAGS["clipped_nonuniform"][0]) != 0
    expected = nonuniform & grad_bad & ~loss_bad
    failed = (loss_bad | grad_bad) & ~expected
    return ReplayCheck(int(failed.sum()), n, int(expected.sum()))


def replay_warning(check: ReplayCheck, ds: xr.Dataset) -> str:
    """The one-line warning of a failed replay gate, with the likely causes."""
    bounds = " or ".join(f"{m} > {b:.3g}" for m in REPLAY_METRICS if (b := replay_bound(ds, m)) is not None)
    worst = "; ".join(f"max {m} {float(np.nanmax(ds[m].values)):.3g}" for m in REPLAY_METRICS
                      if m in ds and np.any(np.isfinite(np.asarray(ds[m].values, dtype=np.float64))))
    text = (f"replay failed on {check.failed} of {check.pairs} pairs ({bounds}; {worst}): the metrics may "
            "not describe the training run. Likely causes: a wrong objective, or one that differs from "
            "training's (precision: autocast or a dtype inside the loss that training did not use, or "
            "the reverse; memory format: a model trained channels_last replayed from an objective that "
            "converts it); a missing zero_grad (gradients accumulate); a data pipeline that is not "
            "reproducible, or a batch changed after rec.batch; unrecorded randomness (a compiled "
            "model's dropout, a run recorded by an older trajscope)")
    precision = ds.attrs.get("eval_precision")
    if precision:
        text += f". Evaluated {precision}"
    if check.nonuniform:
        text += (f" ({check.nonuniform} non-uniformly clipped pairs exceed grad_replay_error's bound "
                 "as expected and are not counted)")
    return text


def _flagged_steps(ds: xr.Dataset, hit: np.ndarray) -> tuple[list[int], str]:
    """The steps of the pairs ``hit`` selects, and the first five of them for a message."""
    steps = [int(t) for t in np.asarray(ds["step"].values)[hit]]
    return steps, ", ".join(map(str, steps[:5])) + (", …" if len(steps) > 5 else "")


def nonfinite_loss_warning(ds: xr.Dataset) -> str | None:
    """The one-line warning for pairs whose replayed loss is NaN/Inf (``pair_flags`` bit
    ``nonfinite_replay_loss``; None: there are none). On every pair nothing was computed: the
    message says so, and ``trajscope analyze`` exits 1 (:func:`nothing_computed`)."""
    n = int(ds.sizes.get("step", 0))
    hit = (_pair_flags(ds, n) & FLAGS["nonfinite_replay_loss"][0]) != 0
    if not hit.any():
        return None
    steps, shown = _flagged_steps(ds, hit)
    what = ("on every pair: nothing was computed" if hit.all()
            else f"on {len(steps)} of {n} pairs (steps {shown}): their metrics are NaN")
    return (f"the objective's loss is NaN or Inf {what} (pair_flags bit nonfinite_replay_loss). Likely "
            "causes: the objective differs from training's (a missing normalisation, a log of 0), or "
            "training diverged")


def nothing_computed(ds: xr.Dataset) -> bool:
    """Whether no pair has a finite replayed loss (or there are no pairs)."""
    n = int(ds.sizes.get("step", 0))
    return n == 0 or bool(((_pair_flags(ds, n) & FLAGS["nonfinite_replay_loss"][0]) != 0).all())


def unrecorded_warning(ds: xr.Dataset) -> str | None:
    """The one-line warning for pairs flagged ``unrecorded_update`` (None: there are none)."""
    n = int(ds.sizes.get("step", 0))
    hit = (_pair_flags(ds, n) & FLAGS["unrecorded_update"][0]) != 0
    if not hit.any():
        return None
    steps, shown = _flagged_steps(ds, hit)
    return (f"{len(steps)} pair(s) (steps {shown}): parameters without a recorded gradient changed between "
            "x_t and x_{t+1}; the trainable set changed during training and the run does not record it "
            "(re-record with this trajscope version). They are coordinates of x, so the line metrics "
            "follow the step training took; their recorded gradient counts as 0 (pair_flags bit "
            "unrecorded_update)")
