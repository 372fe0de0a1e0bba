"""Hugging Face ``Trainer`` adapter: a ``TrainerCallback`` that drives a
:class:`~trajscope.recorders.Recorder`.

Usage::

    from trajscope.recorders.hf import TrajscopeCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[TrajscopeCallback("runs/a", objective="train:make_objective")])

with an objective whose loss is the model's own: ``loss=lambda m, batch: m(**batch)["loss"]``.

Trainer callbacks never see the batch, so the adapter reads it where the Trainer hands it to the
model: a forward pre-hook (with keyword arguments) on the model keeps the inputs of each training
forward (grad enabled, train mode), and a forward hook takes ``outputs["loss"]`` and calls
``rec.batch(inputs, loss=...)``. The stored batch is exactly the keyword arguments of
``model(**inputs)``.

Gradient accumulation follows the Trainer's convention (``transformers`` 4.46 and later): a model
that accepts loss keyword arguments is called with ``num_items_in_batch`` and already returns
sum/N over the whole accumulated batch, so each micro-batch has weight 1; otherwise the Trainer
divides each micro-batch loss by the number of micro-batches of the step, which is the Recorder's
``accumulation_reduction="mean"``. ``num_items_in_batch`` is part of the stored inputs, so the
replay computes the same normalisation.

The optimizer a callback receives is accelerate's ``AcceleratedOptimizer``: the Recorder hooks the
torch optimizer inside it, whose ``step`` runs only on real updates, and is handed the wrapper's
``GradScaler`` (fp16 on a GPU) so that the pre-clip norm of ``max_grad_norm`` clipping is measured
unscaled. A callback never sees the ``Trainer`` itself; a loop that scales its loss some other way
passes its scaler as ``grad_scaler=``.

This module imports ``transformers``; ``import trajscope.recorders`` does not import this module.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from trajscope.errors import RecorderError
from trajscope.recorders.arguments import unwrap_optimizer, wrapped_grad_scaler
from trajscope.recorders.hooks import BoundHook
from trajscope.recorders.recorder import Recorder

__all__ = ["TrajscopeCallback"]


class TrajscopeCallback(TrainerCallback):
    """Record a Hugging Face ``Trainer`` run with trajscope.

    Args:
        run_dir: the run directory to create.
        objective: ``"module:function"`` (or a module-level function) returning the Objective.
        every, window: record steps t..t+window−1 for every t divisible by ``every``.
        **recorder_kwargs: any other :class:`~trajscope.recorders.Recorder` keyword. ``grad_scaler``
            defaults to the scaler of the Trainer's optimizer wrapper (the ``Accelerator``'s, None
            without fp16).
        follow: :meth:`~trajscope.recorders.Recorder.follow`'s options (e.g. ``{"device": "cuda:1"}``):
            analyze the run as it is recorded, in a process of its own, from the start of training.
    """

    def __init__(self, run_dir: str | Path, *, objective: str | Callable[[], Any] | None = None,
                 every: int = 1, window: int = 2, follow: dict[str, Any] | None = None,
                 **recorder_kwargs: Any) -> None:
        if "accumulation" in recorder_kwargs:
            raise RecorderError(
                "accumulation: taken from TrainingArguments.gradient_accumulation_steps; "
                "do not pass it"
            )
        self.run_dir = Path(run_dir)
        self.objective = objective
        self.every = every
        self.window = window
        self.recorder_kwargs = recorder_kwargs
        self.follow = follow
        self.follower: subprocess.Popen[bytes] | None = None  # the live analysis (follow), when started
        self.recorder: Recorder | None = None
        self._inputs: dict[str, Any] | None = None
        self._hooks: list[Any] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise RecorderError("TrajscopeCallback: the Trainer passed no model or optimizer")
        recorder_kwargs = dict(self.recorder_kwargs)
        # The Trainer's optimizer is accelerate's AcceleratedOptimizer: it holds the Accelerator's
        # GradScaler (fp16), which divides the pre-clip norm measured on scaled gradients.
        recorder_kwargs.setdefault("grad_scaler", wrapped_grad_scaler(optimizer))
        self.recorder = Recorder(
            self.run_dir, model, unwrap_optimizer(optimizer), objective=self.objective,
            every=self.every, window=self.window,
            accumulation=int(args.gradient_accumulation_steps), accumulation_reduction="mean",
            **recorder_kwargs,
        )
        self.recorder.start()
        if self.follow is not None:
            self.follower = self.recorder.follow(**self.follow)
        # BoundHooks keep the model copyable and picklable (checkpointing, EMA) while recording.
        self._hooks = [
            model.register_forward_pre_hook(BoundHook(self._pre_forward, model), with_kwargs=True),
            model.register_forward_hook(BoundHook(self._post_forward, model), with_kwargs=True),
        ]

    def _pre_forward(self, module: torch.nn.Module, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> None:
        if module.training and torch.is_grad_enabled():
            if args:
                raise RecorderError(
                    "TrajscopeCallback: the model was called with positional arguments; the "
                    "adapter records model(**inputs) as the Trainer calls it"
                )
            self._inputs = dict(kwargs)

    def _post_forward(self, module: torch.nn.Module, args: tuple[Any, ...],
                      kwargs: dict[str, Any], output: Any) -> None:
        if self._inputs is None or self.recorder is None:
            return
        inputs, self._inputs = self._inputs, None
        loss = output["loss"] if isinstance(output, Mapping) else output[0]
        if not isinstance(loss, torch.Tensor):
            raise RecorderError("TrajscopeCallback: the model's output has no 'loss' tensor")
        # With num_items_in_batch the model already normalised by the whole accumulated batch.
        weight = 1.0 if "num_items_in_batch" in inputs else None
        self.recorder.batch(inputs, loss=loss.detach(), weight=weight)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.recorder is not None:
            self.recorder.close()
