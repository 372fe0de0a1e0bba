"""What an analysis will compute, decided before any work: which pairs (``--steps``), which
metrics (with the series they read and the optional probes they need), the probe settings, and
the name of the objective that tags persisted pairs, and the derivative path of the line probe
(:func:`resolve_derivatives`, once per analysis).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from torch.func import jvp

from trajscope.analysis.execution import resolve_device
from trajscope.analysis.tasks import ObjectiveSource, objective_for
from trajscope.errors import AnalysisError, ForwardModeError, RunFormatError, TrajscopeError
from trajscope.metrics.pair import PairStats
from trajscope.metrics.registry import MetricSpec, get_metrics
from trajscope.objective import Objective
from trajscope.probe.line import _replayed_rng, forward_ad_failure, sdpa_math_kernel
from trajscope.probe.pair import DERIVATIVES, ProbeSettings, _batchnorm_replay, _prepare, alpha_grid
from trajscope.store import coverage
from trajscope.store.run import Run, Snapshot

__all__ = ["FORWARD_AD_SETUP_S", "check_derivatives", "eval_dtype", "forward_mode_failure", "objective_id",
           "pairs_to_analyze", "persisted_objective_change", "probe_settings", "replayed_loss",
           "resolve_derivatives", "reverse_is_cheaper", "select_metrics", "select_steps",
           "training_rounding", "with_requirements"]


def objective_id(source: ObjectiveSource, recorded: str | None) -> str:
    """How the objective is named in the Dataset and in the settings digest of persisted pairs."""
    if source is None:
        return str(recorded)
    if isinstance(source, str):
        return source
    if isinstance(source, Objective):
        return f"Objective({type(source.model).__qualname__})"
    mod = getattr(source, "__module__", "?")
    if mod == "__main__":  # a script's factory: name it as the recorder does (file stem)
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        mod = Path(main_file).stem if main_file else mod
    return f"{mod}:{getattr(source, '__qualname__', '?')}"


def select_steps(pairs: list[int], steps: str | slice | Iterable[int] | None) -> list[int]:
    """The pairs of ``pairs`` (start steps) that ``steps`` selects: ``"START:STOP[:STRIDE]"``, a
    slice, or step numbers; None selects all.

    START and STOP are optimizer step numbers, not Python indices: a negative one (``-1:`` read
    as "the last") and an empty range (``5:2``) are errors rather than silently selecting all
    pairs or none.

    Raises:
        AnalysisError: naming ``steps`` for a malformed, negative or empty range.
    """
    if steps is None:
        return pairs
    given = steps  # named in errors as the user wrote it
    if isinstance(steps, str):
        parts = steps.split(":")
        try:
            nums = [int(p) if p else None for p in parts]
        except ValueError:
            raise AnalysisError(f"steps={steps!r}: expected START:STOP[:STRIDE]") from None
        if len(nums) not in (2, 3):
            raise AnalysisError(f"steps={steps!r}: expected START:STOP[:STRIDE]")
        steps = slice(*nums)
    if isinstance(steps, slice):
        start = steps.start or 0
        stop = steps.stop if steps.stop is not None else float("inf")
        stride = 1 if steps.step is None else steps.step
        if stride < 1:
            raise AnalysisError(f"steps={given!r}: the stride must be >= 1")
        if start < 0 or stop < 0:
            raise AnalysisError(
                f"steps={given!r}: START and STOP are optimizer step numbers (>= 0), not indices "
                "from the end; give the step numbers (trajscope info lists them)"
            )
        if start >= stop:
            raise AnalysisError(f"steps={given!r}: empty range (START must be less than STOP)")
        return [t for t in pairs if start <= t < stop and (t - start) % stride == 0]
    wanted = set(steps)
    return [t for t in pairs if t in wanted]


def _with_requirements(selected: dict[str, MetricSpec], everything: dict[str, MetricSpec]) -> dict[str, MetricSpec]:
    out = dict(selected)
    todo = list(selected.values())
    while todo:  # transitively: a series may read another series
        spec = todo.pop()
        for req in spec.requires:
            if req not in everything:
                raise AnalysisError(f"metric {spec.name!r} requires unknown metric {req!r}")
            if req not in out:
                out[req] = everything[req]
                todo.append(everything[req])
    # pair metrics first, then series; each group in registration order, so a series registered
    # after the series it reads is computed after it
    order = {n: i for i, n in enumerate(everything)}
    return dict(sorted(out.items(), key=lambda kv: (kv[1].kind != "pair", order.get(kv[0], 0))))


def _reference_step(run: Run, reference: int | None) -> int | None:
    """x* of convexity_ratio_ref: the given step, else the final state.

    A run without a final state (still recording, or crashed) has no default: its last snapshot
    moves as the run grows, and a moving x* would recompute every persisted pair's reference part
    (:mod:`trajscope.probe.reference_point`) on each resume.
    convexity_ratio_ref is then NaN unless ``reference`` names a step.
    """
    if reference is None:
        return run.final_step
    if reference not in run.steps:
        raise AnalysisError(
            f"reference={reference}: step {reference} is not recorded; choose a recorded step "
            f"(first {run.steps[:1]}, last {run.steps[-1:]}) or omit it for the final state"
        )
    return int(reference)




def select_metrics(metrics: Iterable[str] | None, sharpness: bool) -> tuple[dict[str, MetricSpec], bool]:
    """The metrics asked for (default: every registered one) that the probes provide, and
    whether the sharpness probe runs. Naming an opt-in metric asks for its probe; otherwise
    opt-in metrics follow the flags."""
    selected = get_metrics(metrics)
    sharpness = sharpness or (metrics is not None and any("sharpness" in s.needs for s in selected.values()))
    provided = {"sharpness"} if sharpness else set()
    selected = {n: s for n, s in selected.items() if set(s.needs) <= provided}
    # An optional probe's results come with its diagnostics (e.g. sharpness with its iteration
    # count and convergence flag): every metric reading only what is provided is free by now.
    for n, s in get_metrics().items():
        if s.needs and set(s.needs) <= provided:
            selected.setdefault(n, s)
    return selected, sharpness


def with_requirements(selected: dict[str, MetricSpec]) -> dict[str, MetricSpec]:
    """``selected`` and every metric they read, transitively; pair metrics first."""
    return _with_requirements(selected, get_metrics())


def eval_dtype(r: Run, dtype: str | None) -> str:
    """The evaluation dtype: ``dtype`` when it names one, else (None or ``"auto"``) the run's.

    A run whose recorded floating-point parameters are all float64 evaluates in float64: its
    objective may hold float64 constants, and float64 replays it near exactly. Any other run
    (float32, bf16, fp16, mixed, or a manifest without dtypes) evaluates in float32.
    """
    if dtype is not None and dtype != "auto":
        return dtype
    floating = [q.get("dtype") for q in r.manifest["params"] if _floating(q.get("dtype"))]
    known = all(isinstance(q.get("dtype"), str) and q.get("dtype") for q in r.manifest["params"])
    return "float64" if floating and known and all(d == "float64" for d in floating) else "float32"


def training_rounding(r: Run) -> float:
    """The unit roundoff of the coarsest floating-point dtype the run's parameters were recorded in
    (2⁻⁸ for bfloat16, 2⁻¹¹ for float16, 2⁻²⁴ for float32, 2⁻⁵³ for float64; float32's when the
    manifest names none): the replay of a low-precision run differs from training by about this
    much, relative, however faithful the objective."""
    eps = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24, "float64": 2.0**-53}
    found = [eps.get(q.get("dtype"), 2.0**-3) for q in r.manifest["params"] if _floating(q.get("dtype"))]
    return max(found) if found else eps["float32"]


def _floating(dtype: object) -> bool:
    """Whether a manifest dtype name (``"float32"``, ``"bfloat16"``, ``"float8_e4m3fn"``) is a
    floating-point type."""
    return isinstance(dtype, str) and dtype.startswith(("float", "bfloat"))


def probe_settings(r: Run, *, points: int, margin: float, device: str, dtype: str | None,
                   chunk_size: int | None, batched: bool | None, sharpness: bool, sharpness_max_iter: int,
                   reference: int | None, resolve: bool) -> ProbeSettings:
    """The probe's settings. ``resolve``: a local scheduler resolves ``device`` here, so that a
    missing GPU fails before any work; a cluster's workers resolve the spec themselves (this
    machine may have no GPU at all). ``dtype``: see :func:`eval_dtype`."""
    ref_step = _reference_step(r, reference)
    return ProbeSettings(
        alphas=tuple(float(a) for a in alpha_grid(points, margin)),
        device=resolve_device(device) if resolve else device,
        dtype=eval_dtype(r, dtype),
        chunk_size=chunk_size,
        batched=batched,
        sharpness=sharpness,
        sharpness_max_iter=sharpness_max_iter,
        reference_step=ref_step,
    )


def pairs_to_analyze(r: Run, steps: str | slice | Iterable[int] | None) -> tuple[list[int], dict[int, str]]:
    """The selected pairs that can be probed, and those lost with their snapshot files (start
    step → why).

    Raises:
        RunFormatError: if every selected pair is lost.
        AnalysisError: if no pair is selected.
    """
    pairs = select_steps(r.pairs, steps)
    lost_all = coverage.lost_pairs(r)
    lost = {t: lost_all[t] for t in select_steps(list(lost_all), steps)}
    if not pairs and lost:
        first = min(lost)
        raise RunFormatError(f"{r.path}: every selected pair is lost; first: pair {first}: {lost[first]}")
    if not pairs:
        raise AnalysisError(
            f"{r.path}: no analyzable pairs (recorded steps: {len(r.steps)}; a pair needs "
            "snapshots of two consecutive steps; check the schedule's window >= 2 or --steps)"
        )
    return pairs, lost


def check_derivatives(derivatives: str) -> None:
    """Raise AnalysisError unless ``derivatives`` is one of :data:`~trajscope.probe.pair.DERIVATIVES`."""
    if derivatives not in DERIVATIVES:
        raise AnalysisError(f"derivatives={derivatives!r}: expected one of {', '.join(DERIVATIVES)}")


def resolve_derivatives(requested: str, settings: ProbeSettings, r: Run, source: ObjectiveSource,
                        pairs: list[int], local: bool) -> ProbeSettings:
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
    have no GPU).
    """
    if requested == "reverse":
        return replace(settings, derivatives="reverse", derivatives_reason="requested")
    trial = settings if local else replace(settings, device="cpu")
    snap = _first_readable(r, pairs)
    if requested == "auto" and reverse_is_cheaper(r, source, snap, len(pairs), trial):
        return replace(settings, derivatives="reverse", derivatives_reason=SMALL_ANALYSIS)
    what = _forward_failure(r, source, snap, trial)
    if what is None:
        return replace(settings, derivatives="forward",
                       derivatives_reason="requested" if requested == "forward" else "forward-mode AD works")
    with_math = _forward_failure(r, source, snap, replace(trial, sdpa_math=True))
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


