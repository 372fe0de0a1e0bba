"""Training written the way GPU training is written replays "as trained" with no flags.

Six small programs (:mod:`support.gpu_style`: channels_last + BatchNorm + EMA under bf16 autocast;
a compiled nanoGPT-style GPT with dropout, accumulation and clipping; the Hugging Face Trainer,
Lightning and accelerate under bf16; fp16 with a GradScaler), each recorded at every step and
analyzed with the defaults (``trajscope.analyze(run_dir)``, as ``trajscope analyze RUN``). Their
objectives are the plain loss: the analyzer must reproduce training's autocast, memory formats and
randomness itself. Every pair must replay to ``loss_replay_error <= 1e-6`` and
``grad_replay_error <= 1e-4``, and the replay gate must not warn.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import trajscope
from support import gpu_style
from support.recorder_objectives import one_torch_thread  # noqa: F401 - autouse fixture
from trajscope.store.run import open_run

LOSS_BOUND = 1e-6
GRAD_BOUND = 1e-4


def analyze_as_trained(run_dir: Path, **kwargs: Any) -> tuple[Any, list[str]]:
    """``trajscope.analyze(run_dir, **kwargs)`` and the replay-failure warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = trajscope.analyze(run_dir, **kwargs)
    return ds, [str(w.message) for w in caught if "replay failed" in str(w.message)]


def errors(ds: Any) -> str:
    """Each pair's replay errors, for an assertion message."""
    return "; ".join(f"step {int(t)}: loss {le:.3g}, grad {ge:.3g}" for t, le, ge in
                     zip(ds["step"].values, ds["loss_replay_error"].values, ds["grad_replay_error"].values))


def assert_replays_as_trained(ds: Any, failed: list[str], pairs: int) -> None:
    assert int(ds.sizes["step"]) == pairs, errors(ds)
    loss = np.asarray(ds["loss_replay_error"].values, dtype=np.float64)
    grad = np.asarray(ds["grad_replay_error"].values, dtype=np.float64)
    # NaN fails too: every pair of these runs has a recorded loss and gradient to compare with
    assert np.all(loss <= LOSS_BOUND) and np.all(grad <= GRAD_BOUND), errors(ds)
    assert not failed, failed[0]


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """accelerate's process-wide singletons (the HF Trainer creates them too), reset around a test."""
    pytest.importorskip("accelerate")
    gpu_style.reset_accelerate()
    try:
        yield
    finally:
        gpu_style.reset_accelerate()


def test_channels_last_batchnorm_cnn_with_ema_under_bf16(tmp_path: Path) -> None:
    info = gpu_style.train_cnn(tmp_path / "run")
    assert info["channels_last"] and info["ema_updates"] == gpu_style.STEPS
    assert open_run(tmp_path / "run").pairs == list(range(gpu_style.STEPS))
    ds, failed = analyze_as_trained(tmp_path / "run")
    assert_replays_as_trained(ds, failed, gpu_style.STEPS)


@pytest.mark.slow
def test_compiled_nanogpt_with_dropout_accumulation_and_clipping_under_bf16(tmp_path: Path) -> None:
    info = gpu_style.train_gpt(tmp_path / "run")
    assert min(info["preclip_norms"]) > gpu_style.GPT_CLIP  # every step is clipped
    run = open_run(tmp_path / "run")
    assert len(run.snapshot(0).batch) == gpu_style.GPT_MICRO
    assert run.manifest["compiled"] is True
    ds, failed = analyze_as_trained(tmp_path / "run")
    assert np.all(ds["clip_factor"].values < 1)
    # inductor's fused kernels keep bf16 intermediates in float32: an eager replay's gradient is off
    # by ~2e-3, so the gradient passes are compiled as training was
    assert ds.attrs["eval_precision"].endswith("gradient passes compiled as training was")
    assert_replays_as_trained(ds, failed, gpu_style.STEPS)


def test_nanogpt_without_dropout_replays_its_fused_attention_kernel(tmp_path: Path) -> None:
    """At dropout 0 attention runs a fused SDPA kernel, which has no forward-mode rule: the line
    holds SDPA to its math kernel, and the gradient passes must still run training's kernel (the
    math kernel's bf16 rounding differs from it by ~3e-3)."""
    gpu_style.train_gpt(tmp_path / "run", steps=3, backend="eager", dropout=0.0)
    ds, failed = analyze_as_trained(tmp_path / "run", write=False)
    assert ds.attrs["derivatives"] == "forward (sdpa math kernel)"
    assert_replays_as_trained(ds, failed, 3)


@pytest.mark.slow
def test_hf_trainer_tiny_gpt2_bf16_accumulation_and_clipping(tmp_path: Path, fresh_accelerate: None) -> None:
    pytest.importorskip("transformers")
    gpu_style.train_hf_gpt2(tmp_path / "run", tmp_path / "hf", steps=4)
    run = open_run(tmp_path / "run")
    assert run.status == "complete" and len(run.snapshot(0).batch) == 2
    ds, failed = analyze_as_trained(tmp_path / "run")
    assert_replays_as_trained(ds, failed, 4)


@pytest.mark.slow
def test_lightning_bf16_mixed_accumulation_and_clipping(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    gpu_style.train_lightning(tmp_path / "run", tmp_path, steps=4)
    run = open_run(tmp_path / "run")
    assert run.status == "complete" and run.manifest["accumulation"]["micro_batches"] == 2
    ds, failed = analyze_as_trained(tmp_path / "run")
    assert np.all(ds["clip_factor"].values < 1)  # gradient_clip_val clips every step
    assert_replays_as_trained(ds, failed, 4)


def test_accelerate_bf16_with_the_prepared_model_and_optimizer(tmp_path: Path, fresh_accelerate: None) -> None:
    gpu_style.train_accelerate(tmp_path / "run")
    ds, failed = analyze_as_trained(tmp_path / "run")
    assert_replays_as_trained(ds, failed, gpu_style.STEPS)


def test_fp16_autocast_with_grad_scaler_unscale_and_clip(tmp_path: Path) -> None:
    info = gpu_style.train_fp16_scaler(tmp_path / "run")
    assert not any(info["skipped"]) and min(info["preclip_norms"]) > gpu_style.FP16_CLIP
    ds, failed = analyze_as_trained(tmp_path / "run")
    assert np.all(ds["clip_factor"].values < 1)
    assert_replays_as_trained(ds, failed, gpu_style.STEPS)


def test_float32_evaluation_of_a_bf16_run_uses_and_records_wider_bounds(tmp_path: Path) -> None:
    """Evaluated in float32 throughout (not as trained), the bf16 CNN replays only to bf16's rounding:
    the gate widens its bounds to that, says so in the Dataset's attrs, and does not warn."""
    gpu_style.train_cnn(tmp_path / "run")
    ds, failed = analyze_as_trained(tmp_path / "run", dtype="float32")
    assert not failed, failed[0]
    assert "loss_replay_bound" in ds.attrs and "grad_replay_bound" in ds.attrs, sorted(ds.attrs)
    loss_bound, grad_bound = float(ds.attrs["loss_replay_bound"]), float(ds.attrs["grad_replay_bound"])
    assert np.all(np.asarray(ds["loss_replay_error"].values) <= loss_bound), (loss_bound, errors(ds))
    assert np.all(np.asarray(ds["grad_replay_error"].values) <= grad_bound), (grad_bound, errors(ds))
