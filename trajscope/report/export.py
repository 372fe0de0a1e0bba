"""Putting the metrics where people already look: ``trajscope export RUN --to tensorboard DIR``, and
``--to`` on ``trajscope analyze`` (with ``--follow``: as the pairs arrive).

What a tracker gets (:func:`export`):

* each per-pair variable of the Dataset (dimension ``step`` alone) as the scalar
  ``trajscope/<variable>`` at the pair's training step t; each per-layer one (``step`` × ``layer``)
  as ``trajscope/<variable>/<layer>``. Values are logged as they are, NaN included (a metric
  undefined at a pair: see ``docs/metrics.md``);
* the report's figures (:data:`trajscope.report.figures.FIGURES`) as images at the last step, when
  asked for (a post-hoc export, and the end of a followed run);
* the run's metadata and the analysis' settings (the Dataset's attributes) as the tracker's config.

The trackers themselves (TensorBoard, MLflow, W&B) are :mod:`trajscope.report.trackers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trajscope.report.trackers import PREFIX, Sink, open_sink

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["Rounds", "analyze_to", "export", "pair_scalars"]


def pair_scalars(ds: xr.Dataset, steps: Sequence[int] | None = None) -> Iterator[tuple[int, dict[str, float]]]:
    """``(t, {tag: value})`` for each pair start step t of ``ds`` (those in ``steps`` when given), in
    step order: ``trajscope/<variable>`` for every numeric variable along ``step`` alone and
    ``trajscope/<variable>/<layer>`` for every one along ``step`` and ``layer``."""
    wanted = None if steps is None else {int(t) for t in steps}
    single = [n for n, v in ds.data_vars.items() if v.dims == ("step",) and v.dtype.kind in "fiub"]
    layered = [n for n, v in ds.data_vars.items() if v.dims == ("step", "layer") and v.dtype.kind in "fiub"]
    layers = [str(x) for x in ds["layer"].values] if "layer" in ds.dims else []
    for i, t in enumerate(int(s) for s in ds["step"].values):
        if wanted is not None and t not in wanted:
            continue
        values = {f"{PREFIX}/{n}": float(ds[n].values[i]) for n in single}
        for n in layered:
            row = ds[n].values[i]
            values.update({f"{PREFIX}/{n}/{layer}": float(row[j]) for j, layer in enumerate(layers)})
        yield t, values


def export(ds: xr.Dataset, sink: Sink, *, steps: Sequence[int] | None = None, figures: bool = False,
           config: bool = True) -> int:
    """Log the pairs of ``ds`` (those in ``steps`` when given) to ``sink``, with the config and,
    when ``figures``, the report's figures at the last step; the number of pairs logged."""
    if config:
        sink.config(_config(ds))
    n = 0
    for t, values in pair_scalars(ds, steps):
        sink.scalars(t, values)
        n += 1
    if figures and ds.sizes.get("step", 0):
        _figures(ds, sink, int(ds["step"].values[-1]))
    return n


def _figures(ds: xr.Dataset, sink: Sink, step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: figures are rendered to images
    from trajscope.report.figures import FIGURES

    runs = {str(ds.attrs.get("run", "run")): ds}
    for spec in FIGURES:
        if any(name in ds for name in spec.needs):
            sink.figure(f"{PREFIX}/figures/{spec.name}", spec.draw(runs), step)


def _plain(value: Any) -> Any:
    """An attribute as a JSON value: numbers (NaN as None), strings, lists of them."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def analyze_to(run: Any, objective: Any, kw: dict[str, Any], *, follow: bool, poll: float, to: str | None,
               target: str | None, echo: Callable[[str], None] | None,
               notify: Callable[[str], None] | None = None, prune: bool = False,
               keep: str | None = None) -> xr.Dataset:
    """``trajscope analyze``'s work: the analysis (followed: round after round, one line per round
    to ``echo``, why it stopped early to ``notify``), logged to the tracker ``to`` at ``target``:
    the pairs, the config and, at the end, the report's figures; with ``prune``, the snapshots
    whose pairs are analyzed removed after each round (:mod:`trajscope.analysis.prune`)."""
    from trajscope.analysis.driver import analyze
    from trajscope.analysis.follow import follow as follow_run
    from trajscope.analysis.prune import pruner

    path = Path(getattr(run, "path", run))
    sink = open_sink(to, target, path.name) if to is not None else None
    pruned = pruner(path, kw.get("out"), keep, echo) if prune else None
    try:
        if follow:
            rounds = Rounds(sink, echo, after=pruned)
            ds = follow_run(analyze, run, objective, poll=poll, notify=notify, on_pairs=rounds,
                            **{**kw, "progress": False})
            rounds.finish(ds)
        else:
            ds = analyze(run, objective, **kw)
            if sink is not None:
                export(ds, sink, figures=True)
        if pruned is not None:
            pruned(ds)
    finally:
        if sink is not None:
            sink.close()
    return ds


class Rounds:
    """The ``on_pairs`` of a followed analysis (:func:`trajscope.analysis.follow.follow`): each round's
    new pairs logged to ``sink`` (the config with the first), one line to ``echo``.

    A round logs the finite values only. :meth:`finish`, after the last round, logs what is still
    missing (the metrics of x*, the final state by default, exist only once the run is closed; a
    value undefined at its pair stays NaN), and logs again a value a later round changed: so each
    tracker gets every value at least once, and once only in the usual case."""

    def __init__(self, sink: Sink | None, echo: Callable[[str], None] | None,
                 after: Callable[[xr.Dataset], None] | None = None) -> None:
        self.sink, self.echo, self.after = sink, echo, after
        self.logged: dict[tuple[int, str], float] = {}
        self.pairs = 0

    def __call__(self, ds: xr.Dataset, new: list[int]) -> None:
        if self.sink is not None:
            if not self.logged:
                self.sink.config(_config(ds))
            for t, values in pair_scalars(ds, new):
                finite = {tag: v for tag, v in values.items() if math.isfinite(v)}
                self.sink.scalars(t, finite)
                self.logged.update({(t, tag): v for tag, v in finite.items()})
        self.pairs += len(new)
        if self.echo is not None:
            span = f"{new[0]}" if len(new) == 1 else f"{new[0]}-{new[-1]}"
            self.echo(f"pairs {span} analyzed ({self.pairs} so far)")
        if self.after is not None:  # pruning: once this round's pairs are persisted
            self.after(ds)

    def finish(self, ds: xr.Dataset) -> None:
        """Log the values not logged yet, or changed since, then the figures."""
        if self.sink is None:
            return
        for t, values in pair_scalars(ds):
            rest = {tag: v for tag, v in values.items()
                    if (t, tag) not in self.logged or not _same(self.logged[(t, tag)], v)}
            if rest:
                self.sink.scalars(t, rest)
        export(ds, self.sink, steps=[], figures=True, config=False)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _config(ds: xr.Dataset) -> dict[str, Any]:
    return {"run": ds.attrs.get("run"), "analysis": {k: _plain(v) for k, v in ds.attrs.items()}}
