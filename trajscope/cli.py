"""The ``trajscope`` command line. Exit 0 on success, 1 on a trajscope error (one line, no
traceback unless ``--debug``), 2 on a usage error.

Every failure is printed as one line, ``trajscope: error: <message>``, where the message names the
file, step or argument at fault and what was expected; strings that come from a run directory are
printed with control characters escaped. ``--debug`` (anywhere on the command line) adds the
traceback. trajscope's own warnings (e.g. pairs skipped because a snapshot is damaged) print as
``trajscope: warning: <message>``; other libraries' warnings print as Python prints them.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import click

from trajscope import runformat as fmt
from trajscope.errors import TrajscopeError, TrajscopeWarning, one_line
from trajscope.probe.grid import MAX_MARGIN, MAX_POINTS

if TYPE_CHECKING:

    from trajscope.store.run import Run

_RUN_DIR = click.Path(file_okay=True, dir_okay=True, path_type=str)
_ANALYSIS_DIR = click.Path(file_okay=False, path_type=str)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trajscope")
def cli() -> None:
    """Test the assumptions of optimization theory along a recorded training trajectory.

    Add --debug to any command to see the traceback of an error.
    """


def _check_scheduler(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # Imported here: trajscope.analysis pulls in dask and torch, which `trajscope --help` must not pay for.
    from trajscope.analysis.execution import check_scheduler
    from trajscope.errors import AnalysisError

    try:
        check_scheduler(value)
    except AnalysisError:
        raise click.BadParameter(f"{value!r}: expected synchronous, threads, processes or a dask.distributed "
                                 "address such as tcp://host:8786") from None
    return value


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from trajscope.analysis.execution import check_device
    from trajscope.errors import AnalysisError

    try:
        return check_device(value)
    except AnalysisError:
        raise click.BadParameter(f"{value!r}: expected cpu, cuda, cuda:N or auto") from None


def _check_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--max-memory``: bytes from SIZE (``trajscope.probe.memory.parse_size``)."""
    if value is None:
        return None
    from trajscope.errors import AnalysisError
    from trajscope.probe.memory import parse_size

    try:
        return parse_size(value)
    except AnalysisError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option("--objective", metavar="MODULE:FUNCTION",
              help="Objective factory to rebuild the loss (default: the one the run recorded).")
@click.option("--points", default=9, show_default=True, type=click.IntRange(min=2, max=MAX_POINTS),
              help="Grid points on [0, 1] along each step.")
@click.option("--margin", default=0.5, show_default=True, type=click.FloatRange(min=0, max=MAX_MARGIN),
              help="Grid extension beyond [0, 1] on both sides, in units of the step.")
@click.option("--device", default="auto", show_default=True, callback=_check_device,
              help="cpu, cuda, cuda:N or auto (CUDA when available). With several GPUs, cuda or "
                   "auto gives each worker its own.")
@click.option("--dtype", type=click.Choice(["as-trained", "float32", "float64", "auto"]), default="as-trained",
              show_default=True, help="Evaluation precision. as-trained: each step under the autocast "
                                      "and memory formats training used, in float64 when the run's floating "
                                      "parameters are all float64, else float32 (auto: the same). float32, "
                                      "float64: that dtype throughout, without autocast; the replay check "
                                      "then allows training's rounding.")
@click.option("--scheduler", default="synchronous", show_default=True, callback=_check_scheduler,
              metavar="synchronous|threads|processes|ADDRESS",
              help="Where pairs are probed: this thread, a thread pool (one GPU), a process pool "
                   "(CPU), or a dask.distributed scheduler at ADDRESS (tcp://host:8786) whose "
                   "workers see RUN_DIR at the same path.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Workers for threads/processes (default: one per core); torch threads are "
                   "split between them.")
@click.option("--steps", metavar="START:STOP[:STRIDE]", help="Analyze only these pair start steps.")
@click.option("--metrics", "metric_names", metavar="NAMES",
              help="Comma-separated metric names (default: all).")
@click.option("--derivatives", type=click.Choice(["auto", "forward", "reverse"]), default="auto",
              show_default=True,
              help="How the slope along each step is computed: forward-mode AD (batched), reverse "
                   "mode (one backward per point; any model training can backpropagate through), or "
                   "auto (forward when the model supports it, decided once; reverse for an analysis "
                   "too small to repay forward mode's one-time set-up).")
