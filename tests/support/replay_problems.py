"""Models whose replay is hard: BatchNorm in train mode and several dropouts, on real data (the
8×8 digits bundled with scikit-learn). Factories are importable by name
(``support.replay_problems:make_cnn``) like those of :mod:`support.problems`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.problems import ce_loss, digits
from support.recording import minibatches, record
from trajscope import Objective


class CNN(nn.Module):
    """conv-BN-ReLU ×2, max-pool, Dropout2d, linear, Dropout, linear: three random ops per forward
    (two dropout layers, one of them channel-wise) and two train-mode BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.d1 = nn.Dropout2d(0.1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.d2 = nn.Dropout(0.3)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x.view(-1, 1, 8, 8))))
        h = F.max_pool2d(F.relu(self.b2(self.c2(h))), 2)
        h = F.dropout(self.d1(h).flatten(1), 0.1, self.training)  # a functional dropout too
        return self.fc2(self.d2(F.relu(self.fc1(h))))


def make_cnn() -> Objective:
    return Objective(model=CNN(), loss=ce_loss)


def train_cnn(run_dir: Path, *, steps: int = 6, batch_size: int = 32, lr: float = 0.05,
              eval_mode: bool = False, seed: int = 0, **rec_kw: Any) -> CNN:
    """SGD + momentum on the digits; ``eval_mode`` trains with BatchNorm on running statistics
    and dropout off (as when fine-tuning with a frozen backbone)."""
    torch.manual_seed(seed)
    obj = make_cnn()
    model = obj.model
    model.train(not eval_mode)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    X, Y = digits()
    batches = minibatches(X, Y, steps, batch_size, torch.Generator().manual_seed(seed + 1))
    record(run_dir, model, opt, obj.loss, batches, objective="support.replay_problems:make_cnn", **rec_kw)
    return model
