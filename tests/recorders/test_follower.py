"""Starting the live analysis from training (trajscope.recorders.follow, ``rec.follow()`` and the
callbacks' ``follow=``): a process of its own, at a lower priority, that stops by itself once the
run is closed, having analyzed every pair."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import trajscope
from support import live
from support.recorder_objectives import mlp
from trajscope import runformat as fmt
from trajscope.errors import RecorderError
from trajscope.recorders import Recorder
from trajscope.recorders.follow import NICE, follower_command


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_rec_follow_analyzes_the_run_in_a_lower_priority_process_that_outlives_training(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "follow.log"
    train = live.train(run, 8, 0.2, log)
    assert train.stdout is not None
    pid = int(train.stdout.readline())
    assert pid not in (train.pid, os.getpid())
    def niceness() -> int:  # field 19 of /proc/PID/stat
        return int(Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[16])

    def lowered() -> bool:  # set as the follower starts; SCHED_IDLE: only CPU time training leaves idle
        idle = not hasattr(os, "SCHED_IDLE") or os.sched_getscheduler(pid) == os.SCHED_IDLE
        return idle and niceness() - os.nice(0) >= NICE

    deadline = time.monotonic() + 30
    while not lowered() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lowered()
    assert train.wait(timeout=120) == 0, train.communicate()
    deadline = time.monotonic() + 120
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the follower did not stop by itself"
    ds = trajscope.open_metrics(run)
    assert [int(t) for t in ds["step"].values] == list(range(8))
    assert "pairs 0" in log.read_text() and "wrote" in log.read_text()


def test_follow_is_refused_without_an_objective_or_an_open_recorder(tmp_path: Path) -> None:
    model = mlp()
    rec = Recorder(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RecorderError, match=r"follow\(\): needs an open recorder"):
        rec.follow()
    with rec, pytest.raises(RecorderError, match=r"names its objective"):
        rec.follow()
    with pytest.raises(RecorderError, match=r"give both, e.g. to='tensorboard'"):
        follower_command(tmp_path / "run", to="tensorboard")
    cmd = follower_command(tmp_path / "run", device="cuda:1", to="tensorboard", target="tb", nice=0)
    assert cmd[3:] == ["analyze", str(tmp_path / "run"), "--follow", "--poll", "2.0", "--device", "cuda:1",
                       "--to", "tensorboard", "tb", "-q"]
    assert (tmp_path / "run" / fmt.MANIFEST).exists()


def test_lightning_callback_follows_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``TrajscopeCallback(..., follow={...})`` starts the follower with training; it ends by itself
    with every pair analyzed."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from support.lit import LitClassifier, make_lit_classifier
    from support.problems import classification_data
    from trajscope.recorders.lightning import TrajscopeCallback

    monkeypatch.setenv("PYTHONPATH", live.env()["PYTHONPATH"])
    x, y = classification_data(64)
    callback = TrajscopeCallback(tmp_path / "run", objective=make_lit_classifier,
                                 follow={"log": tmp_path / "follow.log", "poll": 0.3})
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    torch.manual_seed(0)
    trainer.fit(LitClassifier(), DataLoader(TensorDataset(x, y), batch_size=16))
    assert callback.follower is not None
    assert callback.follower.wait(timeout=120) == 0, (tmp_path / "follow.log").read_text()
    assert [int(t) for t in trajscope.open_metrics(tmp_path / "run")["step"].values] == [0, 1, 2, 3]
