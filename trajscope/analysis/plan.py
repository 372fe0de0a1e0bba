"""What an analysis will compute, decided before any work: which pairs (``--steps``), which
metrics (with the series they read and the optional probes they need), the probe settings, and
the name of the objective that tags persisted pairs.

Every function here takes data (the run's manifest and step lists, the arguments) and returns
data: none runs the model. The decisions that need f evaluated (the derivative path, whether
persisted pairs still hold) are trials of the probe (:mod:`trajscope.probe.trials`), which the
analysis entry calls.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from trajscope.errors import AnalysisError, RunFormatError
from trajscope.metrics.registry import MetricSpec, get_metrics
from trajscope.objective import Objective, ObjectiveSource
from trajscope.probe.grid import alpha_grid
from trajscope.probe.settings import DERIVATIVES, ProbeSettings
from trajscope.store import Snapshot, coverage
from trajscope.store.run import Run

__all__ = ["check_derivatives", "eval_dtype", "objective_id", "pairs_to_analyze", "probe_settings",
           "select_metrics", "select_steps", "training_rounding", "with_precision", "with_requirements"]


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
    if dtype is not None and dtype not in ("auto", "as-trained"):
        return dtype
    floating = [q.get("dtype") for q in r.manifest["params"] if _floating(q.get("dtype"))]
    known = all(isinstance(q.get("dtype"), str) and q.get("dtype") for q in r.manifest["params"])
    return "float64" if floating and known and all(d == "float64" for d in floating) else "float32"


_UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24, "float64": 2.0**-53}


def training_rounding(r: Run, settings: ProbeSettings | None = None) -> float:
    """The unit roundoff of the coarsest floating-point dtype training computed in that the
    evaluation does not reproduce (2⁻⁸ for bfloat16, 2⁻¹¹ for float16, 2⁻²⁴ for float32, 2⁻⁵³ for
    float64): the dtypes the run's parameters were recorded in (float32's when the manifest names
    none) and, when ``settings`` evaluate without the autocast training ran under, that autocast's
    dtype. The replay then differs from training by about this much, relative, however
    faithful the objective."""
    eps = _UNIT_ROUNDOFF
    found = [eps.get(q.get("dtype"), 2.0**-3) for q in r.manifest["params"] if _floating(q.get("dtype"))]
    if settings is not None and settings.training_autocast and not settings.autocast:
        found.append(eps.get(settings.training_autocast, 2.0**-3))
    return max(found) if found else eps["float32"]


def with_precision(settings: ProbeSettings, dtype: str | None, snap: Snapshot | None,
                   compiled: bool = False) -> ProbeSettings:
    """``settings`` with the evaluation's autocast decided from the ``dtype`` asked for and the
    autocast the run trained under (read from ``snap``, the first readable pair's x_t).

    As trained (``dtype`` None, ``"auto"`` or ``"as-trained"``), each step is evaluated under its
    own recorded autocast. ``"float32"``/``"float64"`` evaluate in that dtype throughout; for a run
    that trained without autocast the two are the same evaluation, and the settings say so (the
    pairs' digest does not change). A run that trained a ``torch.compile`` d model (``compiled``,
    the manifest's) under autocast has its gradient passes compiled as well when evaluated as
    trained: only inductor's fused kernels round as training did."""
    label = snap.autocast_label if snap is not None else ""
    as_trained = dtype in (None, "auto", "as-trained")
    return replace(settings, autocast=as_trained or not label, training_autocast=label,
                   compiled=bool(compiled and as_trained and label))


def _floating(dtype: object) -> bool:
    """Whether a manifest dtype name (``"float32"``, ``"bfloat16"``, ``"float8_e4m3fn"``) is a
    floating-point type."""
    return isinstance(dtype, str) and dtype.startswith(("float", "bfloat"))


def probe_settings(r: Run, *, points: int, margin: float, device: str, dtype: str | None,
                   chunk_size: int | None, batched: bool | None, sharpness: bool, sharpness_max_iter: int,
                   reference: int | None) -> ProbeSettings:
    """The probe's settings. ``device``: a device (a local scheduler's, resolved by the caller so
    that a missing GPU fails before any work) or the spec a cluster's workers resolve themselves
    (this machine may have no GPU at all). ``dtype``: see :func:`eval_dtype`."""
    ref_step = _reference_step(r, reference)
    return ProbeSettings(
        alphas=tuple(float(a) for a in alpha_grid(points, margin)),
        device=device,
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
    pairs = select_steps(sorted(set(r.pairs) | set(r.pruned_pairs)), steps)  # pruned: from persisted results
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
    """Raise AnalysisError unless ``derivatives`` is one of :data:`~trajscope.probe.settings.DERIVATIVES`."""
    if derivatives not in DERIVATIVES:
        raise AnalysisError(f"derivatives={derivatives!r}: expected one of {', '.join(DERIVATIVES)}")
