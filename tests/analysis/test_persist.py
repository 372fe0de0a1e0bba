"""What an analysis keeps on disk (trajscope.analysis.persist): the persisted pairs that resume, extend and
survive an interrupted (SIGKILLed) analysis, and the one-analysis-at-a-time lock.

Pairs written in groups: tests/analysis/test_persist_grouped_writes.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import trajscope
import trajscope.analysis.persist as persist
import trajscope.analysis.tasks as tasks
from support.problems import classifier_run, make_mlp
from trajscope.errors import AnalysisError

TESTS = Path(__file__).parents[1]  # on a child interpreter's PYTHONPATH: the helpers in support/
STEPS = 16


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classifier_run(tmp_path_factory.mktemp("resume") / "run", steps=STEPS)


@pytest.fixture
def run(recorded: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(recorded, dst)
    return dst


@pytest.fixture(scope="module")
def uninterrupted(recorded: Path) -> xr.Dataset:
    return trajscope.analyze(recorded, make_mlp, write=False, progress=False)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The steps of the pairs probed (synchronous scheduler: in this process)."""
    calls: list[int] = []
    real = tasks.probe_pair

    def counting(objective, snap, nxt, settings, **kw):
        calls.append(snap.step)
        return real(objective, snap, nxt, settings, **kw)

    monkeypatch.setattr(tasks, "probe_pair", counting)
    return calls


def assert_same_dataset(ds: xr.Dataset, ref: xr.Dataset) -> None:
    """Identical data (the `created` timestamp and the run path aside)."""
    xr.testing.assert_identical(ds.drop_attrs(), ref.drop_attrs())
    skip = {"created", "run"}
    assert {k: v for k, v in ds.attrs.items() if k not in skip} == {
        k: v for k, v in ref.attrs.items() if k not in skip}