@click.option("--max-memory", "max_memory", metavar="SIZE", callback=_check_size,
              help="Memory the analysis may add to each worker (the model, snapshots, line, gradients; "
                   "on a GPU, device memory), in bytes or like 4GB, 512MiB, split between worker "
                   "processes; a budget below one pair's needs is refused at once (default: half the "
                   "available memory, or of the GPU's free memory, for the line evaluation).")
@click.option("--sharpness", is_flag=True,
              help="Also compute λ_max of the minibatch Hessian at x_t (Lanczos; opt-in, costly).")
@click.option("--reference", "reference", type=int, metavar="STEP",
              help="Reference point x* of convexity_ratio_ref (default: the final recorded state).")
@click.option("--force", is_flag=True,
              help="Recompute pairs already analyzed (by default, finished pairs are reused).")
@click.option("--out", type=_ANALYSIS_DIR, metavar="DIR",
              help="Write the analysis (metrics.nc, pairs/) to DIR instead of RUN_DIR/analysis, e.g. "
                   "for a run directory you cannot write; other commands read it with --analysis DIR.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bar or summary (the bar is also off when stderr is not a terminal).")
@click.option("--follow", is_flag=True,
              help="Analyze each pair as soon as it is recorded, while the run trains; exit when the "
                   "recorder closes the run (or is gone).")
@click.option("--poll", type=click.FloatRange(min=0.1, max=3600), default=2.0, show_default=True,
              metavar="SECONDS", help="With --follow: seconds between looks at the run.")
@click.option("--to", "to", type=click.Choice(["tensorboard", "mlflow", "wandb"]),
              help="Also log the metrics to this tracker, at TARGET (tensorboard: a log directory; mlflow: "
                   "a tracking URI; wandb: a project); with --follow, as the pairs arrive.")
@click.option("--prune", is_flag=True, help="Remove each step's snapshot once every pair that reads it is "
              "analyzed (keeps step 0, the reference point and the final state; safetensors runs only).")
@click.option("--keep", metavar="STEPS", help="With --prune: also keep these steps (START:STOP[:STRIDE]).")
@click.argument("target", required=False)
def analyze(run_dir: str, objective: str | None, points: int, margin: float, device: str,
            dtype: str, scheduler: str, workers: int | None, steps: str | None,
            metric_names: str | None, derivatives: str, max_memory: int | None, sharpness: bool,
            reference: int | None, force: bool, out: str | None, quiet: bool, follow: bool, poll: float,
            to: str | None, prune: bool, keep: str | None, target: str | None) -> None:
    """Re-evaluate the loss along each recorded step and compute every metric.

    Writes RUN_DIR/analysis/metrics.nc (or DIR/metrics.nc with --out DIR); open it with
    trajscope.open_metrics(RUN_DIR). Each finished pair is kept under RUN_DIR/analysis/pairs, so
    an interrupted analysis resumes where it stopped and newly recorded steps only cost their new
    pairs. TARGET: where --to logs.
    """
    from trajscope.analysis.dataset import import_dataset_libraries
    from trajscope.probe import memory
    from trajscope.report.summary import format_headline, headline
    from trajscope.store.run import open_run

    if target is not None and to is None:
        raise click.UsageError("TARGET goes with --to TRACKER (e.g. --to tensorboard LOGDIR)")
    memory.own_process()  # this process's peak-memory marks are the analysis' to measure with
    run = open_run(run_dir)  # a wrong RUN_DIR fails before the Dataset's libraries are imported
    if not follow:
        _warn_incomplete(run)
    import_dataset_libraries()
    _libraries_imported()
    names = [n.strip() for n in metric_names.split(",") if n.strip()] if metric_names else None
    kw = dict(points=points, margin=margin, device=device, dtype=None if dtype in ("auto", "as-trained") else dtype,
              scheduler=scheduler, workers=workers, steps=steps, metrics=names, derivatives=derivatives,
              max_memory=max_memory, sharpness=sharpness, reference=reference, force=force, out=out,
              progress=None if not quiet else False)
    from trajscope.report.export import analyze_to

    def echo(line: str) -> None:
        click.echo(f"trajscope: {line}", err=True)

    ds = analyze_to(run, objective, kw, follow=follow, poll=poll, to=to, target=target,
                    echo=None if quiet else echo, notify=echo, prune=prune, keep=keep)
    if not quiet and derivatives == "auto" and ds.attrs.get("derivatives", "forward") != "forward":
        path = "reverse mode" if ds.attrs["derivatives"] == "reverse" else "forward mode"
        click.echo(f"derivatives: {path} ({ds.attrs.get('derivatives_reason', '')})")
    if not quiet and ds.attrs.get("eval_precision", ds.attrs.get("eval_dtype")) != ds.attrs.get("eval_dtype"):
        click.echo(f"precision: {ds.attrs['eval_precision']}")  # autocast applied, or left out
    if not quiet:
        where = out.rstrip("/") if out is not None else f"{run_dir.rstrip('/')}/{fmt.ANALYSIS_DIR}"
        click.echo(f"wrote {where}/{fmt.METRICS_FILE}")
        click.echo(format_headline(headline(ds)))
    from trajscope.analysis.health import nothing_computed
    from trajscope.errors import AnalysisError

    if nothing_computed(ds):  # the analysis warned why; exit 0 would read as a result
        raise AnalysisError(f"{run_dir}: no pair has a finite loss: nothing was computed")