def reverse_is_cheaper(r: Run, source: ObjectiveSource, snap: Snapshot | None, pairs: int,
                       trial: ProbeSettings) -> bool:
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
        objective = objective_for(source, r.objective, run=r)
        start = time.perf_counter()
        replayed_loss(objective, snap, trial, r.trainable)  # float(): waits for the device
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
    nxt = replace(snap, step=snap.step + 1)  # f is all that is needed: Δ_t = 0 is fine
    prep = _prepare(objective, snap, nxt, settings, ref=None, trainable=trainable)
    try:
        with (torch.no_grad(), _batchnorm_replay(prep.model), sdpa_math_kernel(settings.sdpa_math),
              _replayed_rng(snap.rng, prep.replay)):
            jvp(prep.f, (prep.x0,), (prep.x0,))
    except (NotImplementedError, RuntimeError) as exc:
        what = forward_ad_failure(exc)
        if what is None:
            raise
        return what
    return None


def _first_readable(r: Run, pairs: list[int]) -> Snapshot | None:
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


def _forward_failure(r: Run, source: ObjectiveSource, snap: Snapshot | None, trial: ProbeSettings) -> str | None:
    """What stops forward mode at ``snap`` (None: it works, or there is no readable snapshot, or
    the loss fails otherwise; the pairs then report the trouble)."""
    if snap is None:
        return None
    try:
        return forward_mode_failure(objective_for(source, r.objective, run=r), snap, trial, r.trainable)
    except Exception:  # noqa: BLE001 - not a forward-mode failure: the pair tasks report it in context
        return None


