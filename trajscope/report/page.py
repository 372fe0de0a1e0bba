"""``trajscope report``: the paper-style figures of one or several analyzed runs, as PNG files and
a small ``index.html`` that shows them beside the summary table.

This module loads the runs (:func:`load_runs`), renders each figure of
:data:`trajscope.report.figures.FIGURES` to PNG and writes the page (:func:`write_report`). It
presents and computes nothing: the figures are drawn by :mod:`trajscope.report.figures`, the table's
numbers and labels come from :func:`trajscope.report.summary.table_rows`. The figure functions and
the helpers the figures draw (``ema``, ``stability_ratio``) are importable from
:mod:`trajscope.report`.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from trajscope import confine
from trajscope import runformat as fmt
from trajscope.analysis.outputs import check_writable, output_dir, per_run
from trajscope.errors import AnalysisError, RunFormatError
from trajscope.report.figures import (
    FIGURES,
    Runs,
    figure_data,
)
from trajscope.report.summary import TABLE_LABELS, table_rows

__all__ = ["Report", "load_runs", "write_report"]

REPORT_DIR = fmt.REPORT_DIR



# --- the page -----------------------------------------------------------------------------------

def _fmt(key: str, v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "–"
    if key == "pairs":
        return str(int(v))
    if key.startswith("frac_"):
        return f"{v:.1%}"
    return f"{v:.4g}"


# --- loading and writing --------------------------------------------------------------------------


def load_runs(runs: str | Path | xr.Dataset | Sequence[str | Path | xr.Dataset] | Runs,
              analysis: str | Path | Sequence[str | Path | None] | None = None) -> dict[str, xr.Dataset]:
    """Normalise the report's input to ``{label: Dataset}``.

    Accepts run directories (opened with :func:`trajscope.open_metrics`; labelled by directory
    name, with parent names added until the labels are unique), Datasets (a Dataset with a ``run``
    dim is split into its runs, dropping the steps a run lacks), or a mapping label → Dataset.
    ``analysis``: the analysis directory of each run directory, in order (as in ``open_metrics``).
    """
    from trajscope.analysis.driver import open_metrics

    if isinstance(runs, Mapping) and not isinstance(runs, xr.Dataset):  # a Dataset is a Mapping too
        out = dict(runs)
    else:
        items = _items(runs)
        if not items:
            raise AnalysisError("report: no runs given; pass at least one analyzed run directory")
        paths = [Path(p) for p in items if not isinstance(p, xr.Dataset)]
        labels = _unique_labels(paths)
        dirs = iter(per_run(analysis, len(paths)))  # in the order of the run directories
        out = {}
        for i, item in enumerate(items):
            if isinstance(item, xr.Dataset):
                if "run" in item.dims:
                    names = [str(r) for r in item["run"].values] if "run" in item.coords else []
                    for j in range(item.sizes["run"]):
                        part = item.isel(run=j, drop=True)
                        # |ℓ| < inf: finite (NaN compares false), and stays an xarray DataArray
                        keep = (abs(part["loss_line"]) < np.inf).any("alpha") if "loss_line" in part else None
                        label = names[j] if names else f"run{j}"
                        if label in out:  # open_metrics labels by directory name only
                            label = f"{label} ({j})"
                        out[label] = part.isel(step=np.flatnonzero(keep.values)) if keep is not None else part
                else:
                    out[str(item.attrs.get("title", f"run{i}")).removeprefix("trajscope metrics of ")] = item
            else:
                out[labels[Path(item)]] = open_metrics(item, next(dirs))
    for label, ds in out.items():
        if "step" not in ds.dims or ds.sizes["step"] == 0:
            raise RunFormatError(f"report: run {label!r} has no analyzed pairs (empty 'step' dimension)")
    return out


def _items(runs: str | Path | xr.Dataset | Sequence[str | Path | xr.Dataset] | Runs) -> list[str | Path | xr.Dataset]:
    """The runs given to the report, as a list (the Datasets of a mapping)."""
    if isinstance(runs, Mapping) and not isinstance(runs, xr.Dataset):
        return list(runs.values())
    return [runs] if isinstance(runs, (str, Path, xr.Dataset)) else list(runs)


def _unique_labels(paths: Sequence[Path]) -> dict[Path, str]:
    """Directory names, with parent directories prepended to the names that collide."""
    resolved = {p: p.resolve() for p in paths}
    depth = {p: 1 for p in paths}

    def label(p: Path) -> str:
        return "/".join(resolved[p].parts[-depth[p]:])

    for _ in range(max((len(r.parts) for r in resolved.values()), default=1)):
        seen: dict[str, list[Path]] = {}
        for p in paths:
            seen.setdefault(label(p), []).append(p)
        clashes = [group for group in seen.values() if len({resolved[q] for q in group}) > 1]
        if not clashes:
            break
        for group in clashes:
            for p in group:
                depth[p] += 1
    return {p: label(p) for p in paths}


@dataclass
class Report:
    """What :func:`write_report` wrote.

    Attributes:
        out_dir: the report directory.
        index: path of ``index.html``.
        figures: figure name → PNG path, in page order.
        data: figure name → :func:`figure_data` of the figure as drawn (what the PNG shows).
        summary: run label → :func:`trajscope.report.summary.table_rows`.
        skipped: figure name → why it was left out (its variables are absent).
    """

    out_dir: Path
    index: Path
    figures: dict[str, Path] = field(default_factory=dict)
    data: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def write_report(
    runs: str | Path | xr.Dataset | Sequence[str | Path | xr.Dataset] | Runs,
    out: str | Path | None = None,
    *,
    beta: float = 0.9,
    window: int | None = None,
    dpi: int = 110,
    analysis: str | Path | Sequence[str | Path | None] | None = None,
) -> Report:
    """Render every figure for one or several analyzed runs, and an ``index.html`` showing them
    with the summary table.

    Args:
        runs: run directories (analyzed), Datasets, or ``{label: Dataset}``; several overlay.
        out: report directory (default: ``<first run dir>/report``; required for Datasets). Made
            absolute once and refused where a component is a symlink, in a run's storage or
            inside a run directory other than the reported runs'
            (:func:`trajscope.analysis.outputs.output_dir`).
        beta: EMA weight on the past for the ``inst_gap`` figure.
        window: pairs in the windowed convexity ratio (default: a tenth of the run, at least 2).
        dpi: resolution of the PNG files.
        analysis: the analysis directory of each run directory, in order, where it is not
            ``RUN/analysis`` (as in :func:`trajscope.open_metrics`).
    """
    if window is not None and window < 1:
        raise AnalysisError(f"window={window!r}: expected an int >= 1")
    if not 0 <= beta < 1:
        raise AnalysisError(f"beta={beta!r}: expected 0 <= beta < 1")
    if out is None:
        first = runs[0] if isinstance(runs, Sequence) and not isinstance(runs, str) and runs else runs
        if not isinstance(first, (str, Path)):
            raise AnalysisError("report: pass out=DIR when the runs are given as Datasets")
        # Inside the run: `report` must be a real directory there, never a planted symlink.
        check_writable(Path(first) / REPORT_DIR, "the report", "pass --out DIR (write_report(..., out=DIR))")
        loaded = load_runs(runs, analysis)
        out_dir = confine.safe_output_dir(Path(first), REPORT_DIR)
    else:
        own = [Path(p) for p in _items(runs) if isinstance(p, (str, Path))]
        out_dir, _ = output_dir(out, "the report", own)  # checked before reading, created after
        loaded = load_runs(runs, analysis)
        confine.make_dirs(out_dir)  # one real directory at a time: a link planted meanwhile is refused
    rep = Report(out_dir=out_dir, index=out_dir / "index.html")
    options = {"beta": beta, "window": window}
    for spec in FIGURES:
        have = {label: ds for label, ds in loaded.items() if all(n in ds.variables for n in spec.needs)}
        if not have:
            rep.skipped[spec.name] = f"needs {', '.join(spec.needs)}, absent from every run"
            continue
        fig = spec.draw(have, **{k: options[k] for k in spec.options})
        path = out_dir / f"{spec.name}.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        fmt.atomic_write_bytes(path, buf.getvalue())  # replaces a planted link, never writes through it
        rep.figures[spec.name] = path
        rep.data[spec.name] = figure_data(fig)
    rep.summary = {label: table_rows(ds) for label, ds in loaded.items()}
    fmt.atomic_write_bytes(rep.index, _html(loaded, rep).encode("utf-8"))
    return rep


def _html(runs: Runs, rep: Report) -> str:
    esc = html.escape
    keys: list[str] = []
    for rows in rep.summary.values():
        keys += [k for k in rows if k not in keys]
    head = "".join(f"<th>{esc(label)}</th>" for label in runs)
    body = "".join(
        f"<tr><td>{esc(TABLE_LABELS.get(k, k))}</td>"
        + "".join(f"<td>{esc(_fmt(k, rep.summary[label].get(k, float('nan'))))}</td>" for label in runs)
        + "</tr>"
        for k in keys
    )
    prov = "".join(
        f"<tr><td>{esc(label)}</td><td>{esc(str(ds.attrs.get('run', '')))}</td>"
        f"<td>{esc(str(ds.attrs.get('objective', '')))}</td><td>{ds.sizes['step']}</td>"
        f"<td>{esc(str(ds.attrs.get('eval_dtype', '')))}</td><td>{esc(str(ds.attrs.get('created', '')))}</td></tr>"
        for label, ds in runs.items()
    )
    specs = {s.name: s for s in FIGURES}
    figs = "".join(
        f'<section id="{esc(name)}"><h2>{esc(specs[name].title)}</h2>'
        f'<a href="{esc(path.name)}"><img src="{esc(path.name)}" alt="{esc(specs[name].title)}"></a>'
        f"<p>{esc(specs[name].caption)}</p></section>"
        for name, path in rep.figures.items()
    )
    skipped = "".join(f"<li>{esc(n)}: {esc(why)}</li>" for n, why in rep.skipped.items())
    toc = " · ".join(f'<a href="#{esc(n)}">{esc(specs[n].title)}</a>' for n in rep.figures)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>trajscope report: {esc(", ".join(runs))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
td + td {{ font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
section p {{ color: #444; font-size: 0.92em; }}
</style></head><body>
<h1>trajscope report</h1>
<p>Do the assumptions of optimization theory hold along the path the optimizer took?
Generated {esc(when)}. Variables and formulas: <code>trajscope metrics</code>.</p>
<nav>{toc}</nav>
<h2>Summary</h2>
<table><tr><th></th>{head}</tr>{body}</table>
<h2>Runs</h2>
<table><tr><th>run</th><th>path</th><th>objective</th><th>pairs</th><th>eval dtype</th>
<th>analyzed</th></tr>{prov}</table>
{figs}
{f"<h2>Not shown</h2><ul>{skipped}</ul>" if skipped else ""}
</body></html>
"""
