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

Trackers are optional extras, imported only when used (:data:`TRACKERS`); a missing one is one
:class:`~trajscope.errors.TrajscopeError` naming the extra to install. A tracker is a
:class:`Sink`: adding one is a class with these four methods and an entry in :data:`TRACKERS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trajscope.errors import TrajscopeError

if TYPE_CHECKING:
    import xarray as xr
    from matplotlib.figure import Figure

__all__ = ["TRACKERS", "Sink", "TensorBoardSink", "Rounds", "analyze_to", "export", "open_sink", "pair_scalars"]

PREFIX = "trajscope"
"""The namespace of every tag trajscope logs."""


class Sink(Protocol):
    """Where :func:`export` logs: one tracker run."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` (tag → number) at training step ``step``."""

    def config(self, values: dict[str, Any]) -> None:
        """Log the run's metadata and the analysis settings (JSON-serializable values)."""

    def figure(self, tag: str, fig: Figure, step: int) -> None:
        """Log a matplotlib figure as an image at ``step``."""

    def close(self) -> None:
        """Flush and close (every logged value is on disk, or sent, after it returns)."""


class TensorBoardSink:
    """A TensorBoard log directory (event files read by TensorBoard, ``EventAccumulator``), written
    by torch's ``SummaryWriter``; an existing directory, e.g. the trainer's own, gets a new event
    file beside its others, so the two show in one TensorBoard run."""

    def __init__(self, logdir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrajscopeError(
                "--to tensorboard needs the tensorboard package: pip install 'trajscope[tensorboard]'"
            ) from None
        self.logdir = Path(logdir)
        self._w = SummaryWriter(log_dir=str(self.logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._w.add_scalar(tag, value, global_step=step)

    def config(self, values: dict[str, Any]) -> None:
        text = json.dumps(values, indent=2, sort_keys=True, default=str)
        self._w.add_text(f"{PREFIX}/config", "    " + text.replace("\n", "\n    "), global_step=0)

    def figure(self, tag: str, fig: Figure, step: int) -> None:
        self._w.add_figure(tag, fig, global_step=step, close=True)

    def close(self) -> None:
        self._w.close()


TRACKERS: dict[str, tuple[type, str]] = {"tensorboard": (TensorBoardSink, "tensorboard")}
"""``--to`` name → (the :class:`Sink`, the ``trajscope[...]`` extra that installs its library)."""


def open_sink(to: str, target: str | Path | None) -> Sink:
    """The tracker ``to`` (a :data:`TRACKERS` name), logging to ``target`` (TensorBoard: the log
    directory, required).

    Raises:
        TrajscopeError: an unknown tracker, a missing target, or its library not installed.
    """
    if to not in TRACKERS:
        raise TrajscopeError(f"--to {to!r}: expected one of {', '.join(TRACKERS)}")
    if target is None:
        raise TrajscopeError(f"--to {to} needs a target: the log directory")
    sink: Sink = TRACKERS[to][0](target)
    return sink


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
               notify: Callable[[str], None] | None = None) -> xr.Dataset:
    """``trajscope analyze``'s work: the analysis (followed: round after round, one line per round
    to ``echo``, why it stopped early to ``notify``), logged to the tracker ``to`` at ``target``:
    the pairs, the config and, at the end, the report's figures."""
    from trajscope.analysis.driver import analyze
    from trajscope.analysis.follow import follow as follow_run

    sink = open_sink(to, target) if to is not None else None
    try:
        if follow:
            on_pairs = Rounds(sink, echo)
            ds = follow_run(analyze, run, objective, poll=poll, notify=notify, on_pairs=on_pairs,
                            **{**kw, "progress": False})
            on_pairs.finish(ds)
        elif sink is not None:
            ds = analyze(run, objective, **kw)
            export(ds, sink, figures=True)
        else:
            ds = analyze(run, objective, **kw)
    finally:
        if sink is not None:
            sink.close()
    return ds


class Rounds:
    """The ``on_pairs`` of a followed analysis (:func:`trajscope.analysis.follow.follow`): each round's
    new pairs logged to ``sink`` (the config with the first), one line to ``echo``; :meth:`finish`
    logs again, whole and in step order, every tag whose logged values a later round changed (the
    metrics of x*, the final state, exist only once the run is closed). A reader such as
    TensorBoard's keeps the last series logged for a tag."""

    def __init__(self, sink: Sink | None, echo: Callable[[str], None] | None) -> None:
        self.sink, self.echo = sink, echo
        self.logged: dict[str, dict[int, float]] = {}
        self.pairs = 0

    def __call__(self, ds: xr.Dataset, new: list[int]) -> None:
        if self.sink is not None:
            if not self.logged:
                self.sink.config(_config(ds))
            for t, values in pair_scalars(ds, new):
                self.sink.scalars(t, values)
                for tag, v in values.items():
                    self.logged.setdefault(tag, {})[t] = v
        self.pairs += len(new)
        if self.echo is not None:
            span = f"{new[0]}" if len(new) == 1 else f"{new[0]}-{new[-1]}"
            self.echo(f"pairs {span} analyzed ({self.pairs} so far)")

    def finish(self, ds: xr.Dataset) -> None:
        """Log again the tags whose values ``ds`` changed, then the figures."""
        if self.sink is None:
            return
        final = dict(pair_scalars(ds))
        changed = {tag for tag, seen in self.logged.items()
                   if any(not _same(v, final.get(t, {}).get(tag, math.nan)) for t, v in seen.items())}
        for t, values in final.items():
            again = {tag: v for tag, v in values.items() if tag in changed}
            if again:
                self.sink.scalars(t, again)
        export(ds, self.sink, steps=[], figures=True, config=False)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _config(ds: xr.Dataset) -> dict[str, Any]:
    return {"run": ds.attrs.get("run"), "analysis": {k: _plain(v) for k, v in ds.attrs.items()}}
