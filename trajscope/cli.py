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


@cli.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option("--objective", metavar="MODULE:FUNCTION",
              help="Objective factory to rebuild the loss (default: the one the run recorded).")
@click.option("--points", default=9, show_default=True, type=click.IntRange(min=2),
              help="Grid points on [0, 1] along each step.")
@click.option("--margin", default=0.5, show_default=True, type=click.FloatRange(min=0),
              help="Grid extension beyond [0, 1] on both sides, in units of the step.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Evaluation dtype (independent of the training dtype).")
@click.option("--scheduler", default="synchronous", show_default=True,
              type=click.Choice(["synchronous", "threads", "processes"]), help="Dask scheduler.")
@click.option("--workers", type=click.IntRange(min=1), help="Workers for threads/processes.")
@click.option("--steps", metavar="START:STOP[:STRIDE]", help="Analyze only these pair start steps.")
@click.option("--metrics", "metric_names", metavar="NAMES",
              help="Comma-separated metric names (default: all).")
@click.option("--force", is_flag=True, help="Recompute pairs already analyzed.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def analyze(run_dir: str, objective: str | None, points: int, margin: float, device: str,
            dtype: str, scheduler: str, workers: int | None, steps: str | None,
            metric_names: str | None, force: bool, quiet: bool) -> None:
    """Re-evaluate the loss along each recorded step and compute every metric.

    Writes RUN_DIR/analysis/metrics.nc; open it with trajscope.open_metrics(RUN_DIR).
    """
    from trajscope.analysis import analyze as run_analysis
    from trajscope.summary import format_headline, headline

    names = [n.strip() for n in metric_names.split(",") if n.strip()] if metric_names else None
    ds = run_analysis(run_dir, objective, points=points, margin=margin, device=device, dtype=dtype,
                      scheduler=scheduler, workers=workers, steps=steps, metrics=names,
                      force=force, progress=None if not quiet else False)
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
def list_metrics() -> None:
    """List every registered metric: name, dims, what the theory needs, formula."""
    from trajscope.registry import get_metrics

    specs = get_metrics()
    width = max(len(n) for n in specs) + 2
    for name, spec in specs.items():
        dims = ",".join(("step",) + spec.dims) + (" (+layer)" if spec.per_layer else "")
        holds = spec.holds_if or "-"
        src = "" if spec.source == "trajscope" else f"  [{spec.source}]"
        click.echo(f"{name:<{width}} {dims:<20} holds if {holds:<10} {spec.description}{src}")


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


@cli.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option("--to", "to", required=True, type=click.Choice(["hdf5", "safetensors"]),
              help="Target storage format.")
@click.option("--out", type=click.Path(file_okay=False, path_type=str),
              help="Write a converted copy to this (new or empty) directory instead of in place.")
@click.option("--keep", is_flag=True, help="In place: keep the old storage next to the new one.")
def convert(run_dir: str, to: str, out: str | None, keep: bool) -> None:
    """Rewrite a run's snapshots as HDF5 or safetensors (tensors copied bit for bit)."""
    from trajscope.convert import convert_run
    from trajscope.run import open_run

    before = open_run(run_dir).storage.kind
    dest = convert_run(run_dir, to, out=out, keep=keep)
    if out is None and before == to:
        click.echo(f"{run_dir}: already stored as {to}")
    else:
        click.echo(f"{dest}: stored as {to}")


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
