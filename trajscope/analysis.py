"""``trajscope.analyze``: build the dask graph, run it, assemble and write the xarray Dataset.

The graph (same functions under every scheduler; only ``scheduler=`` changes):

    load-<t>  (one per snapshot, shared by the pairs that need it: deterministic keys)
       └─ pair-<t>  (probe on the same minibatch z_t, reduce to PairStats, persist to disk)
             └─ metrics-<t>  (pure metric functions of PairStats)
                   └─ one Dataset, series metrics (cumulative ones) added over ``step``

Finished pairs are persisted under ``analysis/pairs/`` as they complete, so an interrupted analysis
resumes where it stopped and new recorded steps only cost their new pairs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
from dask.callbacks import Callback

from trajscope import format as fmt
from trajscope import health
from trajscope.errors import AnalysisError, ObjectiveError, RunFormatError, TrajscopeError, one_line
from trajscope.metrics import PairView
from trajscope.objective import Objective, check_run_objective, resolve_objective
from trajscope.probe import PairStats, ProbeSettings, alpha_grid, probe_pair
from trajscope.registry import MetricSpec, get_metrics
from trajscope.run import Run, Snapshot, open_run

__all__ = ["analyze", "open_metrics", "compute_pair_metrics", "build_dataset"]

__version__ = "0.1.0"
METRICS_FILE = "metrics.nc"
PAIRS_DIR = "pairs"

ObjectiveSource = str | Callable[[], Objective] | Objective | None


# --- tasks ---------------------------------------------------------------------------------------

_local = threading.local()


def _objective_for(source: ObjectiveSource, recorded: str | None) -> Objective:
    """One Objective per (thread, source): a module's parameters are swapped during a call, so
    concurrent threads must never share a model."""
    cache = getattr(_local, "objectives", None)
    if cache is None:
        cache = _local.objectives = {}
    key = source if isinstance(source, str) else (recorded if source is None else id(source))
    if key not in cache:
        if isinstance(source, Objective):
            # never touch the caller's instance: the probe moves it and sets its train mode
            cache[key] = Objective(model=copy.deepcopy(source.model), loss=source.loss)
        else:
            cache[key] = resolve_objective(source, recorded)
    return cache[key]


def _load_task(path: str) -> Snapshot | health.BadSnapshot:
    # issue 7 (damage is local): a damaged snapshot is returned as its error, not raised, so only
    # the pairs that need it are skipped (see trajscope.health).
    return health.load_snapshot(path)


def _pair_task(snap: Snapshot | health.BadSnapshot, nxt: Snapshot | health.BadSnapshot,
               prev: Snapshot | health.BadSnapshot | None, init: Snapshot | health.BadSnapshot | None,
               source: ObjectiveSource, recorded: str | None, settings: ProbeSettings,
               trainable: list[str], out: str | None, digest: str,
               ref: Snapshot | health.BadSnapshot | None = None) -> PairStats | health.SkippedPair:
    objective = _objective_for(source, recorded)
    # --- issue 7 (damage is local): a damaged/incomplete snapshot skips this pair only ---------
    skip = health.skip_reason(snap, nxt, objective.model)
    if skip is not None:
        return skip
    prev = health.usable(prev, objective.model)  # a damaged neighbour only costs its terms
    init = health.usable(init, objective.model)
    ref = health.usable(ref, objective.model)
    assert isinstance(snap, Snapshot) and isinstance(nxt, Snapshot)
    # --- end issue 7 ---------------------------------------------------------------------------
    try:
        stats = probe_pair(objective, snap, nxt, settings, prev=prev, init=init, ref=ref,
                           trainable=trainable)
    except TrajscopeError:
        raise
    except Exception as exc:  # issue 7: the user's loss failed; say where, one line
        raise ObjectiveError(
            f"step {snap.step}: evaluating the objective's loss failed: {type(exc).__name__}: "
            f"{one_line(exc, 500)} (--debug shows where)"
        ) from exc
    if out is not None:
        _save_pair(Path(out), stats, digest)
    return stats


def compute_pair_metrics(stats: PairStats, specs: Sequence[MetricSpec]) -> dict[str, np.ndarray]:
    """Apply every pair metric to one pair (and per layer where declared). Pure."""
    view = PairView(stats)
    layer_views = None
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.kind != "pair":
            continue
        try:
            out[spec.name] = np.asarray(spec.fn(view), dtype=np.float64)
            if spec.per_layer:
                if layer_views is None:
                    layer_views = [PairView(stats, i) for i in range(len(stats.layers))]
                out[f"{spec.name}_by_layer"] = np.array([spec.fn(v) for v in layer_views], dtype=np.float64)
        except Exception as exc:
            raise AnalysisError(
                f"metric {spec.name!r} ({spec.source}) failed at step {stats.step}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return out


# --- persistence of per-pair partial results -----------------------------------------------------


def _save_pair(path: Path, stats: PairStats, digest: str) -> None:
    import safetensors.numpy

    meta = {"digest": digest, "step": str(stats.step), "layers": json.dumps(list(stats.layers))}
    data = safetensors.numpy.save(
        {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in stats.to_tensors().items()},
        metadata=meta,
    )
    fmt.atomic_write_bytes(path, data)


def _load_pair(path: Path, digest: str) -> PairStats | None:
    """A persisted pair if it exists and was computed with the same settings, else None."""
    import safetensors.numpy

    if not path.exists():
        return None
    try:
        header = fmt.read_safetensors_header(path)
        meta = header.get("__metadata__", {})
        if meta.get("digest") != digest:
            return None
        tensors = safetensors.numpy.load(path.read_bytes())
        return PairStats.from_tensors(int(meta["step"]), tuple(json.loads(meta["layers"])), tensors)
    except Exception:  # noqa: BLE001 - a damaged partial result is simply recomputed
        return None


def _settings_digest(settings: ProbeSettings, objective_id: str) -> str:
    blob = json.dumps({"v": __version__, "probe": settings.to_json(), "objective": objective_id},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- progress ------------------------------------------------------------------------------------


class _PairProgress(Callback):
    """tqdm bar over finished pair tasks (local schedulers run callbacks in this process)."""

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__()
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="pair", desc="analyze", file=sys.stderr)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if self.bar is not None and isinstance(name, str) and name.startswith("pair-"):
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the public entry points ---------------------------------------------------------------------


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AnalysisError(f"device={device!r}: CUDA is not available on this machine; use cpu or auto")
        return device
    raise AnalysisError(f"device={device!r}: expected cpu, cuda, cuda:N or auto")


def _objective_id(source: ObjectiveSource, recorded: str | None) -> str:
    if source is None:
        return str(recorded)
    if isinstance(source, str):
        return source
    if isinstance(source, Objective):
        return f"Objective({type(source.model).__qualname__})"
    return f"{getattr(source, '__module__', '?')}:{getattr(source, '__qualname__', '?')}"


def _select_steps(pairs: list[int], steps: str | slice | Iterable[int] | None) -> list[int]:
    if steps is None:
        return pairs
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
        stride = steps.step or 1
        return [t for t in pairs if start <= t < stop and (t - start) % stride == 0]
    wanted = set(steps)
    return [t for t in pairs if t in wanted]


def analyze(
    run: str | Path | Run,
    objective: ObjectiveSource = None,
    *,
    points: int = 9,
    margin: float = 0.5,
    device: str = "auto",
    dtype: str = "float32",
    scheduler: str = "synchronous",
    workers: int | None = None,
    steps: str | slice | Iterable[int] | None = None,
    metrics: Iterable[str] | None = None,
    batched: bool = True,
    chunk_size: int | None = None,
    sharpness: bool = False,
    sharpness_max_iter: int = 100,
    reference: int | None = None,
    force: bool = False,
    write: bool = True,
    progress: bool | None = None,
) -> xr.Dataset:
    """Analyze a recorded run and return the metrics Dataset (also written to ``analysis/``).

    Args:
        run: run directory (or an opened :class:`Run`).
        objective: ``"module:function"``, a factory function, or an :class:`Objective`; default:
            the name recorded in the manifest.
        points, margin: α grid (``points`` on [0, 1], extended by ``margin`` on both sides).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available).
        dtype: evaluation dtype, ``float32`` or ``float64`` (independent of the training dtype).
        scheduler: dask scheduler: ``synchronous``, ``threads`` or ``processes``.
        workers: worker count for ``threads``/``processes``.
        steps: which pairs, by start step: ``"START:STOP[:STRIDE]"``, a slice, or step numbers.
        metrics: metric names (default: every registered metric).
        batched, chunk_size: evaluate the α points together with ``vmap`` (in chunks).
        sharpness: also compute λ_max(∇²f(x_t; z_t)) per pair by Lanczos (at most
            ``sharpness_max_iter`` Hessian-vector products); implied when ``metrics`` names a
            metric that needs it.
        reference: step of the reference point x* of ``convexity_ratio_ref`` (default: the final
            recorded state; a run without one gets NaN unless a step is given).
        force: recompute pairs already persisted under ``analysis/pairs``.
        write: write ``analysis/metrics.nc`` (and the per-pair partial results).
        progress: show a progress bar (default: when stderr is a terminal).
    """
    r = run if isinstance(run, Run) else open_run(run)
    if dtype not in ("float32", "float64"):
        raise AnalysisError(f"dtype={dtype!r}: expected float32 or float64")
    selected = get_metrics(metrics)
    # Naming an opt-in metric asks for its probe; otherwise opt-in metrics follow the flags.
    sharpness = sharpness or (metrics is not None and any("sharpness" in s.needs for s in selected.values()))
    provided = {"sharpness"} if sharpness else set()
    selected = {n: s for n, s in selected.items() if set(s.needs) <= provided}
    # An optional probe's results come with its diagnostics (e.g. sharpness with its iteration
    # count and convergence flag): every metric reading only what is provided is free by now.
    for n, s in get_metrics().items():
        if s.needs and set(s.needs) <= provided:
            selected.setdefault(n, s)
    ref_step = _reference_step(r, reference)
    settings = ProbeSettings(
        alphas=tuple(float(a) for a in alpha_grid(points, margin)),
        device=_resolve_device(device),
        dtype=dtype,
        chunk_size=chunk_size,
        batched=batched,
        sharpness=sharpness,
        sharpness_max_iter=sharpness_max_iter,
        reference_step=ref_step,
    )
    specs = _with_requirements(selected, get_metrics())
    pairs = _select_steps(r.pairs, steps)
    lost_all = health.lost_pairs(r)  # issue 7: pairs whose snapshot file went missing
    lost = {t: lost_all[t] for t in _select_steps(list(lost_all), steps)}
    if not pairs and lost:
        first = min(lost)
        raise RunFormatError(f"{r.path}: every selected pair is lost; first: pair {first}: {lost[first]}")
    if not pairs:
        raise AnalysisError(
            f"{r.path}: no analyzable pairs (recorded steps: {len(r.steps)}; a pair needs "
            "snapshots of two consecutive steps; check the schedule's window >= 2 or --steps)"
        )
    # Resolve once here so import errors and name/shape mismatches surface before any work.
    check_run_objective(_objective_for(objective, r.objective), r.manifest)
    digest = _settings_digest(settings, _objective_id(objective, r.objective))
    pairs_dir = r.path / fmt.ANALYSIS_DIR / PAIRS_DIR
    if write:
        fmt.safe_output_dir(r.path, fmt.ANALYSIS_DIR, PAIRS_DIR)  # issue 7: no symlinked way out

    done: dict[int, PairStats] = {}
    if write and not force:
        for t in pairs:
            s = _load_pair(pairs_dir / f"pair_{t:08d}.safetensors", digest)
            if s is not None:
                done[t] = s
    todo = [t for t in pairs if t not in done]

    have = set(r.steps)
    init_step = r.steps[0] if r.steps and r.steps[0] == 0 else None
    loads: dict[int, Any] = {}

    def load(step: int) -> Any:
        if step not in loads:
            loads[step] = dask.delayed(_load_task, pure=True)(
                str(r.step_path(step)), dask_key_name=f"load-{step}"
            )
        return loads[step]

    tasks = []
    for t in todo:
        prev = load(t - 1) if (t - 1) in have and r.kind(t - 1) == fmt.KIND_STEP else None
        init = load(init_step) if init_step is not None else None
        out = str(pairs_dir / f"pair_{t:08d}.safetensors") if write else None
        ref = load(ref_step) if ref_step is not None else None
        tasks.append(dask.delayed(_pair_task, pure=True)(
            load(t), load(t + 1), prev, init, objective, r.objective, settings, r.trainable, out,
            digest, ref, dask_key_name=f"pair-{t}",
        ))
    cb = _PairProgress(len(tasks), sys.stderr.isatty() if progress is None else progress)
    try:
        with cb, _torch_threads(scheduler, workers):
            computed = dask.compute(*tasks, **_scheduler_kwargs(scheduler, workers)) if tasks else ()
    finally:
        cb.close()
    skipped = dict(lost)  # issue 7: damaged/missing snapshots cost only their pairs
    for s in computed:
        if isinstance(s, health.SkippedPair):
            skipped[s.step] = s.reason
            continue
        done[s.step] = s
    ordered = [done[t] for t in pairs if t in done]
    if not ordered:
        first = min(skipped)
        raise RunFormatError(
            f"{r.path}: all {len(skipped)} pair(s) were skipped as damaged or missing; "
            f"first: pair {first}: {skipped[first]}"
        )
    values = [compute_pair_metrics(s, list(specs.values())) for s in ordered]
    ds = build_dataset(ordered, values, specs, r, settings, _objective_id(objective, r.objective))
    health.record_skipped(ds, skipped, len(pairs) + len(lost))
    if write:
        _write_dataset(ds, r.path / fmt.ANALYSIS_DIR / METRICS_FILE)
    return ds


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


def _scheduler_kwargs(scheduler: str, workers: int | None) -> dict[str, Any]:
    if scheduler in ("synchronous", "sync"):
        return {"scheduler": "synchronous"}
    if scheduler in ("threads", "processes"):
        kw: dict[str, Any] = {"scheduler": scheduler}
        if workers:
            kw["num_workers"] = workers
        return kw
    raise AnalysisError(f"scheduler={scheduler!r}: expected synchronous, threads or processes")


@contextlib.contextmanager
def _torch_threads(scheduler: str, workers: int | None) -> Iterator[None]:
    """Split the cores between thread workers so they do not oversubscribe the machine."""
    import torch

    if scheduler != "threads":
        yield
        return
    before = torch.get_num_threads()
    n = workers or os.cpu_count() or 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_dataset(stats: Sequence[PairStats], values: Sequence[dict[str, np.ndarray]],
                  specs: dict[str, MetricSpec], run: Run, settings: ProbeSettings,
                  objective_id: str) -> xr.Dataset:
    """Stack per-pair metric values along ``step`` and add the series metrics. Pure."""
    values = health.sanitize_values(stats, values, run)  # issue 7: affected metrics NaN, never ±Inf
    steps = np.array([s.step for s in stats], dtype=np.int64)
    layers = list(stats[0].layers) if stats else []
    data_vars: dict[str, Any] = {}
    for name, spec in specs.items():
        if spec.kind != "pair":
            continue
        data_vars[name] = (("step", *spec.dims), np.stack([v[name] for v in values]), spec.attrs())
        if spec.per_layer:
            attrs = spec.attrs() | {"long_name": f"{spec.long_name} (per parameter tensor)"}
            data_vars[f"{name}_by_layer"] = (
                ("step", "layer"), np.stack([v[f"{name}_by_layer"] for v in values]), attrs
            )
    lr = np.array([s.lr[0] if len(s.lr) else np.nan for s in stats], dtype=np.float64)
    coords = {
        "step": ("step", steps, {"long_name": "pair start step t", "units": "optimizer step"}),
        "alpha": ("alpha", np.asarray(settings.alphas), {"long_name": "line coordinate α",
                                                        "units": "1",
                                                        "description": "x_t + αΔ_t"}),
        "layer": ("layer", np.array(layers, dtype=object), {"long_name": "parameter tensor"}),
        "lr": ("step", lr, {"long_name": "learning rate (param group 0)", "units": "1"}),
    }
    ds = xr.Dataset(data_vars, coords=coords)
    for name, spec in specs.items():
        if spec.kind == "series":
            ds[name] = ("step", np.asarray(spec.fn(ds), dtype=np.float64), spec.attrs())
    manifest_bytes = (run.path / fmt.MANIFEST).read_bytes()
    ds.attrs = {
        "title": f"trajscope metrics of {run.path.name}",
        "trajscope_version": __version__,
        "run": str(run.path.resolve()),
        "run_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "run_status": run.status,
        "objective": objective_id,
        "probe": json.dumps(settings.to_json()),
        "device": settings.device,
        "eval_dtype": settings.dtype,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return health.add_flags(ds, stats, run)  # issue 7: pair_flags (non-finite, zero update)


def _write_dataset(ds: xr.Dataset, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # issue 7: never write through a symlink planted at the temp name
    ds.to_netcdf(tmp, engine="h5netcdf")
    os.replace(tmp, path)


def open_metrics(run: str | Path | Sequence[str | Path]) -> xr.Dataset:
    """Open the Dataset written by ``trajscope analyze``; several runs concat along ``run``."""
    if isinstance(run, (list, tuple)):
        parts = [open_metrics(p) for p in run]
        names = [Path(p).name for p in run]
        return xr.concat(parts, dim=xr.DataArray(names, dims="run", name="run"), join="outer",
                         combine_attrs="drop_conflicts")
    path = Path(run) / fmt.ANALYSIS_DIR / METRICS_FILE
    if not path.exists():
        raise RunFormatError(f"{path}: no analysis found; run `trajscope analyze {run}` first")
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()
