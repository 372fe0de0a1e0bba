"""Nothing ends silently: an objective that exits, a loss that is NaN everywhere, a size that is not
a size, a closed stdout, an I/O error without a file name."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import trajscope
from support.problems import QuadModel, quad_loss
from support.rundirs import cli, quad_run
from trajscope.errors import ObjectiveError


def exiting_loss() -> trajscope.Objective:
    def loss(model: Any, batch: Any) -> torch.Tensor:
        sys.exit(0)

    return trajscope.Objective(model=QuadModel(), loss=loss)


def nan_loss() -> trajscope.Objective:
    return trajscope.Objective(model=QuadModel(), loss=lambda m, b: quad_loss(m, b) * float("nan"))


def nan_at_step_two() -> trajscope.Objective:
    def loss(model: Any, b: torch.Tensor) -> torch.Tensor:
        value = quad_loss(model, b)
        return value * float("nan") if float(b.sum()) == _B2 else value

    return trajscope.Objective(model=QuadModel(), loss=loss)


_B2 = float("nan")  # set by the test: step 2's minibatch sum


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quad_run(tmp_path_factory.mktemp("q") / "run", steps=4)


@pytest.mark.parametrize("objective, message", [
    ("sys:exit", "objective 'sys:exit': calling it raised SystemExit"),
    (f"{__name__}:exiting_loss", "objective loss called sys.exit(0)"),
])
def test_an_objective_that_exits_is_an_error(run: Path, objective: str, message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["analyze", str(run), "--objective", objective, "--force"], capsys)
    assert code == 1 and message in err, (code, err)


def test_a_module_that_exits_on_import_names_the_main_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "train_script.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ObjectiveError, match=r"raised SystemExit: 3; .*__name__ == \"__main__\""):
        trajscope.analyze(quad_run(tmp_path / "r", steps=2), "train_script:make_objective", write=False)


def test_a_loss_nan_everywhere_warns_and_the_cli_exits_1(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trajscope.analyze(run, f"{__name__}:nan_loss", write=False, progress=False)
    assert any("NaN or Inf on every pair: nothing was computed" in str(w.message) for w in caught)
    code, _, err = cli(["analyze", str(run), "--objective", f"{__name__}:nan_loss", "--force"], capsys)
    assert code == 1 and "no pair has a finite loss" in err, err


def test_a_loss_nan_on_some_pairs_warns_naming_them(run: Path) -> None:
    global _B2
    _B2 = float(trajscope.open_run(run).snapshot(2).batch.sum())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = trajscope.analyze(run, f"{__name__}:nan_at_step_two", write=False, progress=False)
    assert any("on 1 of 4 pairs (steps 2)" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert bool(ds.loss_change.isnull()[2]) and not bool(ds.loss_change.isnull()[0])


@pytest.mark.parametrize("size", ["inf", "1e999", "nan", "0.5", "0", "-1GB"])
def test_every_bad_max_memory_is_a_usage_error(run: Path, size: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["analyze", str(run), "--max-memory", size], capsys)
    assert code == 2 and "--max-memory" in err and "Traceback" not in err, err


def test_a_closed_stdout_ends_quietly() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "from trajscope.cli import entry; entry()", "metrics"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == "", err


def test_an_io_error_without_a_file_name_names_the_file_written(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import xarray as xr

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")  # as the netCDF writer raises it: no file name

    monkeypatch.setattr(xr.Dataset, "dump_to_store", full)
    code, _, err = cli(["analyze", str(run), "--force"], capsys)
    assert code == 1 and f"{run}/analysis/metrics.nc: No space left on device" in err, err
    assert not list((run / "analysis").glob(".metrics.nc.tmp-*"))


def test_an_atomic_write_that_fails_names_its_file_and_leaves_no_temporary(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from trajscope import runformat as fmt

    class Full:  # the file object of a full disk: its write names no file
        def __init__(self, fd: int, mode: str) -> None:
            self.fd = fd

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            os.close(self.fd)

        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(fmt.os, "fdopen", Full)
    with pytest.raises(OSError, match="No space left") as err:
        fmt.atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert err.value.filename == str(tmp_path / "x.json") and list(tmp_path.iterdir()) == []
