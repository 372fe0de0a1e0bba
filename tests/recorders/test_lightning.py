"""The PyTorch Lightning adapter (trajscope.recorders.lightning), run with the real framework on CPU and the
run analyzed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trajscope
from support.recorder_objectives import (
    dataset,
    mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
)
from trajscope.store.run import open_run

FAST = {"progress": False, "points": 3, "margin": 0.0}

pl = pytest.importorskip("lightning.pytorch")


class LitMLP(pl.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = mlp()
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lit_step_loss(model: LitMLP, batch: Any) -> torch.Tensor:
    return model.training_step(batch, 0)


def make_lit_objective() -> trajscope.Objective:
    return trajscope.Objective(model=LitMLP(), loss=lit_step_loss)


def test_lightning_callback_with_accumulation_and_clipping(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from trajscope.recorders.lightning import TrajscopeCallback

    x, y = dataset()
    # 7 micro-batches per epoch with accumulation 2: the epoch's last step has 1 micro-batch
    loader = DataLoader(TensorDataset(x[:112], y[:112]), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    callback = TrajscopeCallback(tmp_path / "run", objective=make_lit_objective, every=1)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accumulate_grad_batches=2,
                         gradient_clip_val=0.05, default_root_dir=tmp_path)
    trainer.callbacks.append(callback)
    torch.manual_seed(0)
    trainer.fit(LitMLP(), loader)
    run = open_run(tmp_path / "run")
    assert run.status == "complete" and run.manifest["accumulation"]["micro_batches"] == 2
    assert len(run.steps) == 9 and run.final_step == 8  # 4 steps per epoch, 2 epochs
    assert run.snapshot(0).micro_weights == [0.5, 0.5]
    assert run.snapshot(3).micro_weights == [0.5]  # the short last step, still divided by 2
    lines = [json.loads(s) for s in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert [ln["lr"][0] for ln in lines] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125]

    ds = trajscope.analyze(tmp_path / "run", make_lit_objective, **FAST)
    assert float(ds.loss_replay_error.max()) <= 1e-5
    # g_t is Lightning's post-clip gradient; the recorder measured the clip, the replay applies it
    np.testing.assert_allclose(ds.grad_norm.values, 0.05, rtol=1e-5)
    assert np.all(ds.clip_factor.values < 1)
    assert float(ds.grad_replay_error.max()) <= 1e-4


def test_lightning_callback_hands_the_fp16_grad_scaler_to_the_recorder(tmp_path: Path) -> None:
    """fp16 with a GradScaler and clipping: Lightning clips unscaled gradients, the gradients the
    recorder's pre-clip hooks measured carry the scale, and the precision plugin's scaler (handed to
    the Recorder) divides it out: the recorded clip factor is ‖g_t‖ / ‖∇f(x_t; z_t)‖."""
    from torch.utils.data import DataLoader, TensorDataset

    from trajscope.recorders.lightning import TrajscopeCallback

    x, y = dataset()
    loader = DataLoader(TensorDataset(x[:48], y[:48]), batch_size=16)
    # precision="16-mixed" becomes bf16 on the CPU; the plugin itself runs fp16 with a real scaler
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    precision = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=scaler)
    callback = TrajscopeCallback(tmp_path / "run", objective=make_lit_objective, every=1)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, plugins=[precision],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=0.05, default_root_dir=tmp_path, callbacks=[callback])
    torch.manual_seed(0)
    trainer.fit(LitMLP(), loader)
    assert callback.recorder is not None and callback.recorder.grad_scaler is scaler
    run = open_run(tmp_path / "run")
    assert run.steps == [0, 1, 2, 3]
    for t in range(3):
        snap = run.snapshot(t)
        model = LitMLP()
        model.load_state_dict(snap.params)
        bx, by = snap.batch
        F.cross_entropy(model.net(bx), by).backward()  # float32: fp16's rounding is within the tolerance
        preclip = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        consumed = torch.linalg.vector_norm(torch.stack([g.norm() for g in snap.grads.values()]))
        assert float(consumed) == pytest.approx(0.05, rel=1e-3)  # Lightning's clip_grad_norm_
        assert snap.clip_factor == pytest.approx(float(consumed / preclip), rel=2e-2)
