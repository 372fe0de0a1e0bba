"""Small test problems with objective factories importable by name (``support.problems:make_quadratic``).

pytest puts ``tests/`` on ``sys.path`` (``pythonpath = ["tests"]`` in pyproject.toml), so the analyzer
can import these factories in worker processes too; a child interpreter needs ``tests/`` on its
``PYTHONPATH``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from support.recording import minibatches, record, train_steps
from trajscope import Objective

# --- stochastic quadratic f(x; b) = ½xᵀAx − bᵀx, float64 --------------------------------------

DIM = 6
_rng = np.random.default_rng(1234)
_Q, _ = np.linalg.qr(_rng.standard_normal((DIM, DIM)))
EIGS = np.array([0.2, 0.5, 1.0, 2.0, 3.5, 5.0])
A = torch.tensor(_Q @ np.diag(EIGS) @ _Q.T, dtype=torch.float64)
B_MEAN = torch.tensor(_rng.standard_normal(DIM), dtype=torch.float64)


class QuadModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(DIM, dtype=torch.float64))


def quad_loss(model: QuadModel, b: torch.Tensor) -> torch.Tensor:
    x = model.x
    a = A.to(x.device)  # the analyzer may evaluate on a GPU (device="auto")
    return 0.5 * x @ (a @ x) - b @ x


def make_quadratic() -> Objective:
    return Objective(model=QuadModel(), loss=quad_loss)


def train_quadratic(run_dir: Path, steps: int = 12, lr: float = 0.15, momentum: float = 0.9,
                    **rec_kw: Any) -> list[torch.Tensor]:
    """SGD+momentum on the stochastic quadratic; returns the minibatches b_t used."""
    gen = torch.Generator().manual_seed(7)
    model = QuadModel()
    with torch.no_grad():
        model.x.copy_(torch.randn(DIM, generator=gen, dtype=torch.float64) * 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    bs: list[torch.Tensor] = []

    def draws() -> Iterator[torch.Tensor]:
        for _ in range(steps):
            bs.append(B_MEAN + 0.3 * torch.randn(DIM, generator=gen, dtype=torch.float64))
            yield bs[-1]

    record(run_dir, model, opt, quad_loss, draws(), objective="support.problems:make_quadratic", **rec_kw)
    return bs


# --- a small MLP classifier (float32), deterministic -------------------------------------------


class MLP(nn.Module):
    def __init__(self, d_in: int = 10, hidden: int = 24, d_out: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = self.drop(torch.tanh(self.fc2(h)))
        return self.out(h)


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_mlp() -> Objective:
    return Objective(model=MLP(), loss=ce_loss)


def make_mlp_dropout() -> Objective:
    return Objective(model=MLP(dropout=0.3), loss=ce_loss)


def classification_data(n: int = 256, d_in: int = 10, d_out: int = 4,
                        seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=gen)
    W = torch.randn(d_in, d_out, generator=gen)
    Y = (X @ W + 0.5 * torch.randn(n, d_out, generator=gen)).argmax(1)
    return X, Y


def train_classifier(run_dir: Path | None, factory: Callable[[], Objective], *, steps: int = 15,
                     batch_size: int = 32, opt: str = "sgd", lr: float = 0.1, seed: int = 0,
                     objective: str | None = None, crash_after: int | None = None,
                     **rec_kw: Any) -> nn.Module:
    """Train ``factory().model`` on synthetic data; record into ``run_dir`` unless it is None."""
    torch.manual_seed(seed)
    obj = factory()
    model = obj.model
    if opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    X, Y = classification_data()
    batches = minibatches(X, Y, steps, batch_size, torch.Generator().manual_seed(seed + 1))

    def draws() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(steps):
            if crash_after is not None and i == crash_after:
                raise ZeroDivisionError("simulated crash in the training loop")
            yield next(batches)

    if run_dir is None:
        train_steps(None, model, optimizer, obj.loss, draws())
    else:
        record(run_dir, model, optimizer, obj.loss, draws(), objective=objective, **rec_kw)
    return model


def classifier_run(run_dir: Path, factory: Callable[[], Objective] = make_mlp, **kw: Any) -> Path:
    """A run of :func:`train_classifier` recorded into ``run_dir``, its manifest naming ``factory`` as
    the objective (``support.problems:<factory>``); returns ``run_dir``."""
    train_classifier(run_dir, factory, objective=f"{__name__}:{factory.__name__}", **kw)
    return run_dir


# --- softmax regression on the digits (convex) --------------------------------------------------


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    return X, torch.tensor(d.target)


def make_softmax() -> Objective:
    return Objective(model=nn.Linear(64, 10), loss=ce_loss)
