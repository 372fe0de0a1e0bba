"""Objectives and tiny training loops shared by the recorder tests (importable by name).

The analyzer imports an objective as ``"module:function"``; pytest puts ``tests/`` on ``sys.path``,
so ``support.recorder_objectives:make_mlp`` resolves in-process and in subprocesses started with
``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trajscope
from support.recording import train_steps
from trajscope.recorders import Recorder

N_IN, N_HID, N_OUT = 8, 16, 3


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add contention on a shared machine, so the recorder tests
    run torch single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(N_IN, N_HID), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(N_HID, N_OUT))
    return nn.Sequential(*layers)


def xent(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_mlp() -> trajscope.Objective:
    return trajscope.Objective(model=mlp(), loss=xent)


def make_mlp_dropout() -> trajscope.Objective:
    return trajscope.Objective(model=mlp(dropout=0.3), loss=xent)


def xent_bf16(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss under the same CPU bf16 autocast that training used (so the replay matches)."""
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return F.cross_entropy(model(x), y)


def make_mlp_bf16() -> trajscope.Objective:
    return trajscope.Objective(model=mlp(), loss=xent_bf16)


DATA_SEED = 1234
N_DATA = 512


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(DATA_SEED)
    return torch.randn(N_DATA, N_IN, generator=g), torch.randint(0, N_OUT, (N_DATA,), generator=g)


def batch_from_indices(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuilds a minibatch from sample indices (the ``batch_fn`` of index-recorded runs)."""
    x, y = dataset()
    return x[indices], y[indices]


def batches(steps: int, size: int = 32, seed: int = 7) -> list[torch.Tensor]:
    """Deterministic index minibatches."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, N_DATA, (size,), generator=g) for _ in range(steps)]


def train_sgd(run_dir: Path | None, *, steps: int = 6, lr: float = 0.1, momentum: float = 0.9,
              recorder_kwargs: dict[str, Any] | None = None,
              objective: Callable[[], trajscope.Objective] = make_mlp) -> nn.Module:
    """Train the MLP with SGD for ``steps`` steps, recorded into ``run_dir`` (None: no recorder).

    The recorder is started by hand and closed in a ``finally`` (``close()``, never
    ``close(crashed=True)``): a training loop that does not use the ``with`` block."""
    obj = objective()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    x, y = dataset()
    rec = Recorder(run_dir, model, opt, objective=objective, **(recorder_kwargs or {})) if run_dir else None
    if rec is not None:
        rec.start()
    try:
        train_steps(rec, model, opt, obj.loss, ((x[idx], y[idx]) for idx in batches(steps)))
    finally:
        if rec is not None:
            rec.close()
    return model


# --- Hugging Face Trainer ------------------------------------------------------------------------------


class TinyHF(nn.Module):
    """A plain module the HF Trainer can train: forward(**inputs) -> {"loss", "logits"}."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def hf_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The loss an HF model returns for its keyword inputs (what the Trainer minimises)."""
    return model(**batch)["loss"]


def make_hf_objective() -> trajscope.Objective:
    return trajscope.Objective(model=TinyHF(), loss=hf_loss)


class Rows(torch.utils.data.Dataset):
    """A list of keyword-input dicts as a map-style dataset for the Trainer."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]
