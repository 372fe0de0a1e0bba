"""What the recorder copies, and when (trajscope.recorders.capture): x_t, g_t and the minibatch as the
optimizer saw them, frozen parameters and parameter groups, index minibatches with a ``batch_fn``,
the optimizer state, an L-BFGS closure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trajscope
from support.recorder_objectives import (
    batch_from_indices,
    batches,
    dataset,
    make_mlp,
    mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    xent,
)
from trajscope import runformat as fmt
from trajscope.recorders import Recorder
from trajscope.store import open_run, read_raw

FORMATS = ["safetensors", "hdf5"]


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
                  batch_fn="support.recorder_objectives:batch_from_indices") as rec:
        for idx in batches(3):
            opt.zero_grad()
            loss = xent(model, (x[idx], y[idx]))
            loss.backward()
            rec.batch(idx.tolist(), loss=loss)  # indices only: no input tensor is stored
            opt.step()
    meta, tensors = read_raw(tmp_path / "run" / "steps" / fmt.step_filename(1))
    assert meta["batch_fn"] == "support.recorder_objectives:batch_from_indices"
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


