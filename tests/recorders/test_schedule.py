"""Which optimizer steps the recorder saves (trajscope.recorders.schedule): every/window, At, a list, Log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import trajscope
from support.problems import make_mlp, train_classifier
from support.recorder_objectives import (
    one_torch_thread,  # noqa: F401 - autouse fixture
    train_sgd,
)
from trajscope.errors import RecorderError
from trajscope.recorders import At, Every, Log, Recorder
from trajscope.store.run import open_run


def _recorded(tmp_path: Path, name: str, steps: int, **kw: object) -> list[int]:
    train_sgd(tmp_path / name, steps=steps, recorder_kwargs=kw)
    return [t for t in open_run(tmp_path / name).steps if t != steps]


def test_schedules_record_exactly_their_steps(tmp_path: Path) -> None:
    assert _recorded(tmp_path, "every", 12, every=5, window=2) == [0, 1, 5, 6, 10, 11]
    assert _recorded(tmp_path, "every3", 12, every=5, window=3) == [0, 1, 2, 5, 6, 7, 10, 11]
    assert _recorded(tmp_path, "at", 12, schedule=At([3, 9], window=2)) == [3, 4, 9, 10]
    assert _recorded(tmp_path, "list", 12, schedule=[2, 3, 7]) == [2, 3, 7]
    assert _recorded(tmp_path, "log", 30, schedule=Log(per_decade=4, window=2)) == [
        0, 1, 2, 3, 4, 6, 7, 10, 11, 18, 19]
    run = open_run(tmp_path / "log")
    assert run.manifest["schedule"] == {"kind": "log", "per_decade": 4, "window": 2, "start": 0}
    # unrecorded steps still have their scalars line
    lines = [json.loads(s) for s in (tmp_path / "log" / "scalars.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == list(range(30))
    assert [ln["step"] for ln in lines if ln["recorded"]] == [0, 1, 2, 3, 4, 6, 7, 10, 11, 18, 19]


def test_log_schedule_is_dense_early_and_sparse_late() -> None:
    log = Log(per_decade=10, window=2)
    recorded = [t for t in range(100_000) if log(t)]
    assert recorded[:12] == list(range(12))
    assert len(recorded) == 90
    assert 1000 in recorded and 1001 in recorded and 1002 not in recorded and 1259 in recorded


def test_schedule_arguments_are_checked() -> None:
    with pytest.raises(RecorderError, match="window=1: expected an int >= 2"):
        Every(10, 1)
    with pytest.raises(RecorderError, match="per_decade=0"):
        Log(per_decade=0)
    with pytest.raises(RecorderError, match=r"steps=\['a'\]: expected ints >= 0, got 'a'"):
        At(["a"])  # type: ignore[list-item]
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="pass one or the other"):
        Recorder("unused", model, opt, every=10, schedule=Log())


def test_schedule_every_window(tmp_path) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=23, every=10, window=3)
    run = trajscope.open_run(tmp_path / "run")
    assert run.steps == [0, 1, 2, 10, 11, 12, 20, 21, 22, 23]  # + final state x_23
    assert run.pairs == [0, 1, 10, 11, 20, 21, 22]
    assert run.final_step == 23 and run.status == "complete"
    lines = [json.loads(l) for l in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(23))
    assert [l["step"] for l in lines if l["recorded"]] == [0, 1, 2, 10, 11, 12, 20, 21, 22]
    assert all(np.isfinite(l["loss"]) and l["lr"] == [0.1] and not l["skipped"] for l in lines)
