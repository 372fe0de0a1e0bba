"""The plain recorded training loop that most tests need, written once.

Per batch: ``optimizer.zero_grad()``, ``loss(model, batch).backward()``, ``rec.batch(batch, loss=…)``,
``optimizer.step()``, exactly the loop ``docs/recording.md`` documents. A test whose loop differs on
purpose (gradient accumulation, clipping, AMP, a learning-rate schedule, a change between steps)
writes its own loop instead of bending this one.

``batches`` may be a generator: each batch is drawn at the top of its step, as a hand-written loop
draws it, so random draws interleave with training exactly as they would inline (and an exception
it raises is raised inside the recorder's ``with`` block, like a failing training step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from trajscope.recorders import Recorder

Loss = Callable[[torch.nn.Module, Any], torch.Tensor]


def minibatches(x: torch.Tensor, y: torch.Tensor, steps: int, size: int,
                generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` minibatches ``(x[idx], y[idx])`` of ``size`` rows drawn at random (with replacement)
    from ``generator``, each drawn when it is asked for."""
    for _ in range(steps):
        idx = torch.randint(0, len(x), (size,), generator=generator)
        yield x[idx], y[idx]


def train_steps(rec: Recorder | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: Loss,
                batches: Iterable[Any]) -> None:
    """One optimizer step per batch of ``batches``, each handed to the open recorder ``rec``
    (None: plain training, nothing recorded)."""
    for batch in batches:
        optimizer.zero_grad()
        value = loss(model, batch)
        value.backward()
        if rec is not None:
            rec.batch(batch, loss=value)
        optimizer.step()


def record(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: Loss,
           batches: Iterable[Any], **recorder_kwargs: Any) -> Path:
    """Train ``model`` on ``batches`` (:func:`train_steps`) inside ``with Recorder(run_dir, model,
    optimizer, **recorder_kwargs)``; returns ``run_dir``."""
    with Recorder(run_dir, model, optimizer, **recorder_kwargs) as rec:
        train_steps(rec, model, optimizer, loss, batches)
    return Path(run_dir)
