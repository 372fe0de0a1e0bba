"""Trials of the probe: short evaluations of f that an analysis runs before its pairs.

* :func:`resolve_derivatives`: the derivative path of the line probe, decided once per analysis
  (forward-mode AD, with attention held to its math kernel, or reverse mode), from one jvp at the
  first readable pair (:func:`forward_mode_failure`) and, for a small analysis, one timed
  evaluation (:func:`reverse_is_cheaper`);
* :func:`persisted_objective_change`: whether the objective still computes a persisted pair's ℓ(0)
  (:func:`replayed_loss`), a change the objective's digest cannot see.

Each evaluates f exactly as the line probe does (:func:`trajscope.probe.stages.prepare`: train mode,
BatchNorm replay, replayed RNG, the settings' device, dtype and attention kernel).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch.func import jvp

from trajscope.errors import ForwardModeError, TrajscopeError, one_line
from trajscope.metrics.pair import PairStats
from trajscope.objective import Objective
from trajscope.probe.line import forward_ad_failure, replayed_rng, sdpa_math_kernel
from trajscope.probe.settings import ProbeSettings
from trajscope.probe.stages import Prepared, batchnorm_replay, prepare
from trajscope.store import Run, Snapshot

__all__ = ["FORWARD_AD_SETUP_S", "REPLAY_RTOL", "SMALL_ANALYSIS", "first_readable", "forward_mode_failure",
           "persisted_objective_change", "replayed_loss", "resolve_derivatives", "reverse_is_cheaper"]


def resolve_derivatives(requested: str, settings: ProbeSettings, r: Run, objective: Objective,
                        pairs: list[int], local: bool, snap: Snapshot | None) -> ProbeSettings:
    """``settings`` with the derivative path of the line probe, decided once for the analysis.

    ``"reverse"`` is taken as asked. ``"auto"`` takes reverse mode for a small analysis, one
    whose whole line work in reverse mode costs less than forward mode's one-time set-up
    (:func:`reverse_is_cheaper`). Otherwise one jvp of f at the first readable pair's x_t
    (:func:`forward_mode_failure`) decides: forward mode works → ``forward``; an op
    without a forward-mode rule → forward again with ``scaled_dot_product_attention`` held to its
    math kernel (exact, still batched) → if that works, ``forward`` with ``sdpa_math``; else
    ``"auto"`` resolves to ``reverse`` and ``"forward"`` raises :class:`ForwardModeError` naming the
    op. Any other failure of the loss is left to the pairs, which report it per step. The test runs
    on ``settings.device`` for a ``local`` scheduler, else on the CPU (the driver of a cluster may
    have no GPU). ``snap``: the first readable pair's x_t (:func:`first_readable`), where the
    trials run.
    """
    if requested == "reverse":
        return replace(settings, derivatives="reverse", derivatives_reason="requested")
    trial = settings if local else replace(settings, device="cpu")
    if requested == "auto" and reverse_is_cheaper(objective, snap, len(pairs), trial, r.trainable):
        return replace(settings, derivatives="reverse", derivatives_reason=SMALL_ANALYSIS)
    what = _forward_failure(objective, snap, trial, r.trainable)
    if what is None:
        return replace(settings, derivatives="forward",
                       derivatives_reason="requested" if requested == "forward" else "forward-mode AD works")
    with_math = _forward_failure(objective, snap, replace(trial, sdpa_math=True), r.trainable)
    if with_math is None:
        return replace(settings, derivatives="forward", sdpa_math=True, derivatives_reason=(
            f"forward-mode AD is not implemented for {what} used by the loss; attention runs on "
            "scaled_dot_product_attention's math kernel"))
    what = with_math  # what still fails with attention on its math kernel
    if requested == "forward":
        raise ForwardModeError(
            f"derivatives='forward': {what} used by the loss has no forward-mode AD rule; "
            "use --derivatives reverse (or auto)", what)
    return replace(settings, derivatives="reverse",
                   derivatives_reason=f"forward-mode AD is not implemented for {what} used by the loss")


FORWARD_AD_SETUP_S = 0.3
"""What the first forward-mode AD call in a process costs before any arithmetic, in seconds:
torch compiles its jvp decompositions (TorchScript) then. ``python -m benchmarks.startup`` measures
it on the machine at hand (docs/performance.md, "Start-up")."""

REVERSE_FORWARDS = 3.0
"""One reverse-mode point (f and its gradient) in units of one evaluation of f."""

SMALL_ANALYSIS = "a small analysis: reverse mode costs less than forward-mode AD's one-time set-up"
"""``derivatives_reason`` of an ``auto`` analysis that :func:`reverse_is_cheaper` sent to reverse mode."""


def reverse_is_cheaper(objective: Objective, snap: Snapshot | None, pairs: int, trial: ProbeSettings,
                       trainable: list[str] | None = None) -> bool:
    """Whether reverse mode does the whole line work of ``pairs`` pairs in less time than forward
    mode needs before its first jvp.

    Estimate: pairs × α points × :data:`REVERSE_FORWARDS` × the time of one f(x_t; z_t) at ``snap``
    (the first readable pair's x_t; :func:`replayed_loss` on ``trial``'s device, start-up costs
    included, so a doubtful case stays in forward mode), against :data:`FORWARD_AD_SETUP_S`.
    False when this process has already paid the set-up, and when f cannot be evaluated there (the
    forward-mode trial and the pairs then report why).
    """
    if snap is None or "torch._decomp.decompositions_for_jvp" in sys.modules:  # paid: forward mode is free
        return False
    try:
        start = time.perf_counter()
        replayed_loss(objective, snap, trial, trainable)  # float(): waits for the device
    except Exception:  # noqa: BLE001 - the pairs report a failing loss in context
        return False
    return pairs * len(trial.alphas) * REVERSE_FORWARDS * (time.perf_counter() - start) < FORWARD_AD_SETUP_S


def forward_mode_failure(objective: Objective, snap: Snapshot, settings: ProbeSettings,
                         trainable: list[str] | None = None) -> str | None:
    """What stops forward mode on this objective, or None when it works: one jvp of f at x_t
    (tangent x_t itself), evaluated as the line probe evaluates (train mode, BatchNorm replay,
    replayed RNG, ``settings.sdpa_math``).

    Returns what has no forward-mode rule (see :func:`~trajscope.probe.line.forward_ad_failure`). Any
    other error propagates: the caller decides whether the pairs should report it.
    """
    prep = _prepared(objective, snap, settings, trainable)
    try:
        with _as_probed(prep, snap, settings.sdpa_math):
            jvp(prep.f, (prep.x0,), (prep.x0,))
    except (NotImplementedError, RuntimeError) as exc:
        what = forward_ad_failure(exc)
        if what is not None:
            return what
        # An error torch does not word as a missing rule (e.g. a convolution under autocast:
        # "Input type … and weight type … should be the same"): forward mode is to blame when f
        # itself evaluates.
        with _as_probed(prep, snap, settings.sdpa_math):
            prep.f(prep.x0)  # raises what the loss raises: the pairs report it
        under = "" if prep.f_full is None else f" under {snap.autocast_label} autocast"
        return f"an op{under} ({type(exc).__name__}: {one_line(str(exc).splitlines()[0] if str(exc) else '', 160)})"
    return None


def _prepared(objective: Objective, snap: Snapshot, settings: ProbeSettings,
              trainable: list[str] | None) -> Prepared:
    """``snap``'s pair prepared for evaluating f at x_t alone (Δ_t = 0 is fine: f is all a trial needs)."""
    return prepare(objective, snap, replace(snap, step=snap.step + 1), settings, ref=None, trainable=trainable)


