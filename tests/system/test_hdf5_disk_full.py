"""A full disk under the HDF5 writer: one-line errors, and a failed row never visible to readers.

The failure is injected at the writer's own write calls (``put``, HDF5's hyperslab write, raising
``ENOSPC`` while a given step is written), and for real with ``RLIMIT_FSIZE``: HDF5 itself then
fails mid-flush with its multi-line error text, after part of the row reached the file. Last, a
really full disk (a small tmpfs, where a private mount namespace can be made): the HDF5 file keeps
what it allocated for the failed row, so the manifest that says why recording stopped is written in
the room the recorder kept for it.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import trajscope
from support.recorder_objectives import (
    make_mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    train_sgd,
)
from support.rundirs import cli
from trajscope import runformat as fmt
from trajscope.errors import DamagedRunWarning, RecorderError
from trajscope.recorders import RecorderWarning
from trajscope.recorders.backends import HDF5Writer
from trajscope.recorders.backends import hdf5 as hdf5_backend
from trajscope.store.run import open_run
from trajscope.tools.validate import validate_run

FAIL_AT = 3
STEPS = 6
ENOSPC_TEXT = os.strerror(errno.ENOSPC)


def _fail_at(monkeypatch: pytest.MonkeyPatch, step: int, where: str) -> None:
    """Make the HDF5 writer's ``put`` raise ENOSPC while it writes ``step``: at its first write
    (``where="data"``: nothing of the row committed), or at the commit, after ``index/step``
    was extended and written in memory (``where="commit"``: the extent must be rolled back)."""
    current: list[Any] = [None, None]
    real_write, real_put = HDF5Writer.write, hdf5_backend.put

    def write(self: HDF5Writer, image: Any) -> Path:
        current[:] = [image.step, self]
        return real_write(self, image)

    def put(dsid: Any, start: tuple[int, ...], arr: np.ndarray) -> None:
        if current[0] != step:
            return real_put(dsid, start, arr)
        if where == "commit":
            if dsid != current[1]._i_step.id:
                return real_put(dsid, start, arr)
            real_put(dsid, start, arr)
        raise OSError(errno.ENOSPC, ENOSPC_TEXT)

    monkeypatch.setattr(HDF5Writer, "write", write)
    monkeypatch.setattr(hdf5_backend, "put", put)


def _check_run_after_failure(run_dir: Path, message: str, capsys: pytest.CaptureFixture[str],
                             failed: int) -> None:
    """The steps before ``failed`` are intact and are all there is; nothing reads as bad JSON."""
    run = open_run(run_dir)
    assert run.steps == list(range(failed)) and run.status == fmt.STATUS_CRASHED
    assert run.manifest["error"] == message
    with h5py.File(run_dir / fmt.HDF5_FILE, "r", swmr=True) as f:
        assert list(f["index/step"][:]) == list(range(failed))  # the failed row was rolled back
        assert f["index/meta"].shape[0] == failed and f["index/blob"].shape[0] == failed
    report = validate_run(run_dir)
    assert report.ok, report.lines()
    assert report.warnings == [f"{run_dir / fmt.MANIFEST}: run is incomplete: status crashed (recording "
                               f"stopped: {message}), last recorded step {failed - 1}, no final state"]
    code, out, err = cli(["validate", str(run_dir)], capsys)
    assert code == 0 and "JSON" not in out + err and "problem" not in out, out + err
    code, out, err = cli(["info", str(run_dir)], capsys)
    assert code == 0 and "JSON" not in out + err, out + err
    ds = trajscope.analyze(run_dir, make_mlp, progress=False, points=3, margin=0.0)
    assert list(ds.step.values) == list(range(failed - 1))
    assert ds.attrs["skipped_pairs"] == "[]" and float(ds.loss_replay_error.max()) < 1e-6


@pytest.mark.parametrize("where", ["data", "commit"])
def test_disk_full_with_on_error_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], where: str) -> None:
    run_dir = tmp_path / "run"
    _fail_at(monkeypatch, FAIL_AT, where)
    with pytest.raises(RecorderError) as info:
        train_sgd(run_dir, steps=STEPS, recorder_kwargs={"format": "hdf5", "async_write": False})
    monkeypatch.undo()
    message = str(info.value)
    assert message == f"{run_dir / fmt.HDF5_FILE}: writing step {FAIL_AT} failed ({ENOSPC_TEXT})"
    assert "\n" not in message
    cause = info.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    _check_run_after_failure(run_dir, message, capsys, FAIL_AT)


@pytest.mark.parametrize("where", ["data", "commit"])
def test_disk_full_with_on_error_warn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str], where: str) -> None:
    run_dir = tmp_path / "run"
    _fail_at(monkeypatch, FAIL_AT, where)
    plain = train_sgd(None, steps=STEPS)
    with pytest.warns(RecorderWarning) as caught:
        recorded = train_sgd(run_dir, steps=STEPS, recorder_kwargs={"format": "hdf5", "on_error": "warn"})
    monkeypatch.undo()
    message = f"{run_dir / fmt.HDF5_FILE}: writing step {FAIL_AT} failed ({ENOSPC_TEXT})"
    texts = [str(w.message) for w in caught if issubclass(w.category, RecorderWarning)]
    assert texts == [f"trajscope: {message}; recording stopped and training continues. The run is "
                     "marked incomplete; the steps written before stay valid."]
    assert all(a.equal(b) for a, b in zip(plain.parameters(), recorded.parameters(), strict=True))
    _check_run_after_failure(run_dir, message, capsys, FAIL_AT)


@pytest.fixture
def file_size_limit() -> Iterator[Any]:
    """``set(n)`` caps the size of every file this process writes at ``n`` bytes (``RLIMIT_FSIZE``:
    a write past it fails with EFBIG, as a full disk fails with ENOSPC); undone afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the default kill

    def set_limit(n: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))

    try:
        yield set_limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of ``trajectory.h5`` after each row of an undisturbed run."""
    sizes: list[int] = []
    real = HDF5Writer.write

    def write(self: HDF5Writer, image: Any) -> Path:
        out = real(self, image)
        sizes.append(self.path.stat().st_size)
        return out

    with monkeypatch.context() as m:
        m.setattr(HDF5Writer, "write", write)
        train_sgd(tmp_path / "probe", steps=STEPS, recorder_kwargs={"format": "hdf5", "async_write": False})
    return sizes


def test_hdf5_failing_mid_flush_leaves_no_visible_row_and_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        file_size_limit: Any) -> None:
    sizes = _sizes(tmp_path, monkeypatch)
    # the first row that makes the file grow fails: a limit halfway through its growth
    failed = next(i for i in range(1, len(sizes)) if sizes[i] > sizes[i - 1])
    run_dir = tmp_path / "run"
    file_size_limit((sizes[failed - 1] + sizes[failed]) // 2)
    with pytest.raises(RecorderError) as info:
        train_sgd(run_dir, steps=STEPS, recorder_kwargs={"format": "hdf5", "async_write": False})
    file_size_limit(resource.RLIM_INFINITY)
    message = str(info.value)
    assert message == f"{run_dir / fmt.HDF5_FILE}: writing step {failed} failed ({os.strerror(errno.EFBIG)})"
    # HDF5's own text, several lines long, is kept in the exception chain
    hdf5_text = str(info.value.__cause__.__cause__)  # type: ignore[union-attr]
    assert re.search(r"errno = 27", hdf5_text) and str(run_dir / fmt.HDF5_FILE) in hdf5_text
    _check_run_after_failure(run_dir, message, capsys, failed)


def _append_rows(path: Path, step: int, *, with_step: bool) -> None:
    """Give ``path`` one more row as a writer that died mid-row leaves it: the index extended over
    it and nothing else written (its ``meta`` bytes read as zeros); ``with_step``: ``index/step``
    holds ``step``, else its fill value."""
    with h5py.File(path, "r+", libver="latest") as f:
        n = f["index/step"].shape[0]
        m_end = f["meta"].shape[0]
        f["meta"].resize((m_end + 100,))
        for name in ("index/meta", "index/blob"):
            f[name].resize((n + 1, 2))
        f["index/meta"][n] = (m_end, 100)
        f["index/step"].resize((n + 1,))
        if with_step:
            f["index/step"][n] = step


def _crashed_run(run_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="training failed"):
        with trajscope.Recorder(run_dir, *_model_and_optimizer(), format="hdf5") as rec:
            _steps(rec, 4)
            raise RuntimeError("training failed")


def _model_and_optimizer() -> tuple[Any, Any]:
    import torch

    obj = make_mlp()
    return obj.model, torch.optim.SGD(obj.model.parameters(), lr=0.1)


def _steps(rec: trajscope.Recorder, n: int) -> None:
    from support.recorder_objectives import batches, dataset, xent
    from support.recording import train_steps

    x, y = dataset()
    train_steps(rec, rec.model, rec.optimizer, xent, ((x[idx], y[idx]) for idx in batches(n)))


def test_a_half_written_row_is_a_damaged_step_not_bad_json(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    _crashed_run(run_dir)
    _append_rows(run_dir / fmt.HDF5_FILE, 4, with_step=True)
    run = open_run(run_dir)
    assert run.steps == [0, 1, 2, 3, 4]
    where = run_dir / fmt.HDF5_FILE / "step_00000004"
    damaged = (f"{where}: the row of step 4 was not completely written (its metadata is missing: the "
               "write failed or was cut off); the step is damaged")
    assert validate_run(run_dir).problems == [damaged]
    code, out, err = cli(["validate", str(run_dir)], capsys)
    assert code == 1 and f"problem: {damaged}" in out and "JSON" not in out + err
    code, out, err = cli(["info", str(run_dir)], capsys)
    assert code == 0 and "JSON" not in out + err
    with pytest.warns(DamagedRunWarning):
        ds = trajscope.analyze(run_dir, make_mlp, progress=False, points=3, margin=0.0)
    assert list(ds.step.values) == [0, 1, 2]
    assert damaged in ds.attrs["skipped_pairs"] and "JSON" not in ds.attrs["skipped_pairs"]


def test_a_row_whose_step_was_never_written_is_not_a_row(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    _crashed_run(run_dir)
    _append_rows(run_dir / fmt.HDF5_FILE, 4, with_step=False)
    with h5py.File(run_dir / fmt.HDF5_FILE, "r", swmr=True) as f:
        assert list(f["index/step"][:]) == [0, 1, 2, 3, -1]  # the fill value
    assert open_run(run_dir).steps == [0, 1, 2, 3]
    report = validate_run(run_dir)
    assert report.ok and report.warnings[-1] == (
        f"{run_dir / fmt.HDF5_FILE}: 1 row(s) without a step number (a write that failed or was cut "
        "off before its commit); ignored")
    ds = trajscope.analyze(run_dir, make_mlp, progress=False, points=3, margin=0.0)
    assert list(ds.step.values) == [0, 1, 2] and ds.attrs["skipped_pairs"] == "[]"


def test_hdf5_failing_to_create_the_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "missing" / fmt.HDF5_FILE
    with pytest.raises(OSError) as info:
        HDF5Writer(path, [], {})
    assert info.value.errno == errno.ENOENT and info.value.filename == str(path)
    assert str(info.value) == f"[Errno {errno.ENOENT}] {os.strerror(errno.ENOENT)}: '{path}'"
    assert "errno = 2" in str(info.value.__cause__)  # HDF5's own text, kept in the chain


# A disk that is really full: a 1 MiB tmpfs in a private mount namespace (a user namespace makes
# root's mount available to any user where the kernel allows it). The recording runs in a child
# interpreter that reports what it finds before the filesystem vanishes with its namespace.
FULL_DISK_CHILD = '''
import json, os, sys, torch
from torch import nn
from trajscope.recorders import Recorder

run_dir, storage = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64))  # 266 kB of x_t and g_t a snapshot
opt = torch.optim.SGD(model.parameters(), lr=0.1)
raised = None
try:
    with Recorder(run_dir, model, opt, format=storage) as rec:
        for _ in range(20):
            x = torch.randn(8, 64)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            rec.batch(x, loss=loss)
            opt.step()
except Exception as exc:
    raised = f"{type(exc).__name__}: {exc}"
with open(os.path.join(run_dir, "trajscope.json")) as fh:
    manifest = json.load(fh)
print(json.dumps({"raised": raised, "status": manifest["status"], "error": manifest["error"],
                  "hidden": sorted(n for n in os.listdir(run_dir) if n.startswith(".")),
                  "lock_bytes": os.path.getsize(os.path.join(run_dir, ".recording.lock"))}))
'''


def _on_a_full_disk(tmp_path: Path, storage: str) -> dict[str, Any]:
    """Record ``storage`` onto a 1 MiB tmpfs until it is full; what the child saw (skips where no
    private mount namespace can be made)."""
    import json
    import shutil
    import subprocess
    import sys

    mount = tmp_path / "disk"
    mount.mkdir()
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) to mount a small filesystem")
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" -c "$3" "$1/run" "$4"'
    done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                           str(mount), sys.executable, FULL_DISK_CHILD, storage],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and not done.stdout:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("storage", ["hdf5", "safetensors"])
def test_a_really_full_disk_ends_the_run_crashed_with_its_cause(tmp_path: Path, storage: str) -> None:
    seen = _on_a_full_disk(tmp_path, storage)
    assert seen["raised"] is not None and seen["raised"].startswith("RecorderError: ")
    message = seen["raised"].removeprefix("RecorderError: ")
    assert re.fullmatch(r"/\S+/run/(trajectory\.h5|steps/step_\d{8}\.safetensors): writing step \d+ failed "
                        rf"\({ENOSPC_TEXT}\)", message), message
    assert seen["status"] == fmt.STATUS_CRASHED and seen["error"] == message
    assert seen["hidden"] == [fmt.RECORDING_LOCK]  # no temporary file is left behind
    assert seen["lock_bytes"] == 0  # the reserve went with the lock
