"""Crash safety: a run survives SIGKILL at any moment and a failing disk, up to its last complete step."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import trajscope
from support.recorder_objectives import (
    make_mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    train_sgd,
)
from trajscope.cli import main
from trajscope.errors import RecorderError
from trajscope.recorders import RecorderWarning
from trajscope.recorders import storage as storage_mod
from trajscope.recorders.backends import HDF5Writer
from trajscope.recorders.backends import safetensors as safetensors_backend
from trajscope.store.run import open_run
from trajscope.tools.validate import validate_run

# A model big enough (~0.4M parameters, ~3.5 MB per snapshot) that writes take a while, so a kill
# at a random moment often lands in the middle of one.
CHILD = textwrap.dedent('''
    import sys, torch, torch.nn as nn, torch.nn.functional as F
    import trajscope
    from trajscope.recorders import Recorder

    def make_objective():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))
        def loss(model, batch):
            x, y = batch
            return F.cross_entropy(model(x), y)
        return trajscope.Objective(model=model, loss=loss)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        run_dir, fmt = sys.argv[1], sys.argv[2]
        obj = make_objective()
        model = obj.model
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(1)
        with Recorder(run_dir, model, opt, objective="crashchild:make_objective", format=fmt,
                      max_pending=3) as rec:
            for step in range(100000):
                x = torch.randn(64, 256, generator=g)
                y = torch.randint(0, 10, (64,), generator=g)
                opt.zero_grad()
                loss = obj.loss(model, (x, y))
                loss.backward()
                rec.batch((x, y), loss=loss)
                opt.step()
                print(step, flush=True)
''')


def _start(tmp_path: Path, fmt: str, name: str) -> tuple[subprocess.Popen[str], Path]:
    (tmp_path / "crashchild.py").write_text(CHILD)
    run_dir = tmp_path / name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "crashchild.py"), str(run_dir), fmt],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    return proc, run_dir


def _kill_after(proc: subprocess.Popen[str], after_step: int, delay: float) -> None:
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if int(line) >= after_step:
                break
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "hdf5"])
def test_sigkill_leaves_a_run_that_validates_as_incomplete_and_analyzes(
        tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = random.Random(5)
    # Two trainings started together (their start-up overlaps), killed at different moments:
    # right after the first step, and at a random moment a few steps in.
    moments = [(0, 0.0), (3, rng.uniform(0.0, 0.05))]
    children = [_start(tmp_path, fmt, f"run{i}") for i in range(len(moments))]
    for (proc, _), (after_step, delay) in zip(children, moments):
        _kill_after(proc, after_step, delay)
    for (_, run_dir), (after_step, _) in zip(children, moments):
        run = open_run(run_dir)
        assert run.status == "recording" and run.final_step is None
        assert run.steps == list(range(len(run.steps)))  # no holes: writes are in order
        assert len(run.steps) >= after_step  # what was queued before the kill may be lost
        # Incomplete is reported (a warning: what was written is sound and analyzable), not damage.
        main(["validate", str(run_dir)])
        out = capsys.readouterr().out
        assert ("run is incomplete: status recording (the recorder is gone: crashed or killed)" in out
                and "problem:" not in out)
        if len(run.pairs) == 0:
            continue
        main(["analyze", str(run_dir), "--points", "3", "--margin", "0", "-q"])
        ds = trajscope.open_metrics(run_dir)
        assert list(ds.step.values) == run.pairs
        assert float(ds.loss_replay_error.max()) < 1e-6  # every analyzed snapshot is intact


class _FullDisk:
    """Stands in for the ``os`` module in the writer: ``write`` fails once ``budget`` bytes are
    spent, as on a disk that fills up (a short write, then ENOSPC)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def write(self, fd: int, data: Any) -> int:
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), self.budget)
        n = os.write(fd, data[:n])
        self.budget -= n
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _snapshot_bytes(tmp_path: Path) -> int:
    train_sgd(tmp_path / "probe", steps=1)
    return (tmp_path / "probe" / "steps" / "step_00000000.safetensors").stat().st_size


def test_full_disk_with_on_error_warn_keeps_training_and_earlier_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = _snapshot_bytes(tmp_path)
    # room for 3 snapshots and part of the 4th: step 3's write fails midway
    monkeypatch.setattr(safetensors_backend, "os", _FullDisk(3 * size + size // 2))
    with pytest.warns(RecorderWarning, match=r"/run/steps/step_00000003.safetensors: writing step 3 "
                                             r"failed \(No space left on device\)"):
        recorded = train_sgd(tmp_path / "run", steps=8, recorder_kwargs={"on_error": "warn"})
    monkeypatch.undo()
    plain = train_sgd(None, steps=8)
    for a, b in zip(plain.parameters(), recorded.parameters()):
        assert torch.equal(a, b)  # training ran to the end, unchanged
    run = open_run(tmp_path / "run")
    assert run.steps == [0, 1, 2] and run.status == "crashed"
    assert "step 3" in run.manifest["error"] and "No space left" in run.manifest["error"]
    assert not [p for p in (tmp_path / "run" / "steps").iterdir() if p.name.startswith(".")]
    ds = trajscope.analyze(run, make_mlp, progress=False, points=3, margin=0.0)
    assert list(ds.step.values) == [0, 1] and float(ds.loss_replay_error.max()) < 1e-6
    report = validate_run(run.path)
    assert report.ok and any("incomplete" in w for w in report.warnings)


def test_full_disk_hdf5_with_on_error_warn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = HDF5Writer.write
    calls = [0]

    def failing(self: HDF5Writer, image: storage_mod.StepImage) -> Path:
        calls[0] += 1
        if calls[0] > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, image)

    monkeypatch.setattr(HDF5Writer, "write", failing)
    with pytest.warns(RecorderWarning, match=r"/run/trajectory.h5: writing step 2 failed \(No space"):
        train_sgd(tmp_path / "run", steps=6, recorder_kwargs={"on_error": "warn", "format": "hdf5"})
    run = open_run(tmp_path / "run")
    assert run.steps == [0, 1] and run.status == "crashed"
    assert run.snapshot(1).loss is not None


def test_write_failure_with_on_error_raise_stops_at_the_next_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = _snapshot_bytes(tmp_path)
    monkeypatch.setattr(safetensors_backend, "os", _FullDisk(2 * size + 10))
    file = tmp_path / "run" / "steps" / "step_00000002.safetensors"
    with pytest.raises(RecorderError, match=f"^{re.escape(str(file))}: writing step 2 failed"):
        train_sgd(tmp_path / "run", steps=8, recorder_kwargs={"async_write": False})
    monkeypatch.undo()
    run = open_run(tmp_path / "run")
    assert run.steps == [0, 1] and run.status == "crashed"
    lines = (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] <= 3
