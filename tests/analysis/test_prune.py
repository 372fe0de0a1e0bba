"""Retention (trajscope.analysis.prune, ``trajscope analyze --prune``): a snapshot is removed only
once every pair that reads it is analyzed, whenever the pruning process is killed, and the pruned
run's analysis equals the unpruned run's."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import trajscope
from support import live
from support.problems import classifier_run
from trajscope import runformat as fmt
from trajscope.analysis.prune import prunable, prune
from trajscope.errors import AnalysisError, RunFormatError


def _readers(have: set[int], s: int, final: int | None) -> list[int]:
    return [t for t in (s - 1, s, s + 1) if t in have and t + 1 in have and t != final]


def assert_nothing_unanalyzed_removed(run: Path) -> None:
    """Every step missing from disk is listed in pruned.json, and every pair reading it has its
    persisted result on disk, readable; step 0 and the final state are still there."""
    r = trajscope.open_run(run)
    listed = set(json.loads((run / fmt.PRUNED).read_text())["steps"]) if (run / fmt.PRUNED).exists() else set()
    on_disk = set(r.steps)
    final = r.manifest["final_step"]
    assert {0, final} <= on_disk
    have = on_disk | listed
    for s in sorted(set(range(final + 1)) - on_disk):
        assert s in listed, f"step {s} is gone but not listed in {fmt.PRUNED}"
        for t in _readers(have, s, final):
            path = run / fmt.ANALYSIS_DIR / fmt.PAIRS_DIR / f"pair_{t:08d}.safetensors"
            assert path.exists(), f"step {s} removed before pair {t} was persisted"
            from safetensors.numpy import load_file

            assert "loss_line" in load_file(str(path)), path


def test_prune_after_an_analysis_keeps_what_is_needed_and_the_same_numbers(tmp_path: Path) -> None:
    run = classifier_run(tmp_path / "run", steps=12)
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    ds = trajscope.analyze(run, progress=False)
    r = trajscope.open_run(run)
    removed = prune(r, [int(t) for t in ds["step"].values], run / fmt.ANALYSIS_DIR / fmt.PAIRS_DIR, keep=[5])
    assert removed == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]  # 0 (x_0), 5 (kept) and 12 (final, x*) stay
    assert_nothing_unanalyzed_removed(run)
    r = trajscope.open_run(run)
    assert r.steps == [0, 5, 12] and r.pairs == [] and r.pruned_pairs == list(range(12))
    assert "12 analyzed and pruned" in r.describe()
    again, fresh = trajscope.analyze(run, progress=False), trajscope.analyze(copy, progress=False)
    for name in fresh.data_vars:
        np.testing.assert_array_equal(again[name].values, fresh[name].values, err_msg=name)
    from trajscope.tools.validate import validate_run

    assert validate_run(run).ok
    with pytest.raises(RunFormatError, match=r"pair 0: a snapshot it reads was pruned \(pruned.json\) after an "
                       r"analysis under other settings"):
        trajscope.analyze(run, points=5, write=False, progress=False)


def test_only_settled_and_analyzed_steps_are_prunable(tmp_path: Path) -> None:
    """While the run is recorded, a step whose later neighbours may still come is kept; so is a step
    read by a pair not analyzed yet, and the reference step."""
    run = classifier_run(tmp_path / "run", steps=10)
    manifest = json.loads((run / fmt.MANIFEST).read_text())
    (run / fmt.MANIFEST).write_text(json.dumps({**manifest, "status": fmt.STATUS_RECORDING, "final_step": None}))
    (run / fmt.STEPS_DIR / fmt.step_filename(10)).unlink()  # no final state yet: steps 0..9 on disk
    r = trajscope.open_run(run)
    assert prunable(r, range(9)) == list(range(1, 8))  # 8 and 9: step 10, 11 may still come
    # pair 4 reads x_3 (as x_{t-1}), x_4 and x_5
    assert prunable(r, [t for t in range(9) if t != 4]) == [1, 2, 6, 7]
    assert prunable(r, range(9), reference=3, keep=[6]) == [1, 2, 4, 5, 7]


def test_prune_refuses_an_hdf5_run(tmp_path: Path) -> None:
    run = classifier_run(tmp_path / "run", steps=3, format="hdf5")
    with pytest.raises(AnalysisError, match=r"keeps its steps in one HDF5 file; convert it first"):
        prune(trajscope.open_run(run), [0, 1, 2], run / fmt.ANALYSIS_DIR / fmt.PAIRS_DIR)


def test_a_pruning_follower_killed_at_random_never_removes_an_unanalyzed_step(tmp_path: Path) -> None:
    """``trajscope analyze RUN --follow --prune`` killed (SIGKILL) at 20 random moments, restarted each
    time: no step is ever removed before every pair reading it is persisted; the last, uninterrupted
    follower completes, and its analysis equals an analysis of the unpruned run."""
    run = classifier_run(tmp_path / "run", steps=40, batch_size=8)
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    env = live.env()
    cmd = [sys.executable, "-c", "from trajscope.cli import main; main()", "analyze", str(run), "--follow",
           "--poll", "0.1", "--prune", "-q", "--derivatives", "reverse"]
    rng = random.Random(0)
    pruned_at_kill = []
    for _ in range(20):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(1.2, 3.2))
        proc.kill()
        proc.wait()
        assert_nothing_unanalyzed_removed(run)
        pruned_at_kill.append(len(trajscope.open_run(run).pruned))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_nothing_unanalyzed_removed(run)
    assert 0 < min(pruned_at_kill[5:]) and trajscope.open_run(run).steps == [0, 40]  # kills hit mid-work
    followed, fresh = trajscope.open_metrics(run), trajscope.analyze(copy, derivatives="reverse", write=False,
                                                                      progress=False)
    assert [int(t) for t in followed["step"].values] == list(range(40))
    for name in fresh.data_vars:
        np.testing.assert_array_equal(followed[name].values, fresh[name].values, err_msg=name)


def test_cli_prune_keeps_the_steps_asked_for_and_refuses_hdf5_at_once(tmp_path: Path, capsys) -> None:
    from support.rundirs import cli

    run = classifier_run(tmp_path / "run", steps=8)
    code, _, err = cli(["analyze", str(run), "--prune", "--keep", "3:5"], capsys)
    assert code == 0, err
    assert trajscope.open_run(run).steps == [0, 3, 4, 8]
    assert "pruned 5 snapshot(s) (steps 1-7); listed in pruned.json" in err
    h5 = classifier_run(tmp_path / "h5", steps=3, format="hdf5")
    code, _, err = cli(["analyze", str(h5), "--prune"], capsys)
    assert code == 1 and err.count("\n") == 1 and "convert it first" in err
    assert not (h5 / fmt.ANALYSIS_DIR / fmt.METRICS_FILE).exists()  # refused before any work


def test_pruning_a_sharded_run_removes_the_parts_after_their_step_file(tmp_path: Path) -> None:
    """A pruned step's parts in shards/ go after its step file; parts a prune killed between the two
    left (their step listed and gone) go at the next prune; the rest reads and analyzes as before."""
    from support.sharded import shard_run
    from trajscope.tools.validate import validate_run

    run = shard_run(classifier_run(tmp_path / "run", steps=8))
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    # the same kernels in every analysis (one scheduler thread, α points by vmap): equal to the bit
    ds = trajscope.analyze(run, progress=False, scheduler="synchronous", batched=True)
    pairs_dir = run / fmt.ANALYSIS_DIR / fmt.PAIRS_DIR
    analyzed = [int(t) for t in ds["step"].values]
    assert prune(trajscope.open_run(run), analyzed, pairs_dir, keep=[3, 4, 5, 6, 7]) == [1, 2]

    def parts() -> list[int]:
        return sorted(fmt.parse_shard_filename(p.name)[0] for p in (run / fmt.SHARDS_DIR).iterdir())

    assert parts() == [0, 3, 4, 5, 6, 7, 8]
    left = run / fmt.SHARDS_DIR / fmt.shard_filename(2, 1)  # as a prune killed after step 2's step file left it
    shutil.copyfile(run / fmt.SHARDS_DIR / fmt.shard_filename(3, 1), left)
    assert prune(trajscope.open_run(run), analyzed, pairs_dir) == [3, 4, 5, 6, 7]
    assert parts() == [0, 8] and not left.exists()
    assert_nothing_unanalyzed_removed(run)
    report = validate_run(run)
    assert report.problems == [] and report.warnings == []
    again = trajscope.analyze(run, progress=False, scheduler="synchronous", batched=True)
    fresh = trajscope.analyze(copy, progress=False, scheduler="synchronous", batched=True)
    for name in fresh.data_vars:
        np.testing.assert_array_equal(again[name].values, fresh[name].values, err_msg=name)
