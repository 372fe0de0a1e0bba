"""The recorder's write path (trajscope.recorders.storage): files laid out by the recorder itself, a
bounded buffer pool (training waits for a slow disk), direct and buffered writes alike."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from support.recorder_objectives import (
    one_torch_thread,  # noqa: F401 - autouse fixture
    train_sgd,
)
from trajscope import runformat as fmt
from trajscope.recorders import Recorder
from trajscope.recorders import storage as storage_mod
from trajscope.recorders.backends import SafetensorsWriter
from trajscope.store.run import open_run


def test_safetensors_files_are_valid_for_the_safetensors_library(tmp_path: Path) -> None:
    """The recorder lays files out itself (no serialisation copy); the reference reader agrees."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {
        "bf16": torch.randn(4, 3).to(torch.bfloat16),
        "f16": torch.randn(5).to(torch.float16),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4)[:, ::2],
        "label": "not a tensor",
        "n": 7,
    }
    with Recorder(tmp_path / "run", model, opt, every=1) as rec:
        model(torch.ones(1, 3)).sum().backward()
        rec.batch(batch, loss=1.0)
        opt.step()
    path = tmp_path / "run" / "steps" / fmt.step_filename(0)
    loaded = safetensors.torch.load(path.read_bytes())
    tree = json.loads(safetensors.safe_open(path, "pt").metadata()["trajscope"])["batch_tree"]
    leaves = [loaded[f"batch/{i}"] for i in range(len([k for k in loaded if k.startswith("batch/")]))]
    back = fmt.unflatten_batch(tree, leaves)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
        else:
            assert back[key] == value
    assert len(path.read_bytes()) == 8 + int.from_bytes(path.read_bytes()[:8], "little") + sum(
        t.numel() * t.element_size() for t in loaded.values()
    )


def test_back_pressure_bounds_pending_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow disk makes training wait instead of queueing unbounded copies."""
    in_flight = []
    peak = [0]
    lock = threading.Lock()
    real_write = SafetensorsWriter.write
    real_build = storage_mod.build_image

    def counting_build(*args: object, **kw: object) -> object:
        with lock:
            in_flight.append(1)
            peak[0] = max(peak[0], len(in_flight))
        return real_build(*args, **kw)  # type: ignore[arg-type]

    def slow_write(self: object, image: object) -> Path:
        time.sleep(0.05)
        out = real_write(self, image)  # type: ignore[arg-type]
        with lock:
            in_flight.pop()
        return out

    monkeypatch.setattr(SafetensorsWriter, "write", slow_write)
    monkeypatch.setattr(storage_mod, "build_image", counting_build)
    t0 = time.perf_counter()
    train_sgd(tmp_path / "run", steps=8, recorder_kwargs={"max_pending": 2})
    elapsed = time.perf_counter() - t0
    assert peak[0] == 2  # never more than max_pending copies alive
    assert elapsed >= 9 * 0.05 * 0.9  # training waited for the (9 writes of the) slow disk
    assert open_run(tmp_path / "run").steps == list(range(9))


def test_direct_and_buffered_writes_give_the_same_files(tmp_path: Path) -> None:
    train_sgd(tmp_path / "a", steps=3, recorder_kwargs={"direct_io": True})
    train_sgd(tmp_path / "b", steps=3, recorder_kwargs={"direct_io": False})
    for t in range(4):
        a = (tmp_path / "a" / "steps" / fmt.step_filename(t)).read_bytes()
        b = (tmp_path / "b" / "steps" / fmt.step_filename(t)).read_bytes()
        assert a == b
