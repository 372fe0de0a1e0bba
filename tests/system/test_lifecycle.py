"""Misuse and process lifecycle: killed analyses leave no processes behind, SIGTERM shuts down as
Ctrl-C does, and arguments or files that would hang, allocate without bound or raise deep inside
trajscope fail with one line naming the culprit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trajscope
from support.problems import classifier_run
from support.rundirs import cli, copy_run, no_hang, quad_run
from trajscope.analysis.plan import select_steps
from trajscope.errors import AnalysisError, RunFormatError
from trajscope.store.run import open_run

try:
    import psutil
except ImportError:  # only the process-lifecycle tests need it
    psutil = None
TESTS = Path(__file__).parents[1]  # on a child interpreter's PYTHONPATH: the helpers in support/


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = quad_run(tmp_path_factory.mktemp("base") / "run", steps=3)
    trajscope.analyze(run, dtype="float64", progress=False)
    return run


@pytest.fixture
def run_dir(base: Path, tmp_path: Path) -> Path:
    return copy_run(base, tmp_path / "run")


# --- step ranges ------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", ["-1:", ":-1", "-3:-1", slice(-1, None)])
def test_negative_step_ranges_are_errors(steps: str | slice) -> None:
    with pytest.raises(AnalysisError, match=r"optimizer step numbers \(>= 0\), not indices"):
        select_steps([0, 1, 2, 3], steps)


@pytest.mark.parametrize("steps", ["5:2", "3:3", slice(4, 1)])
def test_empty_step_ranges_are_errors(steps: str | slice) -> None:
    with pytest.raises(AnalysisError, match=r"empty range \(START must be less than STOP\)"):
        select_steps([0, 1, 2, 3, 4, 5], steps)


def test_step_range_errors_on_the_command_line(run_dir: Path, capsys) -> None:
    for steps, says in (("-1:", "not indices"), ("5:2", "empty range")):
        code, _, err = cli(["analyze", str(run_dir), "-q", f"--steps={steps}"], capsys)
        assert code == 1 and f"steps='{steps}'" in err and says in err, err


# --- arguments without bound ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--margin", "inf"], ["--margin", "1e308"], ["--points", "100000000"]])
def test_unbounded_arguments_are_usage_errors(run_dir: Path, args: list[str], capsys) -> None:
    code, _, err = cli(["analyze", str(run_dir), "-q", *args], capsys)
    assert code == 2 and args[0] in err and "Traceback" not in err, err


# --- files that would block or overflow -------------------------------------------------------------


def test_fifo_metrics_is_refused_not_waited_on(run_dir: Path, capsys) -> None:
    metrics = run_dir / "analysis" / "metrics.nc"
    metrics.unlink()
    os.mkfifo(metrics)
    with no_hang(20):
        with pytest.raises(RunFormatError, match=r"metrics.nc: expected a regular file .* found a FIFO"):
            trajscope.open_metrics(run_dir)
        for cmd in (["summary", str(run_dir)], ["report", str(run_dir)]):
            code, _, err = cli(cmd, capsys)
            assert code == 1 and f"{metrics}: expected a regular file" in err, err


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_damaged_metrics_is_one_line_naming_the_file(run_dir: Path, capsys, damage: str) -> None:
    metrics = run_dir / "analysis" / "metrics.nc"
    metrics.write_bytes(b"not a netCDF file" if damage == "junk" else metrics.read_bytes()[:2000])
    reason = "NetCDF: Unknown file format" if damage == "junk" else "NetCDF: HDF error"
    with pytest.raises(RunFormatError) as e:
        trajscope.open_metrics(run_dir)
    assert str(e.value) == f"{metrics}: cannot read the metrics Dataset ({reason})"
    code, _, err = cli(["summary", str(run_dir)], capsys)
    assert code == 1 and err.strip() == f"trajscope: error: {e.value}", err


def test_manifest_integer_beyond_conversion_limit(run_dir: Path, capsys) -> None:
    manifest = run_dir / "trajscope.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"num_steps":', '"num_steps": ' + "9" * 5000 + ', "x":', 1))
    for cmd in (["info"], ["validate"], ["analyze", "-q"]):
        code, out, err = cli([*cmd, str(run_dir)], capsys)
        assert code == 1 and f"{manifest}: invalid manifest" in out + err, (cmd, out, err)
        assert "internal error" not in err and "Traceback" not in err


def test_info_tolerates_a_bad_scalars_line(run_dir: Path, capsys) -> None:
    scalars = run_dir / "scalars.jsonl"
    lines = scalars.read_text().splitlines()
    scalars.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    code, out, err = cli(["info", str(run_dir)], capsys)
    assert code == 0, err
    assert f"1 unreadable line(s) ignored; first: {scalars}:2: invalid JSON" in out


def test_scalars_with_infinity_still_read(run_dir: Path) -> None:
    scalars = run_dir / "scalars.jsonl"
    scalars.write_text(scalars.read_text() + '{"step": 99, "loss": Infinity, "recorded": false}\n')
    assert open_run(run_dir).scalars[-1]["loss"] == float("inf")


# --- killed or stopped analyses ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classifier_run(tmp_path_factory.mktemp("long") / "run", steps=40)


def _start_analysis(run: Path, log: Path) -> subprocess.Popen:
    """``trajscope analyze`` with two worker processes; output to ``log`` (a pipe would be held
    open by any worker that outlives the driver)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    with log.open("wb") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "trajscope.cli", "analyze", str(run), "--objective",
             "support.slow_objective:make_slow_mlp", "--device", "cpu", "--scheduler", "processes", "--workers", "2",
             "--quiet"],
            cwd=TESTS, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def _mid_analysis(proc: subprocess.Popen, run: Path) -> list:
    """Wait until a pair is persisted (the workers are computing); the driver's descendants."""
    deadline = time.monotonic() + 120
    pairs = run / "analysis" / "pairs"
    while not (pairs.is_dir() and any(pairs.glob("pair_*"))):
        if proc.poll() is not None:
            pytest.fail("analysis ended before it could be stopped")
        if time.monotonic() > deadline:
            pytest.fail("no pair persisted within 120 s")
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2
    return children


