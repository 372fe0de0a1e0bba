"""The metrics Dataset: pair metrics from :class:`PairStats`, stacked along ``step``, series
metrics added over it; written atomically to ``analysis/metrics.nc`` and read back.

Metric functions run in the driver: each takes microseconds, less than shipping it to a worker,
and resumed pairs need them too. The Dataset is written to a temporary file and renamed, so it is
never seen half-written. Worker processes never import xarray or netCDF4.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trajscope import runformat as fmt
from trajscope.analysis import health
from trajscope.analysis.outputs import check_read, per_run, run_identity
from trajscope.analysis.persist import VERSION
from trajscope.errors import RunFormatError, one_line
from trajscope.metrics.pair import PairStats
from trajscope.metrics.registry import MetricSpec
from trajscope.probe.settings import ProbeSettings
from trajscope.store.run import Run

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["build_dataset", "import_dataset_libraries", "import_libraries_in_background", "layer_union",
           "open_metrics", "write_dataset"]



def build_dataset(stats: Sequence[PairStats], values: Sequence[dict[str, np.ndarray]],
                  specs: dict[str, MetricSpec], run: Run, settings: ProbeSettings,
                  objective_id: str) -> xr.Dataset:
    """Stack per-pair metric values along ``step`` and add the series metrics. Pure."""
    values = health.sanitize_values(stats, values, run)  # damage is local: affected metrics NaN, never ±Inf
    steps = np.array([s.step for s in stats], dtype=np.int64)
    layers = layer_union(stats, [p["name"] for p in run.manifest["params"]])
    data_vars: dict[str, Any] = {}
    for name, spec in specs.items():
        if spec.kind != "pair":
            continue
        data_vars[name] = (("step", *spec.dims), np.stack([v[name] for v in values]), spec.attrs())
        if spec.per_layer:
            attrs = spec.attrs() | {"long_name": f"{spec.long_name} (per parameter tensor)"}
            rows = [_on_layers(v[f"{name}_by_layer"], s.layers, layers) for s, v in zip(stats, values)]
            data_vars[f"{name}_by_layer"] = (("step", "layer"), np.stack(rows), attrs)
    lr = np.array([s.lr[0] if len(s.lr) else np.nan for s in stats], dtype=np.float64)
    coords = {
        "step": ("step", steps, {"long_name": "pair start step t", "units": "optimizer step"}),
        "alpha": ("alpha", np.asarray(settings.alphas), {"long_name": "line coordinate α",
                                                        "units": "1",
                                                        "description": "x_t + αΔ_t"}),
        "layer": ("layer", np.array(layers, dtype=object), {"long_name": "parameter tensor"}),
        "lr": ("step", lr, {"long_name": "learning rate (param group 0)", "units": "1"}),
    }
    import xarray as xr

    ds = xr.Dataset(data_vars, coords=coords)
    for name, spec in specs.items():
        if spec.kind == "series":
            ds[name] = ("step", np.asarray(spec.fn(ds), dtype=np.float64), spec.attrs())
    manifest_bytes = (run.path / fmt.MANIFEST).read_bytes()
    ds.attrs = {
        "title": f"trajscope metrics of {run.path.name}",
        "trajscope_version": VERSION,
        "run": str(run.path.resolve()),
        "run_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "run_identity": run_identity(run.manifest, complete=run.status == fmt.STATUS_COMPLETE),
        "run_status": run.status,
        "objective": objective_id,
        "probe": json.dumps(settings.to_json()),
        "device": settings.device,
        "eval_dtype": settings.dtype,
        "eval_precision": settings.precision_label,
        "derivatives": settings.derivatives_label,
        "derivatives_reason": settings.derivatives_reason,
        # pairs whose line vmap could not batch (evaluated point by point: same numbers, slower)
        "line_batched_fallback_pairs": sum(
            s.extras.get("line_batched") == 0.0 if settings.batched else s.extras.get("line_fallback") == 1.0
            for s in stats
        ) if settings.batched is not False and settings.derivatives == "forward" else 0,
        **_line_plan_attrs(stats),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return health.add_flags(ds, stats, run)  # pair_flags (non-finite, zero update)


def layer_union(stats: Sequence[PairStats], order: Sequence[str]) -> list[str]:
    """The Dataset's ``layer`` coordinate: the pairs' coordinates of x. When the trainable set changed
    during training the pairs differ; then every name any pair has, in ``order`` (the manifest's
    parameter order; names it lacks follow in the order first seen)."""
    if not stats:
        return []
    first = list(stats[0].layers)
    if all(s.layers == stats[0].layers for s in stats):
        return first
    seen = {n: i for i, n in enumerate(dict.fromkeys(n for s in stats for n in s.layers))}
    rank = {n: i for i, n in enumerate(order)}
    return sorted(seen, key=lambda n: (rank.get(n, len(rank)), seen[n]))


def _on_layers(row: np.ndarray, have: Sequence[str], layers: Sequence[str]) -> np.ndarray:
    """A pair's per-layer values (in its own ``have`` order) on the Dataset's ``layers``: NaN for a
    parameter that is not a coordinate of x in this pair."""
    if tuple(have) == tuple(layers):
        return row
    out = np.full(len(layers), np.nan)
    at = {n: i for i, n in enumerate(layers)}
    for n, v in zip(have, np.asarray(row, dtype=np.float64)):
        out[at[n]] = v
    return out


def _line_plan_attrs(stats: Sequence[PairStats]) -> dict[str, Any]:
    """``line_mode`` (batched or pointwise) and ``line_chunk`` (α points per evaluation call) of the
    first pair probed under a memory plan (trajscope.probe.line_plan); none when every pair was reused or
    unplanned. The measured costs and timings stay in the pairs' extras (``line_point_bytes``, …):
    they vary from run to run, and a resumed analysis has the same attrs as an uninterrupted one."""
    planned = [s.extras for s in stats if "line_chunk" in s.extras]
    if not planned:
        return {}
    e = planned[0]
    mode = "batched" if e["line_batched_mode"] == 1.0 else "pointwise"
    return {"line_mode": mode, "line_chunk": int(e["line_chunk"])}


def write_dataset(ds: xr.Dataset, path: Path) -> None:
    """Write to a temp file, fsync, rename: readers see the old Dataset or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # never write through a symlink planted at the temp name
    try:
        # What ds.to_netcdf(tmp, engine="netcdf4") does for a Dataset of numpy arrays, without
        # its question to dask about the active scheduler (to choose a file lock), which imports
        # `distributed`, a large package, only to learn that no cluster client exists. This
        # process is the file's only writer. netCDF4 (the netCDF C library) rather than h5netcdf,
        # which writes the same file but looks each HDF5 object up by name again for every
        # attribute and dimension it touches (docs/performance.md).
        from xarray.backends import NetCDF4DataStore

        store = NetCDF4DataStore.open(tmp, mode="w", format="NETCDF4", lock=threading.Lock())
        # No _FillValue: every value is written, and NaN already marks an undefined metric.
        no_fill = {name: {"_FillValue": None} for name, v in ds.variables.items() if v.dtype.kind == "f"}
        try:
            ds.dump_to_store(store, encoding=no_fill)
        finally:
            store.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk under the netCDF writer names no file: name this one
        raise fmt.named(exc, path) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def import_dataset_libraries() -> None:
    """Import what building and writing the Dataset needs: xarray, the dask.array that xarray
    imports at its first variable (to recognise dask arrays), and netCDF4."""
    import dask.array  # noqa: F401
    import netCDF4  # noqa: F401
    import xarray  # noqa: F401