def _warn_incomplete(run: Run) -> None:
    """The run's incomplete note (:meth:`Run.incomplete_note`) as one warning line on stderr, so
    that stdout keeps only the command's result."""
    note = run.incomplete_note()
    if note is not None:
        click.echo(f"trajscope: warning: {one_line(note)}", err=True)


@cli.command("export")
@click.argument("run_dir", type=_RUN_DIR)
@click.argument("target", required=False)
@click.option("--to", "to", type=click.Choice(["tensorboard", "mlflow", "wandb"]), required=True,
              help="The tracker. TARGET: tensorboard, a log directory (e.g. the trainer's own); mlflow, a "
                   "tracking URI (default MLflow's); wandb, PROJECT or ENTITY/PROJECT[/RUN_ID] (default trajscope).")
@click.option("--analysis", type=_ANALYSIS_DIR, metavar="DIR",
              help="Read DIR/metrics.nc instead of RUN_DIR/analysis/metrics.nc.")
def export_metrics(run_dir: str, target: str | None, to: str, analysis: str | None) -> None:
    """Log an analysis to a tracker: each metric as trajscope/<name> at the pair's training step,
    per-layer ones as trajscope/<name>/<layer>, the report's figures and the settings."""
    from pathlib import Path

    from trajscope.analysis.driver import open_metrics
    from trajscope.report.export import export
    from trajscope.report.trackers import open_sink

    ds = open_metrics(run_dir, analysis=analysis)
    sink = open_sink(to, target, Path(run_dir).resolve().name)
    try:
        n = export(ds, sink, figures=True)
    finally:
        sink.close()
    click.echo(f"logged {n} pair(s) to {to}" + (f" at {target}" if target is not None else ""))


@cli.command()
@click.argument("run_dir", type=_RUN_DIR)
def info(run_dir: str) -> None:
    """Summarise a recorded run: status, objective, optimizer, steps and pairs."""
    from trajscope.store.run import open_run

    click.echo(open_run(run_dir).describe())


@cli.command(name="metrics")
@click.option("--markdown", is_flag=True, help="Print the table of docs/metrics.md instead.")
def list_metrics(markdown: bool) -> None:
    """List every registered metric: name, dims, what the theory needs, formula."""
    from trajscope.metrics.registry import get_metrics, markdown_table

    specs = get_metrics()
    if markdown:
        click.echo(markdown_table(specs.values()), nl=False)
        return
    width = max(len(n) for n in specs) + 2
    for name, spec in specs.items():
        holds = spec.holds_if or "-"
        src = "" if spec.source == "trajscope" else f"  [{spec.source}]"
        opt = "  (opt-in: --" + ", --".join(spec.needs) + ")" if spec.needs else ""
        click.echo(f"{name:<{width}} {spec.dims_label:<20} holds if {holds:<10} "
                   f"{spec.description}{opt}{src}")


@cli.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option("--steps-per-epoch", type=click.IntRange(min=1), metavar="N",
              help="Also aggregate the convexity ratio per epoch (epoch = step // N).")
@click.option("--window", default=10, show_default=True, type=click.IntRange(min=1),
              help="k of the last-k convexity ratio.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--analysis", type=_ANALYSIS_DIR, metavar="DIR",
              help="Read the analysis from DIR (written by `trajscope analyze --out DIR`) instead of "
                   "RUN_DIR/analysis.")
