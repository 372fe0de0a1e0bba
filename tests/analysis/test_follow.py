"""Following a run while it trains (trajscope.analysis.follow, ``trajscope analyze --follow``), and
logging the metrics to a tracker (trajscope.report.export, ``--to tensorboard``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import trajscope
from support import live
from support.problems import classifier_run, make_mlp
from trajscope import runformat as fmt
from trajscope.errors import AnalysisError

STEPS = 30

def _trajscope(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", "from trajscope.cli import main; main()", *args],
                            env=live.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _assert_logged(ds, logdir: Path) -> None:
    """Every per-pair scalar of ``ds`` is in TensorBoard's own reader at the pairs' steps (float32)."""
    got = _scalars(logdir)
    steps = [int(t) for t in ds["step"].values]
    for name in ("inst_gap", "loss_change", "update_norm", "convexity_ratio_ref"):
        logged = got[f"trajscope/{name}"]
        assert sorted(logged) == steps, name
        np.testing.assert_allclose([logged[t] for t in steps], ds[name].values.astype(np.float32),
                                   rtol=1e-6, equal_nan=True, err_msg=name)
    layer = str(ds["layer"].values[0])
    per_layer = [n for n, v in ds.data_vars.items() if v.dims == ("step", "layer")][0]
    np.testing.assert_allclose([got[f"trajscope/{per_layer}/{layer}"][t] for t in steps],
                               ds[per_layer].values[:, 0].astype(np.float32), rtol=1e-6, equal_nan=True)


def test_follow_analyzes_pairs_while_training_runs_and_ends_with_the_run(tmp_path: Path) -> None:
    """Training records 30 steps in one process while ``trajscope analyze RUN --follow --to
    tensorboard DIR`` runs in another: pairs reach metrics.nc while training still runs, the first
    within seconds of its second snapshot; the follower exits 0 by itself once the run is closed;
    its Dataset equals a fresh analysis of the finished run, and TensorBoard reads the same values."""
    run, logdir = tmp_path / "run", tmp_path / "tb"
    train = live.train(run, STEPS, 0.3)
    while not (run / fmt.MANIFEST).exists():  # the follower needs a run to follow
        assert train.poll() is None, train.communicate()
        time.sleep(0.05)
    follower = _trajscope("analyze", str(run), "--follow", "--poll", "0.5", "--to", "tensorboard", str(logdir))
    metrics, first_seen, during_training = run / fmt.ANALYSIS_DIR / fmt.METRICS_FILE, None, False
    deadline = time.monotonic() + 240
    while follower.poll() is None and time.monotonic() < deadline:
        if first_seen is None and metrics.exists():
            first_seen = time.time()
            during_training = train.poll() is None
        time.sleep(0.1)
    out, err = follower.communicate(timeout=60)
    assert train.wait(timeout=60) == 0, train.communicate()
    assert follower.returncode == 0, err
    assert first_seen is not None and during_training, "no pair was analyzed while training ran"
    second = (run / fmt.STEPS_DIR / fmt.step_filename(1)).stat().st_mtime
    assert first_seen - second < 10, f"first pair {first_seen - second:.1f} s after its second snapshot"
    assert "pairs 0" in err and "wrote" in out

    followed = trajscope.open_metrics(run)
    assert [int(t) for t in followed["step"].values] == list(range(STEPS))
    fresh = trajscope.analyze(run, derivatives=followed.attrs["derivatives"], write=False, progress=False)
    for name in fresh.data_vars:
        np.testing.assert_array_equal(followed[name].values, fresh[name].values, err_msg=name)
    _assert_logged(followed, logdir)


def test_follow_stops_when_the_recorder_is_gone(tmp_path: Path) -> None:
    """A run still marked recording whose recorder no longer holds its lock (killed): the follower
    analyzes what is there, says in one line that the recorder is gone, and returns."""
    import json

    run = classifier_run(tmp_path / "run", steps=4)
    manifest = json.loads((run / fmt.MANIFEST).read_text())
    (run / fmt.MANIFEST).write_text(json.dumps({**manifest, "status": fmt.STATUS_RECORDING}))
    said: list[str] = []
    from trajscope.analysis.follow import follow

    ds = follow(trajscope.analyze, run, make_mlp, poll=0.1, notify=said.append, progress=False)
    assert [int(t) for t in ds["step"].values] == [0, 1, 2, 3]
    assert len(said) == 1 and "the recorder is gone" in said[0] and "4 pair(s)" in said[0]


def test_a_recorder_that_closes_between_the_followers_reads_is_not_taken_for_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder writes its closing manifest, then lets its lock go. A follower that read the
    manifest ("recording") just before, and the lock (free) just after, must not conclude the
    recorder is gone and end without the final state's reference values."""
    import fcntl
    import json

    from trajscope.analysis import follow as following

    run = classifier_run(tmp_path / "run", steps=4)
    closed = (run / fmt.MANIFEST).read_text()
    recording = {k: v for k, v in json.loads(closed).items() if k != "final_step"}
    (run / fmt.MANIFEST).write_text(json.dumps({**recording, "status": fmt.STATUS_RECORDING}))
    lock = open(run / fmt.RECORDING_LOCK, "rb")  # the recorder's lock, held
    fcntl.flock(lock, fcntl.LOCK_EX)
    real, reads = following.open_run, []

    def open_run(path: Path):  # type: ignore[no-untyped-def]
        r = real(path)
        if not reads:  # the recorder closes right after the follower's first read of the manifest
            (run / fmt.MANIFEST).write_text(closed)
            lock.close()
        reads.append(r.status)
        return r

    monkeypatch.setattr(following, "open_run", open_run)
    said: list[str] = []
    ds = following.follow(trajscope.analyze, run, make_mlp, poll=0.1, notify=said.append, progress=False)
    assert reads[0] == fmt.STATUS_RECORDING and not said
    assert np.isfinite(ds["convexity_ratio_ref"].values).all()