def import_libraries_in_background() -> None:
    """Import xarray, dask.array and netCDF4 while the pairs are probed, not after.

    The driver needs them only to build and write the Dataset at the end, where their first
    import (xarray, then the dask.array it probes for duck arrays, and netCDF4) would be a
    serial tail after the last pair. Worker processes never import them.
    """
    if "netCDF4" in sys.modules:
        return
    # Called once the scheduler is set up (a cluster's `distributed` imported): two threads
    # importing overlapping packages at once can meet in a circular import, which Python reports
    # as a deadlock error in one of them. This thread's remaining lazy imports (torch's) share no
    # module with the ones below.

    def work() -> None:
        with contextlib.suppress(Exception):  # the real import, later, reports any problem
            import_dataset_libraries()

    threading.Thread(target=work, name="trajscope-import", daemon=True).start()


def open_metrics(run: str | Path | Sequence[str | Path],
                 analysis: str | Path | Sequence[str | Path | None] | None = None) -> xr.Dataset:
    """Open the Dataset written by ``trajscope analyze``; several runs concat along ``run``.

    Each Dataset must be trajscope's and an analysis of the run it is read for
    (:func:`trajscope.analysis.outputs.check_read`: the same manifest, or the same directory and
    manifest identity), wherever it was read from.

    Args:
        run: a run directory, or several.
        analysis: the analysis directory each run was analyzed into (``analyze(..., out=DIR)``,
            ``trajscope analyze RUN --out DIR``): one directory, or one entry per run (None:
            that run's ``RUN/analysis``). Default: ``RUN/analysis`` of every run.

    Raises:
        RunFormatError: no analysis there, a file that is not a trajscope metrics Dataset, or the
            analysis of another run (naming both).
    """
    import xarray as xr

    if isinstance(run, (list, tuple)):
        parts = [open_metrics(p, a) for p, a in zip(run, per_run(analysis, len(run)), strict=True)]
        names = [Path(p).name for p in run]
        if len(set(names)) < len(names):  # runs/cnn/sgd and runs/convex/sgd: keep them apart
            names = [str(p) for p in run]
        return xr.concat(parts, dim=xr.DataArray(names, dims="run", name="run"), join="outer",
                         combine_attrs="drop_conflicts")
    run_dir = Path(run) if isinstance(run, (str, Path)) else Path(str(run))
    if not run_dir.is_dir():
        raise RunFormatError(f"{run}: no such run directory")
    (where,) = per_run(analysis, 1)
    path = (run_dir / fmt.ANALYSIS_DIR if where is None else where) / fmt.METRICS_FILE
    if not path.exists() and not path.is_symlink():
        out = "" if where is None else f" --out {where}"
        raise RunFormatError(f"{path}: no analysis found; run `trajscope analyze {run}{out}` first")
    fmt.open_regular(path, "metrics Dataset").close()  # a FIFO there would block the open below
    try:
        with xr.open_dataset(path, engine="netcdf4") as ds:
            check_read(ds.attrs, run_dir, path)  # before loading: a foreign file's data is never read
            return ds.load()
    except (OSError, ValueError) as exc:
        # The netCDF library's OSError carries the path beside its reason: name the file once.
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        reason = one_line(" ".join(text.split()), 300)
        raise RunFormatError(f"{path}: cannot read the metrics Dataset ({reason})") from exc
