"""The Hugging Face ``Trainer`` adapter (trajscope.recorders.hf), run with the real framework on CPU and the
run analyzed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import trajscope
from support.recorder_objectives import (
    Rows,
    TinyHF,
    dataset,
    hf_loss,
    make_hf_objective,
    one_torch_thread,  # noqa: F401 - autouse fixture
)
from trajscope.store.run import open_run

FAST = {"progress": False, "points": 3, "margin": 0.0}

transformers = pytest.importorskip("transformers")


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
    callback = TrajscopeCallback(tmp_path / "run", objective=make_hf_objective)
    trainer = transformers.Trainer(
        model=TinyHF(), args=_args(tmp_path, max_steps=5, gradient_accumulation_steps=2),
        train_dataset=Rows(rows), callbacks=[callback],
    )
    trainer.train()
    # hooked on the torch optimizer inside accelerate's wrapper; fp32 on the CPU: no scaler
    assert callback.recorder is not None and callback.recorder.optimizer is trainer.optimizer.optimizer
    assert callback.recorder.grad_scaler is None
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


@pytest.fixture
def accelerator() -> Iterator[Any]:
    """A CPU ``Accelerator``, accelerate's process-wide state reset before and after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_hf_callback_hands_the_wrappers_grad_scaler_to_the_recorder(tmp_path: Path, accelerator: Any) -> None:
    """With fp16 on a GPU the Trainer's optimizer is an AcceleratedOptimizer holding the
    Accelerator's GradScaler (a CPU Trainer has none): the callback hands it to the Recorder, unless
    the user passed ``grad_scaler=`` themselves."""
    from accelerate.optimizer import AcceleratedOptimizer

    from trajscope.recorders.hf import TrajscopeCallback

    model = TinyHF()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler, own = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    wrapped = AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)
    args = _args(tmp_path)
    for name, kwargs, expected in (("a", {}, scaler), ("b", {"grad_scaler": own}, own)):
        callback = TrajscopeCallback(tmp_path / name, objective=make_hf_objective, **kwargs)
        callback.on_train_begin(args, None, None, model=model, optimizer=wrapped)
        assert callback.recorder is not None
        assert callback.recorder.optimizer is opt and callback.recorder.grad_scaler is expected
        callback.on_train_end(args, None, None)


def test_hf_callback_starts_the_follower_with_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``TrajscopeCallback(..., follow={...})`` hands its options to ``Recorder.follow`` once the recorder
    is open, and keeps the process it started (the follower itself: ``tests/recorders/test_follower.py``)."""
    from trajscope.recorders import Recorder
    from trajscope.recorders.hf import TrajscopeCallback

    calls: list[tuple[bool, dict[str, Any]]] = []

    def follow(self: Recorder, **options: Any) -> str:
        calls.append((self._open, options))
        return "the follower"

    monkeypatch.setattr(Recorder, "follow", follow)
    x, y = dataset()
    callback = TrajscopeCallback(tmp_path / "run", objective=make_hf_objective, follow={"device": "cpu", "poll": 1})
    transformers.Trainer(model=TinyHF(), args=_args(tmp_path, max_steps=2),
                         train_dataset=Rows([{"x": x[i], "labels": y[i]} for i in range(16)]),
                         callbacks=[callback]).train()
    assert calls == [(True, {"device": "cpu", "poll": 1})] and callback.follower == "the follower"