@contextlib.contextmanager
def _as_probed(prep: Prepared, snap: Snapshot, sdpa_math: bool) -> Iterator[None]:
    """The context f is evaluated in by a trial: no gradient, BatchNorm replay, the step's RNG
    state, and (``sdpa_math``) attention on its math kernel, as the line probe runs it."""
    with (torch.no_grad(), batchnorm_replay(prep.model), sdpa_math_kernel(sdpa_math),
          replayed_rng(snap.rng, prep.replay)):
        yield


def first_readable(r: Run, pairs: list[int]) -> Snapshot | None:
    """x_t of the first of the first three pairs whose snapshot reads and holds its minibatch
    (a damaged snapshot costs only its pair); None if there is none."""
    for t in pairs[:3]:
        try:
            snap = r.snapshot(t)
        except TrajscopeError:
            continue
        if snap.batch is not None:
            return snap
    return None


def _forward_failure(objective: Objective, snap: Snapshot | None, trial: ProbeSettings,
                     trainable: list[str] | None) -> str | None:
    """What stops forward mode at ``snap`` (None: it works, or there is no readable snapshot, or
    the loss fails otherwise; the pairs then report the trouble)."""
    if snap is None:
        return None
    try:
        return forward_mode_failure(objective, snap, trial, trainable)
    except Exception:  # noqa: BLE001 - not a forward-mode failure: the pair tasks report it in context
        return None