def test_follow_of_a_finished_run_is_one_analysis(tmp_path: Path) -> None:
    run = classifier_run(tmp_path / "run", steps=4)
    seen: list[list[int]] = []
    ds = trajscope.analyze(run, make_mlp, follow=True, poll=0.1, write=False)
    from trajscope.analysis.follow import follow

    follow(trajscope.analyze, run, make_mlp, on_pairs=lambda d, new: seen.append(new), write=False)
    assert seen == [[0, 1, 2, 3]] and [int(t) for t in ds["step"].values] == [0, 1, 2, 3]
    with pytest.raises(AnalysisError, match=r"poll=0: expected a positive number of seconds"):
        trajscope.analyze(run, make_mlp, follow=True, poll=0)


def test_export_to_tensorboard_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``trajscope export RUN DIR --to tensorboard``: every per-pair and per-layer scalar at the pair's
    training step, the report's figures as images, the settings as text; EventAccumulator reads
    back the Dataset's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from support.rundirs import cli

    run = classifier_run(tmp_path / "run", steps=5)
    ds = trajscope.analyze(run, progress=False)
    code, out, err = cli(["export", str(run), str(tmp_path / "tb"), "--to", "tensorboard"], capsys)
    assert code == 0, err
    assert out.strip() == f"logged 5 pair(s) to tensorboard at {tmp_path / 'tb'}"
    _assert_logged(ds, tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert "trajscope/figures/inst_gap" in acc.Tags()["images"]
    assert any(t.startswith("trajscope/config") for t in acc.Tags()["tensors"])


def test_a_missing_tracker_library_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from support.rundirs import cli

    run = classifier_run(tmp_path / "run", steps=3)
    trajscope.analyze(run, progress=False)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    code, _, err = cli(["export", str(run), str(tmp_path / "tb"), "--to", "tensorboard"], capsys)
    assert code == 1
    assert err.strip() == ("trajscope: error: --to tensorboard needs the tensorboard package: "
                           "pip install 'trajscope[tensorboard]'")
    code, _, err = cli(["analyze", str(run), str(tmp_path / "tb")], capsys)
    assert code == 2 and "TARGET goes with --to TRACKER" in err