REPLAY_RTOL = {"float32": 1e-5, "float64": 1e-12}
"""Relative tolerance of :func:`persisted_objective_change`, per evaluation dtype. The probe
evaluates ℓ(0) batched (vmap) and the check evaluates f once: in float32 the two reductions differ
by a few ulps (a few 1e-7 relative with dropout); 1e-5 is ``loss_replay_error``'s own bound."""


def replayed_loss(objective: Objective, snap: Snapshot, settings: ProbeSettings,
                  trainable: list[str] | None = None) -> float:
    """f(x_t; z_t) evaluated as the line probe evaluates ℓ(0): train mode, BatchNorm replay,
    replayed RNG, ``settings`` device, dtype and attention kernel."""
    nxt = replace(snap, step=snap.step + 1)  # f is all that is needed: Δ_t = 0 is fine
    prep = _prepare(objective, snap, nxt, settings, ref=None, trainable=trainable)
    with (torch.no_grad(), _batchnorm_replay(prep.model), sdpa_math_kernel(settings.sdpa_math),
          _replayed_rng(snap.rng, prep.replay)):
        return float(prep.f(prep.x0))


def persisted_objective_change(r: Run, source: ObjectiveSource, settings: ProbeSettings, stats: PairStats,
                               local: bool) -> str | None:
    """What shows that the objective no longer computes the persisted pair ``stats`` (None: it
    does, or the pair's snapshot cannot be read to tell).

    The check: f(x_t; z_t) now (:func:`replayed_loss`) must equal the persisted ℓ(0) to
    :data:`REPLAY_RTOL`. It catches what the objective's digest cannot see, e.g. a changed global
    constant. It runs on ``settings.device`` for a ``local`` scheduler (where the pairs ran), else
    on the CPU.
    """
    trial = settings if local else replace(settings, device="cpu")
    try:
        snap = r.snapshot(stats.step)
    except TrajscopeError:
        return None
    if snap.batch is None or 0.0 not in settings.alphas:
        return None
    stored = float(stats.loss_line[settings.alphas.index(0.0)])
    try:
        now = replayed_loss(objective_for(source, r.objective, run=r), snap, trial, r.trainable)
    except Exception as exc:  # noqa: BLE001 - the recomputed pairs report it in context
        return f"f(x_t; z_t) at step {stats.step} now fails ({type(exc).__name__})"
    if now == stored or (now != now and stored != stored):  # equal, or both NaN
        return None
    if abs(now - stored) <= REPLAY_RTOL.get(settings.dtype, 1e-6) * max(abs(stored), 1e-30):
        return None
    return f"f(x_t; z_t) at step {stats.step} is {now:.10g}, the persisted pair has {stored:.10g}"
