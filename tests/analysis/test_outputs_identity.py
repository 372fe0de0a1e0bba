"""Where output may go and whose analysis is read (trajscope.analysis.outputs, trajscope.confine).

Every directory the user names for output (``analyze --out``, ``report -o``) is resolved once and
refused, with one line naming it, when an existing component is a symlink, when it lies in a run's
storage (``steps/``, ``trajectory.h5``, the manifest), or when it lies inside a run directory other
than the runs of the command (for ``analyze``: another run's ``analysis/``, which ``--force`` may
replace, saying what it replaces). An ``--out`` directory holding another run's ``metrics.nc``, or a
``metrics.nc`` trajscope did not write, is refused the same way.

Every reader (``open_metrics``, ``summary``, ``report``) checks that the Dataset it reads was written
by trajscope and computed from the run it is asked about: the same manifest bytes (wherever the run
lies now: moved or copied), or the same directory and the same manifest identity (a run analyzed
while recording, then closed; a run converted in place). A run recorded again at the same path is
another run.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

import trajscope
from support.problems import DIM, QuadModel, make_quadratic, quad_loss
from support.recording import train_steps
from support.rundirs import cli, copy_run, fingerprint, quad_run
from trajscope.analysis import outputs
from trajscope.errors import AnalysisError, RunFormatError, TrajscopeWarning
from trajscope.tools.convert import convert_run

ANALYZE = ["-q", "--dtype", "float64", "--points", "3", "--margin", "0.0"]
KW: dict[str, Any] = {"dtype": "float64", "points": 3, "margin": 0.0, "progress": False}


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two analyzed quadratic runs of different learning rates (so different manifests)."""
    root = tmp_path_factory.mktemp("analyzed")
    runs = {"a": quad_run(root / "a", steps=3), "b": quad_run(root / "b", steps=3, lr=0.05)}
    for run in runs.values():
        trajscope.analyze(run, **KW)
    return runs


@pytest.fixture
def runs(analyzed: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the two analyzed runs (their ``analysis/`` included) under ``tmp_path/runs``."""
    return (copy_run(analyzed["a"], tmp_path / "runs" / "a"),
            copy_run(analyzed["b"], tmp_path / "runs" / "b"))


def _one_line_error(err: str, *names: object) -> str:
    """The message of a one-line ``trajscope: error:``, checked to name every one of ``names``."""
    assert err.startswith("trajscope: error: ") and err.count("\n") == 1, err
    for name in names:
        assert str(name) in err, (name, err)
    return err


def _foreign_netcdf(path: Path) -> None:
    """A netCDF file that looks like metrics (a ``step`` dim, metric names) but lacks trajscope's attrs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    xr.Dataset({"inst_gap": ("step", np.zeros(3)), "loss_change": ("step", np.ones(3))},
               coords={"step": np.arange(3)}, attrs={"title": "someone else's"}).to_netcdf(path)


# --- where output may go --------------------------------------------------------------------------


