"""Gradient clipping is part of training: the recorder measures the pre-clip gradient norm on
recorded steps, the snapshot carries the clip factor c = ‖g_t‖ / ‖g_preclip‖, and the replay
compares c·∇f(x_t; z_t) with the stored (clipped) g_t. A rescale that no recorded clip explains
still shows as a replay error."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trajscope
from support.recorder_objectives import (
    Rows,
    TinyHF,
    batches,
    dataset,
    make_hf_objective,
    make_mlp,
    mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    xent,
)
from trajscope import runformat as fmt
from trajscope.analysis.health import FLAGS
from trajscope.recorders import Recorder
from trajscope.report.summary import format_headline, format_summary, headline, summarize
from trajscope.store.run import open_run
from trajscope.store.snapshot import Snapshot

STEPS = 4
CLIPPED, NONUNIFORM = FLAGS["clipped"][0], FLAGS["clipped_nonuniform"][0]
FAST: dict[str, Any] = {"progress": False, "points": 3, "margin": 0.0}


def xent_times_two(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """A wrong loss scale in the objective: a pure rescale no recorded clip explains."""
    return 2.0 * xent(model, batch)


def make_mlp_times_two() -> trajscope.Objective:
    return trajscope.Objective(model=mlp(), loss=xent_times_two)


def train(run_dir: Path, clip: str | None, *, scaler: Any = None, pass_scaler: bool = True,
          every: int = 1, window: int = 2, steps: int = STEPS) -> torch.nn.Module:
    """SGD on the MLP with 2 micro-batches per step (``(loss / 2).backward()``), then ``clip``:
    ``"norm"`` (``clip_grad_norm_``, small enough to clip every step), ``"value"``
    (``clip_grad_value_``) or None; optionally under an AMP ``GradScaler`` (unscale, clip, step)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    kw = {"grad_scaler": scaler} if pass_scaler and scaler is not None else {}
    with Recorder(run_dir, model, opt, objective=make_mlp, accumulation=2, every=every, window=window,
                  **kw) as rec:
        for idx in batches(steps, size=16):
            opt.zero_grad()
            for half in (idx[:8], idx[8:]):
                loss = F.cross_entropy(model(x[half]), y[half])
                scaled = loss / 2 if scaler is None else scaler.scale(loss / 2)
                scaled.backward()
                rec.batch((x[half], y[half]), loss=loss)
            if scaler is not None:
                scaler.unscale_(opt)
            if clip == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            elif clip == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=1e-3)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
    return model


def _metas(run_dir: Path) -> list[Snapshot]:
    """The run's step snapshots (the final state has no gradient)."""
    run = open_run(run_dir)
    return [run.snapshot(t) for t in run.steps if run.kind(t) == fmt.KIND_STEP]


@pytest.fixture(scope="module")
def norm_clipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("clip") / "norm"
    train(run_dir, "norm")
    return run_dir


def test_norm_clip_is_recorded_and_replayed(norm_clipped: Path) -> None:
    snaps = _metas(norm_clipped)
    assert len(snaps) == STEPS
    for s in snaps:
        assert s.clip_factor is not None and 0 < s.clip_factor < 1 and s.clip_uniform is True
    ds = trajscope.analyze(norm_clipped, make_mlp, **FAST)
    assert float(ds.loss_replay_error.max()) <= 1e-6
    assert float(ds.grad_replay_error.max()) <= 1e-4
    factors = [s.clip_factor for s in snaps if s.clip_factor is not None]
    np.testing.assert_allclose(ds.clip_factor.values, factors)
    assert np.all(ds.clip_factor.values < 1)
    assert np.all(ds.pair_flags.values & CLIPPED) and not np.any(ds.pair_flags.values & NONUNIFORM)
    h = headline(ds)
    assert h["pairs_clipped"] == STEPS
    assert f"clipped on {STEPS} of {STEPS} pairs" in format_headline(h)
    assert f"clipped on {STEPS} of {STEPS} pairs" in format_summary(summarize(ds))


def test_a_rescale_no_clip_explains_is_a_replay_error(norm_clipped: Path, tmp_path: Path) -> None:
    shutil.copytree(norm_clipped, tmp_path / "run", ignore=shutil.ignore_patterns(fmt.ANALYSIS_DIR))
    ds = trajscope.analyze(tmp_path / "run", make_mlp_times_two, **FAST)
    # c·(2G0) against g_t = c·G0: ‖g_t‖ off by exactly ‖g_t‖
    np.testing.assert_allclose(ds.grad_replay_error.values, 1.0, rtol=1e-4)


