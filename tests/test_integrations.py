"""Framework adapters, each run with the real framework on CPU and the run analyzed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recorder_objectives import (  # noqa: F401
    N_IN,
    N_OUT,
    Rows,
    TinyHF,
    dataset,
    hf_loss,
    make_hf_objective,
    mlp,
    one_torch_thread,
)

import trajscope
from trajscope.store.run import open_run

FAST = {"progress": False, "points": 3, "margin": 0.0}

pl = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")


# --- Lightning ---------------------------------------------------------------------------------------


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


# --- Hugging Face Trainer ----------------------------------------------------------------------------


def make_gpt2_objective() -> trajscope.Objective:
    return trajscope.Objective(model=_gpt2(), loss=hf_loss)


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _args(tmp_path: Path, **kw: Any) -> Any:
    base = dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, learning_rate=0.05,
                lr_scheduler_type="linear", use_cpu=True, report_to=[], save_strategy="no",
                logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
                max_grad_norm=0.0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_hf_trainer_callback_mean_accumulation(tmp_path: Path) -> None:
    from trajscope.recorders.hf import TrajscopeCallback

    x, y = dataset()
    rows = [{"x": x[i], "labels": y[i]} for i in range(40)]
    trainer = transformers.Trainer(
        model=TinyHF(), args=_args(tmp_path, max_steps=5, gradient_accumulation_steps=2),
        train_dataset=Rows(rows),
        callbacks=[TrajscopeCallback(tmp_path / "run", objective=make_hf_objective)],
    )
    trainer.train()
    run = open_run(tmp_path / "run")
    assert run.status == "complete" and run.steps == list(range(6))
    snap = run.snapshot(1)
    assert snap.micro_weights == [0.5, 0.5] and set(snap.batch[0]) == {"x", "labels"}
    lrs = [run.snapshot(t).lr[0] for t in range(5)]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(0.05)  # linear decay
    ds = trajscope.analyze(tmp_path / "run", make_hf_objective, **FAST)
    assert float(ds.loss_replay_error.max()) <= 1e-5
    assert float(ds.grad_replay_error.max()) <= 1e-5


def test_hf_trainer_callback_token_normalised_accumulation(tmp_path: Path) -> None:
    """A real transformers model: the Trainer passes num_items_in_batch and does not divide by
    the number of micro-batches; the recorded weights (1 each) replay exactly that loss."""
    from trajscope.recorders.hf import TrajscopeCallback

    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(32):
        ids = torch.randint(0, 50, (12,), generator=g)
        labels = ids.clone()
        labels[: 2 + i % 5] = -100  # different token counts per row: the normalisation matters
        rows.append({"input_ids": ids, "labels": labels})
    trainer = transformers.Trainer(
        model=_gpt2(), args=_args(tmp_path, max_steps=3, gradient_accumulation_steps=2),
        train_dataset=Rows(rows),
        callbacks=[TrajscopeCallback(tmp_path / "run", objective=make_gpt2_objective)],
    )
    trainer.train()
    run = open_run(tmp_path / "run")
    snap = run.snapshot(0)
    assert snap.micro_weights == [1.0, 1.0]
    assert "num_items_in_batch" in snap.batch[0]
    ds = trajscope.analyze(tmp_path / "run", make_gpt2_objective, **FAST)
    assert float(ds.loss_replay_error.max()) <= 1e-5
    assert float(ds.grad_replay_error.max()) <= 1e-4
