"""PyTorch Lightning adapter: a ``Callback`` that drives a :class:`~trajscope.recorders.Recorder`.

Usage::

    from trajscope.recorders.lightning import TrajscopeCallback

    trainer = L.Trainer(callbacks=[TrajscopeCallback("runs/a", objective="train:make_objective",
                                                     every=10, window=2)])

with an objective whose loss calls the module's own step, e.g.
``Objective(model=MyModule(), loss=lambda m, batch: m.training_step(batch, 0))``.

The adapter only translates Lightning's hooks into recorder calls (all logic is in the Recorder):

* ``on_train_start``: the Recorder is created on the LightningModule and the trainer's optimizer,
  with ``accumulation=trainer.accumulate_grad_batches`` and ``grad_scaler`` the precision plugin's
  ``GradScaler`` (``precision="16-mixed"``; None otherwise): Lightning unscales the gradients before
  clipping them, so the pre-clip norm measured after backward is divided by the scale.
* ``on_train_batch_start``: the batch (already on the device) is kept, and the forward state (RNG,
  buffers) captured, since ``training_step`` need not call ``forward``.
* ``on_before_backward``: Lightning passes the loss divided by ``accumulate_grad_batches`` (and
  scaled, under a GradScaler); the adapter recovers the micro-batch's own loss.
* ``on_after_backward``: ``rec.batch(batch, loss, weight=1/k)``; Lightning divides every
  micro-batch loss by k, also on an epoch's shorter last step, so the weight is 1/k, not 1/m.
* Lightning calls ``optimizer.step(closure)``; the Recorder captures x_t and g_t right after the
  closure, which includes Lightning's gradient clipping: g_t is post-clip.

This module imports ``lightning`` (the ``lightning.pytorch`` package); ``import trajscope.recorders``
does not import this module.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from trajscope.errors import RecorderError
from trajscope.recorders.arguments import unwrap_optimizer
from trajscope.recorders.recorder import Recorder

__all__ = ["TrajscopeCallback"]


class TrajscopeCallback(pl.Callback):
    """Record a Lightning training run with trajscope.

    Args:
        run_dir: the run directory to create.
        objective: ``"module:function"`` (or a module-level function) returning the Objective.
        every, window: record steps t..t+window−1 for every t divisible by ``every``.
        **recorder_kwargs: any other :class:`~trajscope.recorders.Recorder` keyword (``schedule``,
            ``format``, ``grads``, ``on_error``, ``optimizer_state``, ``metadata``, ``overwrite``, ...).
            ``grad_scaler`` defaults to ``trainer.precision_plugin.scaler``.
        follow: :meth:`~trajscope.recorders.Recorder.follow`'s options (e.g. ``{"device": "cuda:1"}``):
            analyze the run as it is recorded, in a process of its own, from the start of training.
    """

    def __init__(self, run_dir: str | Path, *, objective: str | Callable[[], Any] | None = None,
                 every: int = 1, window: int = 2, follow: dict[str, Any] | None = None,
                 **recorder_kwargs: Any) -> None:
        super().__init__()
        if "accumulation" in recorder_kwargs:
            raise RecorderError(
                "accumulation: taken from Trainer(accumulate_grad_batches=...); do not pass it"
            )
        self.run_dir = Path(run_dir)
        self.objective = objective
        self.every = every
        self.window = window
        self.recorder_kwargs = recorder_kwargs
        self.follow = follow
        self.follower: subprocess.Popen[bytes] | None = None  # the live analysis (follow), when started
        self.recorder: Recorder | None = None
        self._k = 1
        self._batch: Any = None
        self._loss: torch.Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RecorderError(
                f"TrajscopeCallback records one optimizer; this LightningModule configures "
                f"{len(trainer.optimizers)}"
            )
        if not pl_module.automatic_optimization:
            raise RecorderError(
                "TrajscopeCallback needs automatic optimization; with manual optimization, use "
                "trajscope.recorders.Recorder in training_step instead"
            )
        self._k = int(trainer.accumulate_grad_batches)
        recorder_kwargs = dict(self.recorder_kwargs)
        recorder_kwargs.setdefault("grad_scaler", getattr(trainer.precision_plugin, "scaler", None))
        self.recorder = Recorder(
            self.run_dir, pl_module, unwrap_optimizer(trainer.optimizers[0]), objective=self.objective,
            every=self.every, window=self.window, accumulation=self._k, **recorder_kwargs,
        )
        self.recorder.start()
        if self.follow is not None:
            self.follower = self.recorder.follow(**self.follow)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.recorder is not None:
            self._batch = batch
            # Lightning enters its precision plugin's autocast inside training_step, after this hook.
            plugin_autocast = getattr(trainer.precision_plugin, "autocast_context_manager", None)
            self.recorder.capture_forward_state(autocast=plugin_autocast() if callable(plugin_autocast) else None)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        loss = loss.detach()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # 16-mixed: Lightning hands this hook the scaled loss
            loss = loss / scaler.get_scale()
        self._loss = loss * self._k  # Lightning divided the micro-batch loss by k

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            weight = 1.0 / self._k if self._k > 1 else None
            self.recorder.batch(self._batch, loss=self._loss, weight=weight)
            self._batch = self._loss = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.recorder.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.recorder is not None:
            self.recorder.close(crashed=True)