def test_value_clip_is_flagged_non_uniform_and_not_explained(tmp_path: Path) -> None:
    train(tmp_path / "run", "value")
    for s in _metas(tmp_path / "run"):
        assert s.clip_factor is not None and s.clip_uniform is False
    ds = trajscope.analyze(tmp_path / "run", make_mlp, **FAST)
    assert np.all(ds.pair_flags.values & NONUNIFORM) and not np.any(ds.pair_flags.values & CLIPPED)
    assert float(ds.grad_replay_error.min()) > 1e-2  # the unclipped comparison: the clip shows
    assert float(ds.loss_replay_error.max()) <= 1e-6
    assert headline(ds)["pairs_clipped"] == STEPS


def test_unclipped_run_stores_no_clip_fields(tmp_path: Path) -> None:
    train(tmp_path / "run", None)
    run = open_run(tmp_path / "run")
    for t in run.steps:
        meta, _ = run.storage.read_raw(t)
        assert not {"clip_factor", "clip_uniform", "grad_norm_preclip"} & set(meta)
    for s in _metas(tmp_path / "run"):
        assert s.clip_factor is None and s.clip_uniform is None
    ds = trajscope.analyze(tmp_path / "run", make_mlp, **FAST)
    assert np.all(ds.clip_factor.values == 1.0)
    assert not np.any(ds.pair_flags.values & (CLIPPED | NONUNIFORM))
    assert "pairs_clipped" not in headline(ds) and "clipped on" not in format_headline(headline(ds))
    assert float(ds.grad_replay_error.max()) <= 1e-4


def _cpu_scaler() -> Any:
    try:
        return torch.amp.GradScaler("cpu", init_scale=2.0**10)
    except (RuntimeError, TypeError, AttributeError) as exc:  # pragma: no cover - old torch
        pytest.skip(f"no CPU GradScaler: {exc}")


def test_amp_unscale_is_not_a_clip(tmp_path: Path) -> None:
    # The hooks see S·g; the optimizer consumes g. A power-of-two rescale is the loss scale.
    train(tmp_path / "run", None, scaler=_cpu_scaler(), pass_scaler=False)
    for s in _metas(tmp_path / "run"):
        assert s.clip_factor is None


def test_amp_unscale_then_clip_records_the_clip_alone(tmp_path: Path) -> None:
    train(tmp_path / "run", "norm", scaler=_cpu_scaler())
    snaps = _metas(tmp_path / "run")
    assert all(s.clip_factor is not None and s.clip_factor < 1 and s.clip_uniform for s in snaps)
    ds = trajscope.analyze(tmp_path / "run", make_mlp, **FAST)
    assert float(ds.grad_replay_error.max()) <= 1e-4


def test_hf_trainer_default_clipping_is_recorded(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from trajscope.recorders.hf import TrajscopeCallback

    x, y = dataset()
    rows = [{"x": x[i], "labels": y[i]} for i in range(40)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, learning_rate=0.05,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, max_steps=4, gradient_accumulation_steps=2,
    )
    # The Trainer clips by default (max_grad_norm = 1.0, clip_grad_norm_ through accelerate); this
    # model's gradient norm is below 1, so a smaller bound makes every step clip.
    assert args.max_grad_norm == 1.0
    args.max_grad_norm = 0.05
    trainer = transformers.Trainer(model=TinyHF(), args=args, train_dataset=Rows(rows),
                                   callbacks=[TrajscopeCallback(tmp_path / "run", objective=make_hf_objective)])
    trainer.train()
    snaps = _metas(tmp_path / "run")
    factors = [s.clip_factor for s in snaps if s.clip_factor is not None and s.clip_uniform]
    assert len(factors) == len(snaps) == 4 and all(c < 1 for c in factors)
    ds = trajscope.analyze(tmp_path / "run", make_hf_objective, **FAST)
    assert float(ds.loss_replay_error.max()) <= 1e-5
    assert float(ds.grad_replay_error.max()) <= 1e-4
    assert headline(ds).get("pairs_clipped") == len(factors)