def summary(run_dir: str, steps_per_epoch: int | None, window: int, as_json: bool,
            analysis: str | None) -> None:
    """Summarise an analysis: where the theory holds, convexity ratios, the (L0, L1) fit.

    Reads RUN_DIR/analysis/metrics.nc, or DIR/metrics.nc with --analysis DIR (run `trajscope
    analyze RUN_DIR` first).
    """
    import json

    from trajscope.report.summary import format_summary, summarize
    from trajscope.store.run import open_run

    _libraries_imported()
    s = summarize(run_dir, steps_per_epoch=steps_per_epoch, window=window, analysis=analysis)
    try:
        run = open_run(run_dir)
    except TrajscopeError:  # the summary reads only the analysis: a damaged manifest changes nothing
        pass
    else:
        _warn_incomplete(run)
    click.echo(json.dumps(s, indent=2, allow_nan=True) if as_json else format_summary(s))


@cli.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option("--objective", metavar="MODULE:FUNCTION",
              help="Also check this objective's parameters against the run (imports it).")
@click.option("--quick", is_flag=True, help="Check snapshot headers and sizes only (fast).")
def validate(run_dir: str, objective: str | None, quick: bool) -> None:
    """Check a run directory; list every problem found (exit 1 if there is one).

    Reads files only; nothing is imported unless --objective is given.
    """
    from trajscope.tools.validate import validate_run

    _libraries_imported()
    report = validate_run(run_dir, objective=objective, quick=quick)
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        raise SystemExit(1)


def _is_trajscope_warning(category: type[Warning]) -> bool:
    """Whether ``category`` is one of trajscope's warnings: defined in a trajscope module (the
    recorder's included) or derived from :class:`TrajscopeWarning` (a metric plugin's)."""
    return (category.__module__ == "trajscope" or category.__module__.startswith("trajscope.")
            or issubclass(category, TrajscopeWarning))


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None, *,
                  other: Callable[..., None] | None = None) -> None:
    """Print trajscope's own warning as one ``trajscope: warning:`` line without a source location.

    Any other (a library's ``FutureWarning``, ``DeprecationWarning``, ...) goes to ``other``, the
    ``warnings.showwarning`` in place before the command, or without one is printed as Python
    prints it (``warnings.formatwarning``, with the file and line that warned) on ``file`` or stderr.
    """
    if _is_trajscope_warning(category):
        click.echo(f"trajscope: warning: {one_line(message)}", err=True)
    elif other is not None:
        other(message, category, filename, lineno, file, line)
    else:
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


@contextmanager
def _cli_warnings() -> Iterator[None]:
    """Print trajscope's warnings as one ``trajscope: warning:`` line each, and every other warning
    as it was printed before (:func:`_show_warning`)."""
    saved = warnings.showwarning
    warnings.showwarning = functools.partial(_show_warning, other=saved)
    try:
        yield
    finally:
        warnings.showwarning = saved


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=_RUN_DIR)
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=str),
              help="Report directory (default: RUN_DIR/report of the first run).")
@click.option("--ema-beta", default=0.9, show_default=True,
              type=click.FloatRange(0, 1, max_open=True),
              help="EMA weight on the past for the inst_gap figure.")
@click.option("--window", type=click.IntRange(min=1),
              help="Pairs in the windowed convexity ratio (default: a tenth of the run, at least 2).")
@click.option("--analysis", "analysis", type=_ANALYSIS_DIR, metavar="DIR", multiple=True,
              help="Read each run's analysis from DIR (written by `trajscope analyze --out DIR`) "
                   "instead of RUN_DIR/analysis: once per RUN_DIR, in the same order.")
def report(run_dirs: tuple[str, ...], out: str | None, ema_beta: float, window: int | None,
           analysis: tuple[str, ...]) -> None:
    """Paper-style figures (PNG) and an index.html with the summary table.

    Several analyzed RUN_DIRs overlay in one report. Run `trajscope analyze` on each first.
    """
    from trajscope.report.page import write_report

    _libraries_imported()
    rep = write_report(list(run_dirs), out, beta=ema_beta, window=window,
                       analysis=list(analysis) if analysis else None)
    click.echo(f"wrote {rep.index} ({len(rep.figures)} figures)")
    for name, why in rep.skipped.items():
        click.echo(f"skipped {name}: {why}")


@cli.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option("--to", "to", required=True, type=click.Choice(["hdf5", "safetensors"]),
              help="Target storage format.")
@click.option("--out", type=click.Path(file_okay=False, path_type=str),
              help="Write a converted copy to this (new or empty) directory instead of in place.")