def pair_files(run: Path) -> dict[str, tuple[int, int]]:
    """Persisted pairs: name → (inode, mtime_ns); a recomputed pair gets a new inode (rename)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (run / "analysis" / "pairs").glob("pair_*.safetensors")}


def test_rerun_skips_finished_pairs(run: Path, uninterrupted: xr.Dataset, probes: list[int]) -> None:
    trajscope.analyze(run, make_mlp, steps="0:5", progress=False)
    assert sorted(probes) == [0, 1, 2, 3, 4]
    before = pair_files(run)
    probes.clear()
    ds = trajscope.analyze(run, make_mlp, progress=False)
    assert sorted(probes) == list(range(5, STEPS))
    assert all(pair_files(run)[k] == v for k, v in before.items())  # untouched
    assert_same_dataset(ds, uninterrupted)
    assert_same_dataset(trajscope.open_metrics(run), uninterrupted)
    probes.clear()
    trajscope.analyze(run, make_mlp, progress=False)
    assert probes == []  # everything persisted: nothing to probe
    trajscope.analyze(run, make_mlp, force=True, progress=False, steps="3:6")
    assert sorted(probes) == [3, 4, 5]


def test_other_settings_do_not_reuse_pairs(run: Path, probes: list[int]) -> None:
    trajscope.analyze(run, make_mlp, steps="0:3", progress=False)
    probes.clear()
    trajscope.analyze(run, make_mlp, steps="0:3", points=5, progress=False)
    assert sorted(probes) == [0, 1, 2]  # another α grid: another settings digest


def test_new_recorded_steps_cost_only_their_pairs(run: Path, uninterrupted: xr.Dataset,
                                                  probes: list[int], tmp_path: Path) -> None:
    # Steps 10..15 not there yet (the final state, the default reference point x*, is: a run
    # still recording has none, and x* appearing changes every pair's convexity_ratio_ref terms).
    hidden = tmp_path / "later"
    hidden.mkdir()
    for f in sorted((run / "steps").iterdir()):
        if 10 <= int(f.stem.split("_")[1]) < STEPS:
            f.rename(hidden / f.name)
    ds = trajscope.analyze(run, make_mlp, progress=False)
    assert list(ds.step.values) == list(range(9)) and sorted(probes) == list(range(9))
    for f in hidden.iterdir():
        f.rename(run / "steps" / f.name)
    probes.clear()
    ds = trajscope.analyze(run, make_mlp, progress=False)
    assert sorted(probes) == list(range(9, STEPS))
    assert_same_dataset(ds, uninterrupted)


def _cli_analyze(run: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-m", "trajscope.cli", "analyze", str(run), "--objective",
         "support.slow_objective:make_slow_mlp", "--device", "cpu", "--quiet"],
        cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def test_sigkill_mid_way_then_rerun(run: Path, uninterrupted: xr.Dataset, probes: list[int]) -> None:
    proc = _cli_analyze(run)
    pairs_dir = run / "analysis" / "pairs"
    deadline = time.monotonic() + 120
    try:
        while len(pair_files(run)) < 3 if pairs_dir.is_dir() else True:
            if proc.poll() is not None:
                pytest.fail(f"analysis ended before it could be killed: {proc.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("no pair persisted within 120 s")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    before = pair_files(run)
    assert 3 <= len(before) < STEPS, "the analysis must have been killed mid-way"
    assert not (run / "analysis" / "metrics.nc").exists()  # never a partial Dataset
    # Re-run (the lock died with the killed process): only the unfinished pairs are probed.
    from support.slow_objective import make_slow_mlp

    ds = trajscope.analyze(run, "support.slow_objective:make_slow_mlp", device="cpu", progress=False)
    done_before = sorted(int(n[5:13]) for n in before)
    assert sorted(probes) == [t for t in range(STEPS) if t not in done_before]
    after = pair_files(run)
    assert all(after[k] == v for k, v in before.items())  # finished pairs untouched
    assert not list((run / "analysis").rglob(".*.tmp-*"))  # no temp file left behind
    # The same Dataset as an uninterrupted run (the slow objective computes the same loss).
    assert_same_dataset(ds.drop_attrs(), uninterrupted.drop_attrs())
    assert ds.attrs["objective"] == "support.slow_objective:make_slow_mlp" and make_slow_mlp


def test_a_second_analysis_of_the_same_run_is_refused(run: Path) -> None:
    with persist.analysis_lock(run / "analysis"):
        with pytest.raises(AnalysisError, match=r"another analysis of this run is writing here \(pid \d+"):
            trajscope.analyze(run, make_mlp, steps="0:2", progress=False)
        # reading and analyzing without writing stay possible
        ds = trajscope.analyze(run, make_mlp, steps="0:2", write=False, progress=False)
        assert len(ds.step) == 2
    trajscope.analyze(run, make_mlp, steps="0:2", progress=False)  # released


@pytest.mark.skipif(sys.platform == "win32", reason="the holder uses fcntl")
def test_the_lock_of_a_killed_process_is_released(run: Path) -> None:
    (run / "analysis").mkdir()
    # Another process holding the lock the way analyze does (flock on analysis/.lock), without
    # paying for importing torch.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fh = open({str(run / 'analysis' / '.lock')!r}, 'a+')\n"
        "fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "fh.write(f'pid {os.getpid()} on here'); fh.flush()\n"
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(AnalysisError, match=f"pid {holder.pid}"):
            trajscope.analyze(run, make_mlp, steps="0:1", progress=False)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    trajscope.analyze(run, make_mlp, steps="0:1", progress=False)


def test_damaged_partial_results_are_recomputed(run: Path, probes: list[int]) -> None:
    trajscope.analyze(run, make_mlp, steps="0:3", progress=False)
    victim = run / "analysis" / "pairs" / "pair_00000001.safetensors"
    victim.write_bytes(victim.read_bytes()[:50])
    (run / "analysis" / "pairs" / ".pair_00000002.safetensors.tmp-99999").write_bytes(b"x")
    probes.clear()
    ds = trajscope.analyze(run, make_mlp, steps="0:3", progress=False)
    assert probes == [1]
    assert np.isfinite(ds.loss_change.values).all()
    assert not list((run / "analysis").rglob(".*.tmp-*"))
