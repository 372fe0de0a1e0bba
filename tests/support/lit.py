"""A Lightning module a separate process can import by name (``support.lit:make_lit_classifier``):
the objective of a follower started by ``TrajscopeCallback(follow=...)``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from support.problems import MLP
from trajscope import Objective


class LitClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def step_loss(model: LitClassifier, batch: Any) -> torch.Tensor:
    return model.training_step(batch, 0)


def make_lit_classifier() -> Objective:
    return Objective(model=LitClassifier(), loss=step_loss)
