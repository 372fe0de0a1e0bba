"""Faithful replay (trajscope.probe.stages, which run the model): the analyzer re-evaluates the loss as
training computed it.

BatchNorm in train mode (batch statistics; running statistics never written), dropout from the
RNG state captured at the step's forward pass (one mask along the whole line, batched or not),
gradients recorded after AMP unscaling and clipping, and what the replay-error metrics show when
the replay cannot match.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

import trajscope
from support.float64_reference import Reference, assert_matches_reference
from support.problems import classification_data, make_mlp
from support.recording import record
from support.replay_problems import make_cnn, train_cnn
from trajscope.errors import ProbeWarning
from trajscope.probe import ProbeSettings, probe_pair
from trajscope.probe.stages import batchnorm_replay
from trajscope.recorders import Recorder

STEPS = 6


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("cnn") / "run"
    train_cnn(run_dir, steps=STEPS)
    return run_dir


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bn_dropout_cnn_replays_at_every_step(cnn_run, dtype: str) -> None:
    ds = trajscope.analyze(cnn_run, make_cnn, device="cpu", dtype=dtype, points=5, write=False, progress=False)
    assert list(ds.step.values) == list(range(STEPS))
    loss_err, grad_err = ds.loss_replay_error.values, ds.grad_replay_error.values
    print(f"\nBN+dropout CNN, {dtype} replay: max loss_replay_error {loss_err.max():.2e}, "
          f"max grad_replay_error {grad_err.max():.2e}")
    assert np.all(loss_err <= 1e-5), loss_err
    assert np.all(grad_err <= 1e-4), grad_err
    assert np.all(ds.grad_replay_cos.values >= 1 - 1e-8)


def test_bn_dropout_cnn_matches_float64_reference(cnn_run) -> None:
    # The reference replays the plain way (a float64 module in train mode, torch.set_rng_state
    # before each evaluation, no functional_call, no vmap), so this checks the batched line, G0,
    # G1 and f(x*) of the probe on BatchNorm + dropout, metric by metric.
    ds = trajscope.analyze(cnn_run, make_cnn, device="cpu", dtype="float64", points=5, write=False,
                           progress=False)
    ref = Reference(cnn_run, make_cnn).all_pairs(list(ds.step.values), ds.alpha.values)
    assert_matches_reference(ds, ref)


def test_batched_line_equals_point_loop(cnn_run) -> None:
    kw = dict(dtype="float64", points=5, write=False, progress=False, metrics=["loss_line", "dloss_line"])
    a = trajscope.analyze(cnn_run, make_cnn, device="cpu", batched=True, **kw)
    b = trajscope.analyze(cnn_run, make_cnn, device="cpu", batched=False, **kw)
    np.testing.assert_allclose(a.loss_line.values, b.loss_line.values, rtol=1e-12)
    np.testing.assert_allclose(a.dloss_line.values, b.dloss_line.values, rtol=1e-9,
                               atol=1e-12 * np.abs(b.dloss_line.values).max())


def test_vmap_batches_train_mode_batchnorm_with_the_recorded_masks(cnn_run) -> None:
    # What makes the batched line possible: with the running-statistics update switched off, vmap
    # accepts train-mode BatchNorm, and randomness="same" draws the unbatched call's masks.
    run = trajscope.open_run(cnn_run)
    snap = run.snapshot(2)
    model = make_cnn().model.train()
    state = {**snap.params, **{k: v.clone() for k, v in snap.buffers.items()}}
    x, y = snap.batch

    def loss(scale: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {k: v * scale if k in snap.params else v for k, v in state.items()}, (x,))
        return F.cross_entropy(out, y)

    scales = torch.tensor([1.0, 1.01, 0.99])
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(snap.rng["cpu"])
        with pytest.raises(RuntimeError, match="running_mean"):
            vmap(loss, randomness="same")(scales)  # unpatched: the in-place update is refused
    with torch.random.fork_rng(devices=[]), batchnorm_replay(model):
        torch.set_rng_state(snap.rng["cpu"])
        batched = vmap(loss, randomness="same")(scales)
    assert all(m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats"))
    for i, s in enumerate(scales):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(snap.rng["cpu"])
            assert float(batched[i]) == pytest.approx(float(loss(s)), rel=1e-6)
    assert float(batched[0]) == pytest.approx(snap.loss, rel=1e-6)


def test_replay_never_mutates_buffers(cnn_run) -> None:
    run = trajscope.open_run(cnn_run)
    snap, nxt = run.snapshot(1), run.snapshot(2)
    before = {k: v.clone() for k, v in snap.buffers.items()}
    obj = make_cnn()
    model_buffers = {k: v.clone() for k, v in obj.model.named_buffers()}
    probe_pair(obj, snap, nxt, ProbeSettings(sharpness=True, sharpness_max_iter=5),
               ref=run.snapshot(STEPS))
    for k, v in before.items():
        assert torch.equal(snap.buffers[k], v), k
    for k, v in obj.model.named_buffers():
        assert torch.equal(v, model_buffers[k]), k  # the skeleton's own buffers too
    assert all(m.track_running_stats for m in obj.model.modules() if hasattr(m, "track_running_stats"))
    # and the analysis writes nothing under steps/
    files = {p: p.read_bytes() for p in (cnn_run / "steps").iterdir()}
    trajscope.analyze(cnn_run, make_cnn, device="cpu", points=3, steps="0:2", write=False, progress=False)
    assert files == {p: p.read_bytes() for p in (cnn_run / "steps").iterdir()}


def test_without_the_recorded_rng_dropout_differs(cnn_run) -> None:
    # The control: the same replay with the RNG state dropped draws other masks, and the
    # replay-error metrics say so. This is what grad_replay_error flags in a run recorded
    # without the forward hook's RNG capture.
    run = trajscope.open_run(cnn_run)
    snap, nxt = run.snapshot(0), run.snapshot(1)
    # Without a state to replay, vmap's randomness="error" refuses the dropout: point by point.
    with pytest.warns(ProbeWarning, match="randomness operation"):
        stats = probe_pair(make_cnn(), dataclasses.replace(snap, rng={}), nxt, ProbeSettings(dtype="float64"))
    assert stats.extras["line_batched"] == 0.0
    from trajscope.metrics.builtins import grad_replay_error, loss_replay_error
    from trajscope.metrics.pair import PairView

    assert grad_replay_error(PairView(stats)) > 1e-2
    assert loss_replay_error(PairView(stats)) > 1e-5


def test_eval_mode_batchnorm_uses_recorded_running_stats(tmp_path) -> None:
    run_dir = tmp_path / "eval"
    train_cnn(run_dir, steps=3, eval_mode=True)
    ds = trajscope.analyze(run_dir, make_cnn, device="cpu", points=3, write=False, progress=False)
    assert np.all(ds.loss_replay_error.values <= 1e-5)
    assert np.all(ds.grad_replay_error.values <= 1e-4)


def _train_mlp(run_dir, *, clip: float | None = None, amp: bool = False, steps: int = 4) -> None:
    torch.manual_seed(0)
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp else None
    X, Y = classification_data()
    with Recorder(run_dir, model, opt, objective="support.problems:make_mlp") as rec:
        for t in range(steps):
            batch = (X[32 * t : 32 * t + 32], Y[32 * t : 32 * t + 32])
            opt.zero_grad()
            loss = obj.loss(model, batch)
            rec.batch(batch, loss=loss)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)  # unscales before optimizer.step(): the recorder sees g_t
                scaler.update()
            else:
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()


def test_clipping_shows_as_a_rescaling(tmp_path) -> None:
    # Training consumed the clipped gradient c·G0 with c = clip/‖G0‖; the recorder measured c
    # (clip_factor) and the replay compares c·G0 with g_t. The direction agrees: grad_replay_cos = 1.
    run_dir = tmp_path / "clip"
    clip = 0.05
    _train_mlp(run_dir, clip=clip)
    ds = trajscope.analyze(run_dir, make_mlp, dtype="float64", points=3, write=False, progress=False)
    g0 = ds.replay_grad_norm.values
    assert np.all(g0 > clip)  # clipping was active at every step
    np.testing.assert_allclose(ds.clip_factor.values, clip / g0, rtol=1e-5)
    assert np.all(ds.grad_replay_error.values <= 1e-5)
    np.testing.assert_allclose(ds.grad_norm.values, clip, rtol=1e-5)
    assert np.all(ds.grad_replay_cos.values >= 1 - 1e-9)
    assert np.all(ds.loss_replay_error.values <= 1e-6)


def test_grad_scaler_gradients_are_recorded_unscaled(tmp_path) -> None:
    run_dir = tmp_path / "amp"
    _train_mlp(run_dir, amp=True)
    ds = trajscope.analyze(run_dir, make_mlp, points=3, write=False, progress=False)
    # a gradient recorded before unscaling would be off by the scale factor 2¹⁰
    assert np.all(ds.grad_replay_error.values <= 1e-5)


def make_bf16_mlp() -> trajscope.Objective:
    from support.problems import MLP, ce_loss

    return trajscope.Objective(model=MLP().to(torch.bfloat16), loss=ce_loss)


def test_evaluation_dtype_is_independent_of_the_training_dtype(tmp_path) -> None:
    # Trained in bfloat16, replayed in float32 and float64: the replay evaluates the function that
    # bf16 training approximated, so the replay errors are bf16 rounding (2⁻⁸ ≈ 4e-3 relative),
    # the direction agrees, and the two evaluation dtypes agree with each other.
    run_dir = tmp_path / "bf16"
    torch.manual_seed(0)
    obj = make_bf16_mlp()
    opt = torch.optim.SGD(obj.model.parameters(), lr=0.1)
    X, Y = classification_data()
    batches = [(X[32 * t : 32 * t + 32].to(torch.bfloat16), Y[32 * t : 32 * t + 32]) for t in range(3)]
    record(run_dir, obj.model, opt, obj.loss, batches)
    out = {dt: trajscope.analyze(run_dir, make_bf16_mlp, dtype=dt, points=3, write=False,
                                 progress=False) for dt in ("float32", "float64")}
    for ds in out.values():
        assert np.all(ds.loss_replay_error.values < 2e-2)
        assert np.all(ds.grad_replay_error.values < 5e-2)
        assert np.all(ds.grad_replay_cos.values > 0.999)
    np.testing.assert_allclose(out["float32"].loss_line.values, out["float64"].loss_line.values,
                               rtol=1e-5)
