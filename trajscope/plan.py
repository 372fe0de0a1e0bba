"""What an analysis will compute, decided before any work: which pairs (``--steps``), which
metrics (with the series they read and the optional probes they need), the probe settings, and
the name of the objective that tags persisted pairs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from trajscope import health
from trajscope.errors import AnalysisError, RunFormatError
from trajscope.execution import resolve_device
from trajscope.objective import Objective
from trajscope.probe import ProbeSettings, alpha_grid
from trajscope.registry import MetricSpec, get_metrics
from trajscope.run import Run
from trajscope.tasks import ObjectiveSource

__all__ = ["objective_id", "pairs_to_analyze", "probe_settings", "select_metrics", "select_steps",
           "with_requirements"]


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
    moves as the run grows, and a moving x* would invalidate every persisted pair on each resume.
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


def probe_settings(r: Run, *, points: int, margin: float, device: str, dtype: str, chunk_size: int | None,
                   batched: bool, sharpness: bool, sharpness_max_iter: int, reference: int | None,
                   resolve: bool) -> ProbeSettings:
    """The probe's settings. ``resolve``: a local scheduler resolves ``device`` here, so that a
    missing GPU fails before any work; a cluster's workers resolve the spec themselves (this
    machine may have no GPU at all)."""
    ref_step = _reference_step(r, reference)
    return ProbeSettings(
        alphas=tuple(float(a) for a in alpha_grid(points, margin)),
        device=resolve_device(device) if resolve else device,
        dtype=dtype,
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
    lost_all = health.lost_pairs(r)
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
