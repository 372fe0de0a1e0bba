"""Training features end to end: each run is recorded, analyzed, and the metrics checked for the
values the theory predicts (not just their presence)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trajscope
from support.recorder_objectives import (
    batches,
    dataset,
    make_mlp,
    make_mlp_bf16,
    make_mlp_dropout,
    one_torch_thread,  # noqa: F401 - autouse fixture
    xent,
)
from trajscope.recorders import Recorder
from trajscope.store.run import open_run

FAST = {"progress": False, "points": 3, "margin": 0.0}


def _grad_of(model: torch.nn.Module, loss_fn) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_fn(), list(params.values()))
    return dict(zip(params, grads))


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = math.sqrt(sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a))
    den = math.sqrt(sum(float((b[k].double() ** 2).sum()) for k in b))
    return num / den


@pytest.mark.parametrize("format", ["safetensors", "hdf5"])
def test_gradient_accumulation_replays_the_mean_of_micro_batch_losses(tmp_path: Path, format: str) -> None:
    obj = make_mlp_dropout()  # dropout too: micro-batches replay in order from the recorded RNG
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = dataset()
    k = 3
    idx = batches(4 * k, size=16)
    micro_losses = []
    with Recorder(tmp_path / "run", model, opt, accumulation=k, format=format) as rec:
        for step in range(4):
            opt.zero_grad()
            for i in range(k):
                mb = (x[idx[step * k + i]], y[idx[step * k + i]])
                loss = xent(model, mb)
                (loss / k).backward()
                rec.batch(mb, loss=loss)
                micro_losses.append(float(loss.detach()))
            opt.step()
    run = open_run(tmp_path / "run")
    snap = run.snapshot(2)
    assert isinstance(snap.batch, list) and len(snap.batch) == k
    assert snap.micro_weights == [1 / k] * k
    assert torch.equal(snap.batch[1][0], x[idx[2 * k + 1]])
    assert snap.loss == pytest.approx(sum(micro_losses[2 * k : 3 * k]) / k, rel=1e-12)
    lines = [json.loads(s) for s in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert [ln["micro_batches"] for ln in lines] == [k] * 4 and not any(ln["skipped"] for ln in lines)

    ds = trajscope.analyze(tmp_path / "run", make_mlp_dropout, **FAST)
    assert float(ds.loss_replay_error.max()) < 1e-6
    assert float(ds.grad_replay_error.max()) < 1e-5

    # Control: the gradient of the first micro-batch alone is far from g_t, so the test above
    # would fail if the analyzer replayed one micro-batch instead of the documented mean.
    replay = make_mlp_dropout().model
    replay.load_state_dict(snap.params)
    torch.set_rng_state(snap.rng["cpu"])
    first = _grad_of(replay, lambda: xent(replay, snap.batch[0]))
    assert _rel(first, snap.grads) > 0.2


def test_accumulation_with_explicit_weights_and_a_short_last_step(tmp_path: Path) -> None:
    """A loop dividing by k also on the epoch's short last step (Lightning's convention):
    the weights passed to rec.batch make the replay match; the plain mean would not."""
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    k = 3
    groups = [3, 3, 2]  # 8 micro-batches per epoch
    idx = batches(8, size=16)
    with Recorder(tmp_path / "run", model, opt, accumulation=k) as rec:
        j = 0
        for m in groups:
            opt.zero_grad()
            for _ in range(m):
                mb = (x[idx[j]], y[idx[j]])
                j += 1
                loss = xent(model, mb)
                (loss / k).backward()
                rec.batch(mb, loss=loss, weight=1 / k)
            opt.step()
    run = open_run(tmp_path / "run")
    assert run.snapshot(2).micro_weights == [1 / k, 1 / k]
    ds = trajscope.analyze(tmp_path / "run", make_mlp, **FAST)
    assert float(ds.grad_replay_error.max()) < 1e-5
    assert float(ds.loss_replay_error.max()) < 1e-6


def test_sum_reduction(tmp_path: Path) -> None:
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = dataset()
    idx = batches(6, size=16)
    with Recorder(tmp_path / "run", model, opt, accumulation=2, accumulation_reduction="sum") as rec:
        for s in range(3):
            opt.zero_grad()
            for i in range(2):
                mb = (x[idx[2 * s + i]], y[idx[2 * s + i]])
                loss = xent(model, mb)
                loss.backward()  # no division: the step's loss is the sum
                rec.batch(mb, loss=loss)
            opt.step()
    assert open_run(tmp_path / "run").snapshot(0).micro_weights == [1.0, 1.0]
    ds = trajscope.analyze(tmp_path / "run", make_mlp, **FAST)
    assert float(ds.grad_replay_error.max()) < 1e-5


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    with Recorder(tmp_path / "run", model, opt) as rec:
        for idx in batches(4):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            rec.batch((x[idx], y[idx]), loss=loss)
            opt.step()
    run = open_run(tmp_path / "run")
    assert all(g.dtype == torch.float32 for g in run.snapshot(0).grads.values())
    # Replayed as trained (the recorded autocast), the loss and gradient are training's...
    ds = trajscope.analyze(tmp_path / "run", make_mlp, **FAST)
    assert float(ds.grad_replay_error.max()) < 1e-6
    assert float(ds.loss_replay_error.max()) < 1e-6
    # ...as they are with the autocast written into the objective too (nested, the same region)...
    ds_in = trajscope.analyze(tmp_path / "run", make_mlp_bf16, write=False, **FAST)
    assert float(ds_in.grad_replay_error.max()) < 1e-6
    # ...and replayed in float32 they are not: the metric shows the precision gap.
    ds32 = trajscope.analyze(tmp_path / "run", make_mlp, write=False, dtype="float32", **FAST)
    assert float(ds32.grad_replay_error.min()) > 1e-3


def test_fp16_grad_scaler_skips_and_unscaled_gradients(tmp_path: Path) -> None:
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # A scale that overflows fp16 gradients every few steps, so skips interleave with updates.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**18, growth_interval=2)
    x, y = dataset()
    skipped = []
    stepped_params = []
    with Recorder(tmp_path / "run", model, opt) as rec:
        for idx in batches(12):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x[idx]), y[idx])
            scaler.scale(loss).backward()
            rec.batch((x[idx], y[idx]), loss=loss)
            before = model[0].weight.detach().clone()
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped.append(scaler.get_scale() < scale)
            if not skipped[-1]:
                stepped_params.append(before)
    assert 2 <= sum(skipped) <= 8  # the scenario has both
    n_steps = len(skipped) - sum(skipped)
    lines = [json.loads(s) for s in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert [ln["skipped"] for ln in lines] == skipped
    # a skipped attempt does not consume a step index: steps count real updates only
    assert [ln["step"] for ln in lines if not ln["skipped"]] == list(range(n_steps))
    run = open_run(tmp_path / "run")
    assert run.steps == list(range(n_steps + 1)) and run.pairs == list(range(n_steps))
    for t, p in enumerate(stepped_params):
        assert torch.equal(run.snapshot(t).params["0.weight"], p)
    ds = trajscope.analyze(tmp_path / "run", make_mlp, **FAST)
    assert float(ds.update_norm.min()) > 0  # no zero-length pair from a skipped step
    # unscaled: a scaled gradient would be ~2^18 times too large (error ~2^18)
    assert float(ds.grad_replay_error.max()) < 0.02
    assert float(ds.loss_replay_error.max()) < 0.01


def test_lr_scheduler_rate_is_recorded_per_step(tmp_path: Path) -> None:
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.2)  # no momentum: Δ_t = −lr_t · g_t exactly
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=8, cycle_momentum=False,
                                                div_factor=5, final_div_factor=10)
    x, y = dataset()
    lrs = []
    with Recorder(tmp_path / "run", model, opt) as rec:
        for idx in batches(8):
            opt.zero_grad()
            loss = xent(model, (x[idx], y[idx]))
            loss.backward()
            rec.batch((x[idx], y[idx]), loss=loss)
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    assert len(set(lrs)) == 8
    ds = trajscope.analyze(tmp_path / "run", make_mlp, **FAST)
    np.testing.assert_allclose(ds.lr.values, lrs, rtol=0, atol=0)
    # (float32 cancellation in Δ = x_{t+1} − x_t limits the agreement to ~1e-5)
    np.testing.assert_allclose(ds.update_norm.values / ds.grad_norm.values, lrs, rtol=1e-4)
    lines = [json.loads(s) for s in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert [ln["lr"] for ln in lines] == [[v] for v in lrs]


def test_clipping_records_the_post_clip_gradient(tmp_path: Path) -> None:
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    max_norm = 0.05
    totals = []
    with Recorder(tmp_path / "run", model, opt) as rec:
        for idx in batches(5):
            opt.zero_grad()
            loss = xent(model, (x[idx], y[idx]))
            loss.backward()
            totals.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
            rec.batch((x[idx], y[idx]), loss=loss)
            opt.step()
    assert min(totals) > 2 * max_norm  # every step is clipped
    ds = trajscope.analyze(tmp_path / "run", make_mlp, **FAST)
    # g_t is the clipped gradient: its norm is max_norm...
    np.testing.assert_allclose(ds.grad_norm.values, max_norm, rtol=1e-5)
    # ...while the replay G0 = ∇f(x_t; z_t) is unclipped: g_t = c·G0 with c = max_norm /
    # (‖G0‖ + 1e-6) (torch's clip coefficient), recorded as clip_factor; the replay compares c·G0.
    expected = [max_norm / (tot + 1e-6) for tot in totals]
    np.testing.assert_allclose(ds.clip_factor.values, expected, rtol=1e-4)
    assert float(ds.grad_replay_error.max()) <= 1e-4
    assert float(ds.loss_replay_error.max()) < 1e-6
