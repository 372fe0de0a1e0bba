"""The ``trajscope`` command line. Exit 0 on success, 1 on a trajscope error (one line, no
traceback unless ``--debug``), 2 on a usage error."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

import click

from trajscope.errors import TrajscopeError

_RUN_DIR = click.Path(file_okay=True, dir_okay=True, path_type=str)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trajscope")
def cli() -> None:
    """Test the assumptions of optimization theory along a recorded training trajectory.

    Add --debug to any command to see the traceback of an error.
    """


_LOCAL_SCHEDULERS = ("synchronous", "threads", "processes")  # as trajscope.execution (kept light)


def _check_scheduler(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in _LOCAL_SCHEDULERS or "://" in value:
        return value
    raise click.BadParameter(
        f"{value!r}: expected synchronous, threads, processes or a dask.distributed address such "
        "as tcp://host:8786"
    )


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in ("cpu", "cuda", "auto") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise click.BadParameter(f"{value!r}: expected cpu, cuda, cuda:N or auto")


@cli.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option("--objective", metavar="MODULE:FUNCTION",
              help="Objective factory to rebuild the loss (default: the one the run recorded).")
@click.option("--points", default=9, show_default=True, type=click.IntRange(min=2),
              help="Grid points on [0, 1] along each step.")
@click.option("--margin", default=0.5, show_default=True, type=click.FloatRange(min=0),
              help="Grid extension beyond [0, 1] on both sides, in units of the step.")
@click.option("--device", default="auto", show_default=True, callback=_check_device,
              help="cpu, cuda, cuda:N or auto (CUDA when available). With several GPUs, cuda or "
                   "auto gives each worker its own.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Evaluation dtype (independent of the training dtype).")
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
@click.option("--sharpness", is_flag=True,
              help="Also compute λ_max of the minibatch Hessian at x_t (Lanczos; opt-in, costly).")
@click.option("--reference", "reference", type=int, metavar="STEP",
              help="Reference point x* of convexity_ratio_ref (default: the final recorded state).")
@click.option("--force", is_flag=True,
              help="Recompute pairs already analyzed (by default, finished pairs are reused).")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bar or summary (the bar is also off when stderr is not a terminal).")
def analyze(run_dir: str, objective: str | None, points: int, margin: float, device: str,
            dtype: str, scheduler: str, workers: int | None, steps: str | None,
            metric_names: str | None, sharpness: bool, reference: int | None, force: bool,
            quiet: bool) -> None:
    """Re-evaluate the loss along each recorded step and compute every metric.

    Writes RUN_DIR/analysis/metrics.nc; open it with trajscope.open_metrics(RUN_DIR). Each
    finished pair is kept under RUN_DIR/analysis/pairs, so an interrupted analysis resumes where
    it stopped and newly recorded steps only cost their new pairs.
    """
    from trajscope.analysis import analyze as run_analysis
    from trajscope.summary import format_headline, headline

    names = [n.strip() for n in metric_names.split(",") if n.strip()] if metric_names else None
    ds = run_analysis(run_dir, objective, points=points, margin=margin, device=device, dtype=dtype,
                      scheduler=scheduler, workers=workers, steps=steps, metrics=names,
                      sharpness=sharpness, reference=reference, force=force,
                      progress=None if not quiet else False)
    if not quiet:
        click.echo(f"wrote {run_dir.rstrip('/')}/analysis/metrics.nc")
        click.echo(format_headline(headline(ds)))


@cli.command()
@click.argument("run_dir", type=_RUN_DIR)
def info(run_dir: str) -> None:
    """Summarise a recorded run: status, objective, optimizer, steps and pairs."""
    from trajscope.run import open_run

    click.echo(open_run(run_dir).describe())


@cli.command(name="metrics")
@click.option("--markdown", is_flag=True, help="Print the table of docs/metrics.md instead.")
def list_metrics(markdown: bool) -> None:
    """List every registered metric: name, dims, what the theory needs, formula."""
    from trajscope.registry import get_metrics, markdown_table

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
def summary(run_dir: str, steps_per_epoch: int | None, window: int, as_json: bool) -> None:
    """Summarise an analysis: where the theory holds, convexity ratios, the (L0, L1) fit.

    Reads RUN_DIR/analysis/metrics.nc (run `trajscope analyze RUN_DIR` first).
    """
    import json

    from trajscope.summary import format_summary, summarize

    s = summarize(run_dir, steps_per_epoch=steps_per_epoch, window=window)
    click.echo(json.dumps(s, indent=2, allow_nan=True) if as_json else format_summary(s))


@cli.command()
@click.argument("run_dir", type=_RUN_DIR)
def validate(run_dir: str) -> None:
    """Check a run directory; list every problem found (exit 1 if there is one)."""
    from trajscope.validate import validate_run

    problems, notes = validate_run(run_dir)
    for n in notes:
        click.echo(n)
    for p in problems:
        click.echo(f"problem: {p}")
    if problems:
        raise SystemExit(1)
    click.echo("ok")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        cli.main(args=args, prog_name="trajscope", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("trajscope: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except TrajscopeError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"trajscope: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("trajscope: interrupted (finished pairs are kept; re-run to resume)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