@click.option("--keep", is_flag=True, help="In place: keep the old storage next to the new one.")
@click.option("--force", is_flag=True,
              help="In place: convert a run still marked 'recording' (only if its recorder is gone).")
def convert(run_dir: str, to: str, out: str | None, keep: bool, force: bool) -> None:
    """Rewrite a run's snapshots as HDF5 or safetensors (tensors copied bit for bit)."""
    from trajscope.store.run import open_run
    from trajscope.tools.convert import convert_run

    _libraries_imported()
    before = open_run(run_dir).storage.kind
    dest = convert_run(run_dir, to, out=out, keep=keep, force=force)
    if out is None and before == to:
        click.echo(f"{run_dir}: already stored as {to}")
    else:
        click.echo(f"{dest}: stored as {to}")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM (``kill``, a job scheduler's stop) shut down as Ctrl-C does: finished pairs
    are kept, worker pools are shut down, and the exit is one line with code 130. The previous
    handler is restored afterwards (``main`` may be called in-process, e.g. by tests)."""
    import signal
    import threading

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signal() works only there
        yield
        return
    saved = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``trajscope`` command (exit 0, 1 on an error, 2 on a usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]

    def fail(message: str, code: int = 1) -> NoReturn:
        if debug:
            traceback.print_exc()
        click.echo(f"trajscope: {message}", err=True)
        sys.exit(code)

    try:
        with _sigterm_as_interrupt(), _cli_warnings():
            cli.main(args=args, prog_name="trajscope", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C (and SIGTERM) into Abort
        kept = " (finished pairs are kept; re-run to resume)" if args[:1] == ["analyze"] else ""
        fail(f"interrupted{kept}", 130)
    except click.ClickException as exc:  # usage errors: exit 2, click's own one-line message
        if debug:
            traceback.print_exc()
        exc.show()
        sys.exit(exc.exit_code)
    except TrajscopeError as exc:
        fail(f"error: {one_line(exc)}")
    except MemoryError:
        fail("error: out of memory (try fewer --workers, a smaller --steps range, or --device cpu)")
    except SystemExit as exc:
        if exc.code == 1 and type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
            # click's exit on a closed stdout (`trajscope metrics | head`): the reader has what it wanted
            _quiet_stdout()
            sys.exit(0)
        raise
    except BrokenPipeError:  # the same, outside click's own handling
        _quiet_stdout()
        sys.exit(0)
    except OSError as exc:  # the environment, not the run: disk full, permissions, ...
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"error: {one_line(where)}{one_line(exc.strerror or exc)}")
    except Exception as exc:  # noqa: BLE001 - a bug in trajscope: still one line, exit 1
        fail(
            f"internal error: {type(exc).__name__}: {one_line(exc, 500)} (this is a bug in "
            "trajscope; re-run with --debug and report the traceback)"
        )


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: the reader closed the pipe, and the interpreter's last flush
    at exit must not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


_COLLECTION_PAUSED = False
"""True while the console script has garbage collection paused (:func:`entry`)."""


def entry() -> None:
    """The ``trajscope`` console script: :func:`main`, with garbage collection paused until the
    command has imported its libraries (:func:`_libraries_imported`), and ended without the
    interpreter's final collections.

    Importing torch, pandas and xarray allocates hundreds of thousands of objects that live until
    the process exits, and the collections their allocations trigger walk them all, again and
    again; at exit the interpreter's final collections walk them once more, only to free memory
    the operating system takes back anyway. Together that is most of a second of a small
    analysis (``python -m benchmarks.startup``, docs/performance.md). Frozen objects are skipped
    by every later collection; atexit handlers still run, buffered output is still flushed, and
    objects whose last reference goes away are still freed at once. Only the command line does
    this: :func:`main` called in a process that goes on leaves the collector alone.
    """
    global _COLLECTION_PAUSED
    gc.disable()
    _COLLECTION_PAUSED = True
    try:
        main()
    finally:
        gc.freeze()


def _libraries_imported() -> None:
    """A command has imported the libraries it needs: freeze what they allocated and resume
    garbage collection (when :func:`entry` paused it; a command that ends in moments need not
    call this)."""
    global _COLLECTION_PAUSED
    if _COLLECTION_PAUSED:
        _COLLECTION_PAUSED = False
        gc.freeze()
        gc.enable()


if __name__ == "__main__":
    entry()
