"""Reading a run directory (trajscope.store.run): an incomplete run; what `info` says of a sharded one.

``info``, ``validate``, ``analyze`` and ``summary`` say when a run is incomplete, in one line
computed by ``Run.incomplete_note``: a run whose recorder is alive (it holds the recording lock), one
whose recorder is gone (killed: the manifest still says ``recording``), one marked ``crashed``
(the training loop raised), and a complete run, which gets no such line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from support.problems import B_MEAN, DIM, QuadModel, quad_loss
from support.recording import train_steps
from support.rundirs import cli, copy_run, edit_manifest, quad_run
from trajscope.recorders import Recorder
from trajscope.store.run import open_run

ANALYZE = ["-q", "--dtype", "float64", "--points", "3", "--margin", "0"]


def _train(rec: Recorder, model: QuadModel, opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(3)
    draws = (B_MEAN + 0.3 * torch.randn(DIM, generator=gen, dtype=torch.float64) for _ in range(steps))
    train_steps(rec, model, opt, quad_loss, draws)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Path]:
    """A run whose recorder is open in this process after 3 steps (snapshots 0, 1, 2 on disk)."""
    model = QuadModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(tmp_path / "live", model, opt, objective="support.problems:make_quadratic")
    rec.start()
    try:
        _train(rec, model, opt, 3)
        rec.flush()
        yield tmp_path / "live"
    finally:
        rec.close()


def _crashed(path: Path) -> Path:
    model = QuadModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="diverged"):
        with Recorder(path, model, opt, objective="support.problems:make_quadratic") as rec:
            _train(rec, model, opt, 3)
            raise RuntimeError("diverged")
    return path


def _lines(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, tuple[str, str]]:
    """(stdout, stderr) of each command on ``run``; every command must succeed."""
    out = {}
    for cmd in (["info"], ["validate"], ["analyze", *ANALYZE], ["summary", "--json"]):
        code, stdout, err = cli([cmd[0], str(run), *cmd[1:]], capsys)
        assert code == 0, (cmd, stdout, err)
        out[cmd[0]] = (stdout, err)
    return out


def _check_said(run: Path, note: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert open_run(run).incomplete_note() == note
    said = _lines(run, capsys)
    assert said["info"] == (said["info"][0], "") and said["info"][0].splitlines()[-1] == note
    assert f"warning: {run / 'trajscope.json'}: {note}\n" in said["validate"][0]
    for cmd in ("analyze", "summary"):  # stdout stays the result (summary --json stays JSON)
        assert said[cmd][1] == f"trajscope: warning: {note}\n", (cmd, said[cmd])
        assert "incomplete" not in said[cmd][0]


def test_live_recording_says_the_recorder_is_alive(live: Path, capsys) -> None:
    _check_said(live, "run is incomplete: status recording (the recorder is alive), last recorded "
                      "step 2, no final state", capsys)


def test_killed_recording_says_the_recorder_is_gone(live: Path, tmp_path: Path, capsys) -> None:
    # The copy's manifest says `recording`, and nobody holds its recording lock: as after SIGKILL.
    gone = copy_run(live, tmp_path / "gone")
    _check_said(gone, "run is incomplete: status recording (the recorder is gone: crashed or killed), "
                      "last recorded step 2, no final state", capsys)


def test_recording_without_a_lock_says_it_cannot_tell(live: Path, tmp_path: Path, capsys) -> None:
    old = copy_run(live, tmp_path / "old")
    (old / ".recording.lock").unlink()
    assert open_run(old).incomplete_note() == (
        "run is incomplete: status recording (no recording lock tells whether the recorder is "
        "alive), last recorded step 2, no final state")


def test_crashed_run_says_why(tmp_path: Path, capsys) -> None:
    run = _crashed(tmp_path / "crashed")
    _check_said(run, "run is incomplete: status crashed (the training loop raised an exception), "
                     "last recorded step 2, no final state", capsys)
    failed = "step 3: writing steps/step_00000003.safetensors failed (OSError: No space left on device)"
    edit_manifest(run, lambda m: m.update(error=failed))  # what the recorder writes when a write fails
    assert open_run(run).incomplete_note() == (
        f"run is incomplete: status crashed (recording stopped: {failed}), last recorded step 2, "
        "no final state")


def test_complete_run_says_nothing(tmp_path: Path, capsys) -> None:
    run = quad_run(tmp_path / "done", steps=3)
    assert open_run(run).incomplete_note() is None
    for stdout, err in _lines(run, capsys).values():
        assert "incomplete" not in stdout + err and err == ""


def test_info_says_how_a_sharded_run_was_sharded(tmp_path: Path, capsys) -> None:
    from support.sharded import shard_run

    run = shard_run(quad_run(tmp_path / "run", steps=3))
    code, out, _ = cli(["info", str(run)], capsys)
    assert code == 0 and "sharded    fsdp2, parts from ranks 0, 1 of 2 (mesh 2)" in out.splitlines()
    edit_manifest(run, lambda m: m["distributed"].update(
        shard_ranks=[0, 2], world_size=4, mesh={"shape": [2, 2], "dim_names": ["replicate", "shard"]},
        mixed_precision={"param_dtype": "bfloat16", "reduce_dtype": "float32"}))
    assert ("sharded    fsdp2, parts from ranks 0, 2 of 4 (mesh 2x2: replicate, shard), mixed precision "
            "param_dtype bfloat16, reduce_dtype float32") in open_run(run).describe().splitlines()
    edit_manifest(run, lambda m: m.update(distributed={"world_size": 2, "writer_rank": 0}))  # DDP
    assert not any(line.startswith("sharded") for line in open_run(run).describe().splitlines())