def test_report_out_through_a_planted_symlink_is_refused(runs: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = runs
    outside = tmp_path / "outside"
    outside.mkdir()
    (a / "rep2").symlink_to(outside)
    code, _, err = cli(["report", str(a), "-o", str(a / "rep2")], capsys)
    assert code == 1
    assert "is a symlink" in _one_line_error(err, a / "rep2")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("below", ["", "sub", "sub/deeper"])
def test_analyze_out_through_a_symlink_is_refused(runs: tuple[Path, Path], tmp_path: Path, below: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A link as the directory itself or as any parent of it."""
    a, _ = runs
    outside = tmp_path / "outside"
    outside.mkdir()
    link = tmp_path / "link"
    link.symlink_to(outside)
    before = fingerprint(a)
    code, _, err = cli(["analyze", str(a), "--out", str(link / below if below else link), *ANALYZE], capsys)
    assert code == 1
    assert "is a symlink" in _one_line_error(err, link)
    assert list(outside.iterdir()) == [] and fingerprint(a) == before


@pytest.mark.parametrize("command", ["analyze", "report"])
@pytest.mark.parametrize("rel", ["steps", "steps/sub", "trajectory.h5"])
def test_output_inside_a_runs_storage_is_refused(runs: tuple[Path, Path], command: str, rel: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    a, b = runs
    before = {run: fingerprint(run) for run in runs}
    for target in (a, b):  # the run of the command and another one
        args = ["analyze", str(a), "--out", str(target / rel), *ANALYZE] if command == "analyze" else \
            ["report", str(a), "-o", str(target / rel)]
        code, _, err = cli(args, capsys)
        assert code == 1
        assert "storage" in _one_line_error(err, target / rel, target)
    assert {run: fingerprint(run) for run in runs} == before


def test_report_into_another_run_is_refused_and_into_its_own_allowed(runs: tuple[Path, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    a, b = runs
    before = fingerprint(b)
    for rel in ("report", "analysis", "elsewhere"):
        code, _, err = cli(["report", str(a), "-o", str(b / rel)], capsys)
        assert code == 1
        _one_line_error(err, b / rel, b)
    assert fingerprint(b) == before
    code, _, err = cli(["report", str(a), "-o", str(a / "rep2")], capsys)  # a real directory of its own run
    assert code == 0 and (a / "rep2" / "index.html").is_file(), err
    code, _, err = cli(["report", str(a), "-o", str(a)], capsys)
    assert code == 1 and "is a run directory" in _one_line_error(err, a)


# --- an analysis knows its run -------------------------------------------------------------------


def test_analyze_into_another_runs_analysis_dir_is_refused(runs: tuple[Path, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    a, b = runs
    before = fingerprint(b)
    code, _, err = cli(["analyze", str(a), "--out", str(b / "analysis"), *ANALYZE], capsys)
    assert code == 1
    assert "--force" in _one_line_error(err, b / "analysis", a)
    assert fingerprint(b) == before
    code, _, err = cli(["analyze", str(a), "--out", str(b / "analysis" / "sub"), *ANALYZE], capsys)
    assert code == 1
    _one_line_error(err, b / "analysis" / "sub", b)
    assert fingerprint(b) == before


def test_analyze_into_a_dir_holding_another_runs_metrics_is_refused(runs: tuple[Path, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    a, b = runs
    shared = tmp_path / "shared"
    assert cli(["analyze", str(b), "--out", str(shared), *ANALYZE], capsys)[0] == 0
    before = fingerprint(shared)
    code, _, err = cli(["analyze", str(a), "--out", str(shared), *ANALYZE], capsys)
    assert code == 1
    assert "--force" in _one_line_error(err, shared, b.resolve(), a)
    assert fingerprint(shared) == before
    code, _, err = cli(["analyze", str(b), "--out", str(shared), *ANALYZE], capsys)  # its own: resumed
    assert code == 0, err


def test_analyze_into_a_dir_holding_a_foreign_metrics_file_is_refused(runs: tuple[Path, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = runs
    mine = tmp_path / "mine" / "metrics.nc"
    _foreign_netcdf(mine)
    before = mine.read_bytes()
    code, _, err = cli(["analyze", str(a), "--out", str(mine.parent), *ANALYZE], capsys)
    assert code == 1
    assert "did not write" in _one_line_error(err, mine)
    assert mine.read_bytes() == before


def test_force_replaces_another_runs_analysis_and_says_so(runs: tuple[Path, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    a, b = runs
    with pytest.warns(TrajscopeWarning, match="replacing") as caught:
        assert outputs.analysis_dir(a, b / "analysis", force=True) == b / "analysis"
    assert str(b) in str(caught[0].message) and str(a) in str(caught[0].message)
    code, _, err = cli(["analyze", str(a), "--out", str(b / "analysis"), "--force", *ANALYZE], capsys)
    assert code == 0
    assert err.startswith("trajscope: warning: ") and "replacing" in err and str(b) in err, err
    assert trajscope.open_metrics(a, analysis=b / "analysis").attrs["run"] == str(a.resolve())
    with pytest.raises(RunFormatError):  # b's own analysis is gone: its directory holds a's now
        trajscope.open_metrics(b)


# --- every reader checks whose analysis it reads -------------------------------------------------


def test_readers_refuse_another_runs_analysis(runs: tuple[Path, Path], analyzed: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    a, b = runs
    metrics = b / "analysis" / "metrics.nc"
    code, _, err = cli(["summary", str(a), "--analysis", str(b / "analysis")], capsys)
    assert code == 1
    _one_line_error(err, metrics, a, analyzed["b"])
    code, _, err = cli(["report", str(a), "--analysis", str(b / "analysis"), "-o", str(tmp_path / "rep")], capsys)
    assert code == 1
    _one_line_error(err, metrics, a, analyzed["b"])
    assert not (tmp_path / "rep").exists()
    with pytest.raises(RunFormatError) as e:
        trajscope.open_metrics(a, analysis=b / "analysis")
    assert str(a) in str(e.value) and str(analyzed["b"]) in str(e.value)
    with pytest.raises(RunFormatError):
        trajscope.summarize(a, analysis=b / "analysis")
    shutil.copy(metrics, a / "analysis" / "metrics.nc")  # planted where the run's own analysis lies
    code, _, err = cli(["summary", str(a)], capsys)
    assert code == 1
    _one_line_error(err, a / "analysis" / "metrics.nc", analyzed["b"])


def test_readers_refuse_a_foreign_netcdf(runs: tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = runs
    metrics = a / "analysis" / "metrics.nc"
    _foreign_netcdf(metrics)
    for args in (["summary", str(a)], ["summary", str(a), "--json"], ["report", str(a), "-o", str(tmp_path / "r")]):
        code, out, err = cli(args, capsys)
        assert code == 1 and out == ""
        assert "not written by trajscope" in _one_line_error(err, metrics)
    with pytest.raises(RunFormatError, match="not written by trajscope"):
        trajscope.open_metrics(a)


def test_a_moved_or_copied_run_keeps_its_analysis(runs: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    a, _ = runs  # a copy: its Dataset names the run it was analyzed as
    moved = tmp_path / "moved"
    a.rename(moved)
    assert trajscope.open_metrics(moved).attrs["run"] != str(moved.resolve())
    code, out, err = cli(["summary", str(moved), "--json"], capsys)
    assert code == 0 and err == "" and '"pairs": 3' in out, err
    external = tmp_path / "external"
    assert cli(["analyze", str(moved), "--out", str(external), *ANALYZE], capsys)[0] == 0
    again = copy_run(moved, tmp_path / "again")
    code, _, err = cli(["summary", str(again), "--analysis", str(external)], capsys)
    assert code == 0, err


def test_a_run_analyzed_while_recording_keeps_its_analysis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Closing the recorder rewrites the manifest (status, steps, times); the analysis still reads."""
    run = tmp_path / "live"
    gen = torch.Generator().manual_seed(3)
    model = QuadModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.randn(DIM, generator=gen, dtype=torch.float64) for _ in range(5)]
    with trajscope.Recorder(run, model, opt, objective="support.problems:make_quadratic", async_write=False) as rec:
        train_steps(rec, model, opt, quad_loss, batches[:3])
        ds = trajscope.analyze(run, make_quadratic, out=tmp_path / "out", **KW)
        assert ds.attrs["run_status"] == "recording"
        train_steps(rec, model, opt, quad_loss, batches[3:])
    assert trajscope.open_run(run).status == "complete"
    code, out, err = cli(["summary", str(run), "--analysis", str(tmp_path / "out"), "--json"], capsys)
    assert code == 0 and '"pairs": 2' in out, err
    trajscope.analyze(run, **KW)
    convert_run(run, "hdf5")  # in place: the manifest names the new storage
    code, out, err = cli(["summary", str(run), "--json"], capsys)
    assert code == 0 and '"pairs": 5' in out, err  # the last step pairs with the final state


def test_a_run_recorded_again_at_the_same_path_is_another_run(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = quad_run(tmp_path / "run", steps=3)
    out = tmp_path / "out"
    trajscope.analyze(run, out=out, **KW)
    created = trajscope.open_run(run).manifest["created"]
    while time.strftime("%Y-%m-%dT%H:%M:%S%z") == created:  # the manifest's times are in seconds
        time.sleep(0.05)
    quad_run(run, steps=3, overwrite=True)  # the same model, schedule and objective, recorded again
    code, _, err = cli(["summary", str(run), "--analysis", str(out)], capsys)
    assert code == 1
    _one_line_error(err, out / "metrics.nc", run)


def test_identity_helpers_are_one_line_errors(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """The API raises the errors the CLI prints: AnalysisError for an output path, RunFormatError
    for what a reader finds."""
    a, b = runs
    with pytest.raises(AnalysisError):
        outputs.analysis_dir(a, b / "analysis")
    with pytest.raises(AnalysisError):
        outputs.analysis_dir(a, a / "steps")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert outputs.analysis_dir(a, a / "analysis") == a / "analysis"  # its own
        assert outputs.analysis_dir(a, tmp_path / "fresh") == tmp_path / "fresh"
