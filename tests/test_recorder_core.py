"""The recorder's write path: what a snapshot holds, schedules, formats, the writer thread."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from recorder_objectives import (
    batch_from_indices,
    batches,
    dataset,
    make_mlp,
    mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    train_sgd,
    xent,
)

import trajscope
from trajscope import runformat as fmt
from trajscope.errors import RecorderError
from trajscope.recorders import At, Every, Log, Recorder
from trajscope.recorders import storage as storage_mod
from trajscope.recorders.backends import SafetensorsWriter
from trajscope.store.run import open_run, read_raw

FORMATS = ["safetensors", "hdf5"]


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("async_write", [True, False])
def test_training_is_bit_identical_with_and_without_recorder(tmp_path: Path, format: str,
                                                             async_write: bool) -> None:
    plain = train_sgd(None, steps=5)
    recorded = train_sgd(tmp_path / "run", steps=5,
                         recorder_kwargs={"format": format, "async_write": async_write})
    for (n, a), (_, b) in zip(plain.named_parameters(), recorded.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("format", FORMATS)
def test_snapshot_holds_x_t_g_t_and_batch_as_the_optimizer_saw_them(tmp_path: Path, format: str) -> None:
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = dataset()
    expected = {}
    with Recorder(tmp_path / "run", model, opt, objective=make_mlp, format=format) as rec:
        for t, idx in enumerate(batches(4)):
            batch = (x[idx], y[idx])
            opt.zero_grad()
            loss = xent(model, batch)
            loss.backward()
            expected[t] = ({n: p.detach().clone() for n, p in model.named_parameters()},
                           {n: p.grad.clone() for n, p in model.named_parameters()},
                           batch, float(loss.detach()))
            rec.batch(batch, loss=loss)
            opt.step()
    run = open_run(tmp_path / "run")
    assert run.steps == [0, 1, 2, 3, 4] and run.final_step == 4 and run.status == "complete"
    assert run.pairs == [0, 1, 2, 3]
    for t, (params, grads, batch, loss) in expected.items():
        snap = run.snapshot(t)
        assert snap.step == t and snap.kind == "step" and snap.lr == [0.1]
        for n in params:
            assert torch.equal(snap.params[n], params[n])
            assert torch.equal(snap.grads[n], grads[n])
        assert isinstance(snap.batch, tuple)
        assert torch.equal(snap.batch[0], batch[0]) and torch.equal(snap.batch[1], batch[1])
        assert snap.loss == pytest.approx(loss, rel=0, abs=0)
        assert snap.micro_weights is None
    final = run.snapshot(4)
    assert final.kind == "final" and not final.grads
    for n, p in model.named_parameters():
        assert torch.equal(final.params[n], p.detach())
    lines = [json.loads(s) for s in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [0, 1, 2, 3]
    assert [ln["loss"] for ln in lines] == [expected[t][3] for t in range(4)]


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


def test_frozen_parameters_and_several_param_groups(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp()
    model[0].bias.requires_grad_(False)  # frozen, not in the optimizer
    opt = torch.optim.SGD([
        {"params": [model[0].weight], "lr": 0.1},
        {"params": [model[2].weight, model[2].bias], "lr": 0.01, "momentum": 0.9},
    ])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = dataset()
    frozen = model[0].bias.detach().clone()
    with Recorder(tmp_path / "run", model, opt, objective=make_mlp) as rec:
        for idx in batches(3):
            opt.zero_grad()
            loss = xent(model, (x[idx], y[idx]))
            loss.backward()
            rec.batch((x[idx], y[idx]), loss=loss)
            opt.step()
            sched.step()
    run = open_run(tmp_path / "run")
    assert run.trainable == ["0.weight", "2.weight", "2.bias"]
    groups = run.manifest["optimizer"]["param_groups"]
    assert [g["params"] for g in groups] == [["0.weight"], ["2.weight", "2.bias"]]
    assert [s.lr for s in (run.snapshot(t) for t in range(3))] == [
        [0.1, 0.01], [0.05, 0.005], [0.025, 0.0025]]
    snap = run.snapshot(1)
    assert "0.bias" not in snap.grads and torch.equal(snap.params["0.bias"], frozen)
    ds = trajscope.analyze(tmp_path / "run", make_mlp, progress=False, points=3, margin=0.0)
    assert list(ds.layer.values) == ["0.weight", "2.weight", "2.bias"]
    assert float(ds.loss_replay_error.max()) < 1e-6
    # the Dataset's lr coordinate is group 0's rate at each step
    np.testing.assert_allclose(ds.lr.values, [0.1, 0.05, 0.025])


def test_batch_indices_with_a_rebuild_function(tmp_path: Path) -> None:
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    with Recorder(tmp_path / "run", model, opt, objective=make_mlp,
                  batch_fn="recorder_objectives:batch_from_indices") as rec:
        for idx in batches(3):
            opt.zero_grad()
            loss = xent(model, (x[idx], y[idx]))
            loss.backward()
            rec.batch(idx.tolist(), loss=loss)  # indices only: no input tensor is stored
            opt.step()
    meta, tensors = read_raw(tmp_path / "run" / "steps" / fmt.step_filename(1))
    assert meta["batch_fn"] == "recorder_objectives:batch_from_indices"
    assert [k for k in tensors if k.startswith("batch/")] == ["batch/0"]
    assert tensors["batch/0"].dtype == torch.int64
    snap = open_run(tmp_path / "run").snapshot(1)
    idx = batches(3)[1]
    assert torch.equal(snap.batch_indices, idx)
    assert torch.equal(snap.batch[0], x[idx]) and torch.equal(snap.batch[1], y[idx])
    ds = trajscope.analyze(tmp_path / "run", make_mlp, progress=False, points=3, margin=0.0)
    assert float(ds.loss_replay_error.max()) < 1e-6 and float(ds.grad_replay_error.max()) < 1e-6
    _ = batch_from_indices  # the function the run names


def test_optimizer_state_is_the_state_the_update_used(tmp_path: Path) -> None:
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = dataset()
    before: dict[int, torch.Tensor] = {}
    with Recorder(tmp_path / "run", model, opt, optimizer_state=True, format="hdf5") as rec:
        for t, idx in enumerate(batches(3)):
            opt.zero_grad()
            loss = xent(model, (x[idx], y[idx]))
            loss.backward()
            st = opt.state.get(model[0].weight)
            before[t] = st["exp_avg"].clone() if st else None  # type: ignore[assignment]
            rec.batch((x[idx], y[idx]), loss=loss)
            opt.step()
    run = open_run(tmp_path / "run")
    assert run.snapshot(0).optimizer_state == {}  # Adam creates its state in the first step
    for t in (1, 2):
        state = run.snapshot(t).optimizer_state["0.weight"]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.equal(state["exp_avg"], before[t])
        assert float(state["step"]) == t


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
    monkeypatch.setattr("trajscope.recorders.recorder.build_image", counting_build)
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


def test_misuse_gives_one_clear_error(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="format='zarr': expected one of safetensors, hdf5"):
        Recorder(tmp_path / "r", model, opt, format="zarr")
    with pytest.raises(RecorderError, match="accumulation=0"):
        Recorder(tmp_path / "r", model, opt, accumulation=0)
    with pytest.raises(RecorderError, match="on_error='ignore'"):
        Recorder(tmp_path / "r", model, opt, on_error="ignore")
    with pytest.raises(RecorderError, match="batch_fn=.*module-level function"):
        Recorder(tmp_path / "r", model, opt, batch_fn=lambda ix: ix)
    rec = Recorder(tmp_path / "r", model, opt)
    with pytest.raises(RecorderError, match="outside the recorder's `with` block"):
        rec.batch((torch.ones(1),))
    with pytest.raises(RecorderError, match=r"step 0: optimizer.step\(\) was called without rec.batch"):
        with Recorder(tmp_path / "r2", model, opt):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
    assert json.loads((tmp_path / "r2" / "trajscope.json").read_text())["status"] == "crashed"
    with pytest.raises(RecorderError, match="already holds a trajscope run"):
        Recorder(tmp_path / "r2", model, opt).start()


def test_lbfgs_closure_is_recorded_after_its_first_evaluation(tmp_path: Path) -> None:
    """With a closure the gradient exists only inside step(): it is captured after the closure."""
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    x, y = dataset()
    batch = (x[:64], y[:64])
    grads = []
    with Recorder(tmp_path / "run", model, opt, objective=make_mlp) as rec:
        for _ in range(2):
            first = [True]

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(model(batch[0]), batch[1])
                loss.backward()
                if first[0]:
                    first[0] = False
                    grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
                    rec.batch(batch, loss=loss)
                return loss

            opt.step(closure)
    run = open_run(tmp_path / "run")
    for t in (0, 1):
        snap = run.snapshot(t)
        for n, g in grads[t].items():
            assert torch.equal(snap.grads[n], g)
    ds = trajscope.analyze(tmp_path / "run", make_mlp, progress=False, points=3, margin=0.0)
    assert float(ds.grad_replay_error.max()) < 1e-6


def test_stats_account_for_every_snapshot(tmp_path: Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    with Recorder(tmp_path / "run", model, opt, every=4, window=2) as rec:
        for idx in batches(8):
            opt.zero_grad()
            xent(model, (x[idx], y[idx])).backward()
            rec.batch((x[idx], y[idx]))
            opt.step()
        rec.flush()
        stats = rec.stats
        assert stats.snapshots == 4  # steps 0, 1, 4, 5
        files = sorted((tmp_path / "run" / "steps").iterdir())
        assert stats.bytes == sum(f.stat().st_size for f in files)
        assert 0 < stats.copy_seconds <= stats.hook_seconds
        assert stats.write_seconds > 0 and stats.wait_seconds >= 0
    assert rec.stats.snapshots == 5  # + the final state at close