REPLAY_RTOL = {"float32": 1e-5, "float64": 1e-12}
"""Relative tolerance of :func:`persisted_objective_change`, per evaluation dtype. The probe
evaluates ℓ(0) batched (vmap) and the check evaluates f once: in float32 the two reductions differ
by a few ulps (a few 1e-7 relative with dropout); 1e-5 is ``loss_replay_error``'s own bound."""


def replayed_loss(objective: Objective, snap: Snapshot, settings: ProbeSettings,
                  trainable: list[str] | None = None) -> float:
    """f(x_t; z_t) evaluated as the gradient passes evaluate it (the pair's ``loss_x0``): train
    mode, BatchNorm replay, replayed RNG, ``settings`` device and dtype, training's autocast and
    attention kernel."""
    prep = _prepared(objective, snap, settings, trainable)
    with _as_probed(prep, snap, sdpa_math=False):  # training's attention kernel, as loss_x0's pass
        return float(prep.f(prep.x0))


def persisted_objective_change(r: Run, objective: Objective, settings: ProbeSettings, stats: PairStats,
                               local: bool) -> str | None:
    """What shows that the objective no longer computes the persisted pair ``stats`` (None: it
    does, or the pair's snapshot cannot be read to tell).

    The check: f(x_t; z_t) now (:func:`replayed_loss`) must equal the persisted f(x_t; z_t) (the
    pair's ``loss_x0``; ℓ(0) for a pair persisted without it) to :data:`REPLAY_RTOL`. It catches
    what the objective's digest cannot see, e.g. a changed global constant. It runs on
    ``settings.device`` for a ``local`` scheduler (where the pairs ran), else on the CPU.
    """
    trial = settings if local else replace(settings, device="cpu")
    try:
        snap = r.snapshot(stats.step)
    except TrajscopeError:
        return None
    plain = stats.extras.get("loss_x0")  # the plain pass (ℓ(0) of the line is batched: under
    if plain is not None and plain == plain:  # autocast it rounds differently from one pass)
        stored = float(plain)
    elif snap.batch is None or 0.0 not in settings.alphas:
        return None
    else:
        stored = float(stats.loss_line[settings.alphas.index(0.0)])
    if snap.batch is None:
        return None
    try:
        now = replayed_loss(objective, snap, trial, r.trainable)
    except Exception as exc:  # noqa: BLE001 - the recomputed pairs report it in context
        return f"f(x_t; z_t) at step {stats.step} now fails ({type(exc).__name__})"
    if now == stored or (now != now and stored != stored):  # equal, or both NaN
        return None
    if abs(now - stored) <= REPLAY_RTOL.get(settings.dtype, 1e-6) * max(abs(stored), 1e-30):
        return None
    return f"f(x_t; z_t) at step {stats.step} is {now:.10g}, the persisted pair has {stored:.10g}"
