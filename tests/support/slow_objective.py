"""A deliberately slow objective, so a test can interrupt an analysis mid-way
(tests/analysis/test_persist.py, tests/system/test_lifecycle.py)."""

from __future__ import annotations

import time

from support.problems import MLP, ce_loss
from trajscope import Objective

DELAY = 0.05  # seconds per loss evaluation; a probe evaluates the loss 3 times (line, G0, G1)


def slow_ce_loss(model, batch):
    time.sleep(DELAY)
    return ce_loss(model, batch)


def make_slow_mlp() -> Objective:
    return Objective(model=MLP(), loss=slow_ce_loss)