def _alive(procs: list) -> list:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _reap_leftovers(procs: list) -> None:
    for p in _alive(procs):  # only the test's own descendants, by pid
        p.kill()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_analysis_leaves_no_process_behind(long_run: Path, tmp_path: Path, sig: int) -> None:
    if psutil is None:
        pytest.skip("needs psutil to follow the driver's descendants")
    run = copy_run(long_run, tmp_path / "run")
    log = tmp_path / "log"
    proc = _start_analysis(run, log)
    children: list = []
    try:
        children = _mid_analysis(proc, run)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        output = log.read_text()
        deadline = time.monotonic() + 5
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(children), f"left running after {sig!r}: {_alive(children)}"
        if sig == signal.SIGTERM:  # like Ctrl-C: one line, exit 130, finished pairs kept
            assert proc.returncode == 130, output
            assert "trajscope: interrupted (finished pairs are kept; re-run to resume)" in output
            assert "Traceback" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _reap_leftovers(children)


def test_scalars_with_nonfinite_strings_read_as_numbers(run_dir: Path) -> None:
    scalars = run_dir / "scalars.jsonl"
    scalars.write_text(scalars.read_text() + '{"step": 99, "loss": "NaN", "lr": ["Infinity", "-Infinity"]}\n')
    last = open_run(run_dir).scalars[-1]
    assert last["loss"] != last["loss"] and last["lr"] == [float("inf"), float("-inf")]


def test_recorder_writes_strict_json_for_a_nonfinite_loss(tmp_path: Path) -> None:
    import json

    import torch

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with trajscope.Recorder(tmp_path / "run", model, opt) as rec:
        for loss in (float("inf"), float("nan"), 1.5):
            rec.batch(torch.zeros(1, 2), loss=torch.tensor(loss))
            opt.step()

    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    lines = (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()
    parsed = [json.loads(line, parse_constant=refuse) for line in lines]  # strict: no bare NaN/Infinity
    assert [p["loss"] for p in parsed] == ["Infinity", "NaN", 1.5]
    read = [s["loss"] for s in open_run(tmp_path / "run").scalars]
    assert read[0] == float("inf") and read[1] != read[1] and read[2] == 1.5
