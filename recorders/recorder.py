"""The :class:`Recorder`: saves x_t, g_t and the minibatch z_t of scheduled optimizer steps.

How it hooks in, and why it cannot change training:

* ``optimizer.register_step_pre_hook`` fires inside ``optimizer.step()`` right before the update,
  so the parameters are x_t and ``p.grad`` is g_t exactly as the optimizer consumes it (after any
  ``GradScaler.unscale_`` and gradient clipping the user did before ``step``).
* ``optimizer.register_step_post_hook`` fires after the update; it advances the step counter and
  appends the step's line to ``scalars.jsonl``.
* a forward pre-hook on the model captures, for recorded steps only, the RNG state and the
  buffers as they were when the step's forward pass began (what dropout and eval-mode BatchNorm
  used).

Every capture is a copy (``detach().to('cpu', copy=True)``); the recorder never writes into a
parameter, gradient or buffer and never draws random numbers, so training with and without it
gives bit-identical results (tested).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from trajscope import format as fmt
from trajscope.errors import RecorderError
from trajscope.recorders.schedule import Every

_VERSION = "0.1.0"


def objective_name(objective: str | Callable[[], Any] | None) -> str | None:
    """The ``module:function`` string stored in the manifest for ``objective``.

    A function defined in a script run as ``python path/train.py`` lives in ``__main__``; it is
    stored under the script's file stem (``train:make_objective``), which the analyzer can import
    when run from the script's directory.
    """
    if objective is None:
        return None
    if isinstance(objective, str):
        mod, sep, fn = objective.partition(":")
        if not sep or not mod or not fn:
            raise RecorderError(f"objective={objective!r}: expected 'module:function'")
        return objective
    if callable(objective):
        mod = getattr(objective, "__module__", None)
        qual = getattr(objective, "__qualname__", None)
        if not mod or not qual or "<locals>" in qual or "<lambda>" in qual:
            raise RecorderError(
                f"objective={objective!r}: a callable objective must be a module-level function "
                "so the analyzer can import it; pass 'module:function' instead"
            )
        if mod == "__main__":
            main_file = getattr(sys.modules.get("__main__"), "__file__", None)
            if main_file:
                mod = Path(main_file).stem
        return f"{mod}:{qual}"
    raise RecorderError(f"objective={objective!r}: expected 'module:function' or a function")


def _jsonable(value: Any) -> Any:
    """Optimizer hyperparameters as JSON (tensors to numbers, tuples to lists, rest as repr)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # copy=True guarantees a fresh tensor even on CPU: the optimizer updates x and g in place next.
    return t.detach().to("cpu", copy=True).contiguous()


class Recorder:
    """Record a training run for offline analysis.

    Use it as a context manager around the training loop and call :meth:`batch` once per optimizer
    step, before ``optimizer.step()``, naming the minibatch that step consumes::

        with Recorder("runs/a", model, opt, objective="train:make_objective", every=10, window=2) as rec:
            for x, y in loader:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                rec.batch((x, y), loss=loss)
                opt.step()

    Args:
        run_dir: directory to create (or an empty one). An existing run is never overwritten
            unless ``overwrite=True``.
        model: the module being trained; its parameters are recorded by ``named_parameters`` name.
        optimizer: the optimizer whose steps define the trajectory.
        objective: ``"module:function"`` (or the function itself) returning a
            :class:`trajscope.Objective`; how the analyzer rebuilds the loss.
        every, window: record steps t..t+window−1 for every t divisible by ``every``.
        format: storage format; ``"safetensors"`` (one file per recorded step).
        metadata: JSON-serialisable user metadata stored in the manifest.
        overwrite: replace an existing run in ``run_dir`` (its analysis included).
    """

    def __init__(
        self,
        run_dir: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        objective: str | Callable[[], Any] | None = None,
        every: int = 1,
        window: int = 2,
        format: str = "safetensors",  # noqa: A002 - the public name the docs use
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise RecorderError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise RecorderError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if format != "safetensors":
            raise RecorderError(f"format={format!r}: expected 'safetensors'")
        self.run_dir = Path(run_dir)
        self.model = model
        self.optimizer = optimizer
        self.objective = objective_name(objective)
        self.schedule = Every(every, window)
        self.format = format
        self.metadata = dict(metadata or {})
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise RecorderError(f"metadata: must be JSON-serialisable ({exc})") from exc
        self._overwrite = overwrite

        names = {id(p): n for n, p in model.named_parameters()}
        self._params: list[tuple[str, torch.nn.Parameter]] = list(model.named_parameters())
        self._trainable: list[tuple[str, torch.nn.Parameter]] = []
        self._group_names: list[list[str]] = []
        seen: set[int] = set()
        for gi, group in enumerate(optimizer.param_groups):
            gnames = []
            for p in group["params"]:
                if id(p) not in names:
                    raise RecorderError(
                        f"optimizer param group {gi} holds a tensor of shape {tuple(p.shape)} "
                        "that is not a parameter of the model; the recorder names tensors by "
                        "model.named_parameters()"
                    )
                gnames.append(names[id(p)])
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self._trainable.append((names[id(p)], p))
            self._group_names.append(gnames)

        self.step = 0  # index of the next optimizer step: it moves x_step to x_{step+1}
        self._pending: tuple[Any, Any] | None = None  # (batch, loss) named for the current step
        self._forward_state: dict[str, torch.Tensor] | None = None
        self._training_mode: bool | None = None
        self._handles: list[Any] = []
        self._scalars_fh: Any = None
        self._open = False
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(crashed=exc_type is not None)

    def start(self) -> None:
        """Create the run directory, write the manifest and attach the hooks."""
        if self._open:
            return
        if self._closed:
            raise RecorderError(f"{self.run_dir}: this Recorder was closed; create a new one")
        manifest_path = self.run_dir / fmt.MANIFEST
        if manifest_path.exists():
            if not self._overwrite:
                raise RecorderError(
                    f"{self.run_dir}: already holds a trajscope run; choose a new directory or "
                    "pass overwrite=True"
                )
            for name in (fmt.STEPS_DIR, fmt.ANALYSIS_DIR):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            (self.run_dir / fmt.SCALARS).unlink(missing_ok=True)
            manifest_path.unlink()
        (self.run_dir / fmt.STEPS_DIR).mkdir(parents=True, exist_ok=True)
        self._status = fmt.STATUS_RECORDING
        self._write_manifest()
        self._scalars_fh = open(self.run_dir / fmt.SCALARS, "a", encoding="utf-8")
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pre_step),
            self.optimizer.register_step_post_hook(self._post_step),
            self.model.register_forward_pre_hook(self._pre_forward),
        ]
        self._open = True

    def close(self, *, crashed: bool = False) -> None:
        """Detach the hooks, save the final state x_T and mark the run complete (or crashed)."""
        if not self._open:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        try:
            if self._pending is not None:
                # rec.batch was called but no step followed (e.g. the loop broke out, or AMP
                # skipped the very last step): keep the line so scalars.jsonl stays complete.
                self._write_scalars(skipped=True)
            if not crashed:
                self._write_snapshot(self.step, kind=fmt.KIND_FINAL)
        finally:
            self._scalars_fh.close()
            self._status = fmt.STATUS_CRASHED if crashed else fmt.STATUS_COMPLETE
            self._write_manifest()
            self._open = False
            self._closed = True

    # --- the per-step call ----------------------------------------------------------------------

    def batch(self, batch: Any, *, loss: torch.Tensor | float | None = None) -> None:
        """Name the minibatch (and its loss, as training computed it) of the coming optimizer step.

        Call it once per step, before ``optimizer.step()``. ``batch`` is passed to the objective's
        ``loss(model, batch)`` unchanged at analysis time: any nesting of tuples, lists and
        str-keyed dicts of tensors (numbers and strings allowed as leaves).
        """
        if not self._open:
            raise RecorderError("Recorder.batch() called outside the recorder's `with` block")
        if self._pending is not None:
            # No optimizer step consumed the previous batch: GradScaler skipped it (inf/NaN
            # gradients). The step index is not consumed; the line records the skip.
            self._write_scalars(skipped=True)
        self._pending = (batch, loss)

    # --- hooks ----------------------------------------------------------------------------------

    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        # Only the first forward of a recorded step matters: it is the one whose dropout masks
        # and running statistics produced the loss (later forwards may be evaluation passes).
        if self._forward_state is None and self.schedule(self.step):
            state = {fmt.RNG + "cpu": torch.get_rng_state()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                for i in range(torch.cuda.device_count()):
                    state[f"{fmt.RNG}cuda{i}"] = torch.cuda.get_rng_state(i)
            for name, b in module.named_buffers():
                state[fmt.BUFFER + name] = _cpu_copy(b)
            self._forward_state = state
            self._training_mode = module.training

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.schedule(self.step):
            if self._pending is None:
                raise RecorderError(
                    f"step {self.step}: optimizer.step() was called without rec.batch(...) for a "
                    "recorded step; call rec.batch(batch, loss=loss) before every optimizer.step()"
                )
            self._write_snapshot(self.step, kind=fmt.KIND_STEP)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._write_scalars(skipped=False)
        self.step += 1
        self._forward_state = None
        self._training_mode = None

    # --- writing --------------------------------------------------------------------------------

    def _lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def _pending_loss(self) -> float | None:
        if self._pending is None or self._pending[1] is None:
            return None
        loss = self._pending[1]
        return float(loss.detach().item()) if isinstance(loss, torch.Tensor) else float(loss)

    def _write_scalars(self, *, skipped: bool) -> None:
        line = {
            "step": self.step,
            "loss": self._pending_loss(),
            "lr": self._lrs(),
            "skipped": skipped,
            "recorded": (not skipped) and self.schedule(self.step),
        }
        self._scalars_fh.write(json.dumps(line, allow_nan=True) + "\n")
        self._scalars_fh.flush()
        self._pending = None

    def _write_snapshot(self, step: int, *, kind: str) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, p in self._params:
            tensors[fmt.PARAM + name] = _cpu_copy(p)
        meta: dict[str, Any] = {"step": step, "kind": kind, "lr": self._lrs()}
        if kind == fmt.KIND_STEP:
            for name, p in self._trainable:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RecorderError(f"step {step}: gradient of {name!r} is sparse; not supported")
                    tensors[fmt.GRAD + name] = _cpu_copy(p.grad)
            batch, _ = self._pending  # type: ignore[misc]
            tree, leaves = fmt.flatten_batch(batch)
            for i, leaf in enumerate(leaves):
                tensors[f"{fmt.BATCH}{i}"] = _cpu_copy(leaf)
            meta["batch_tree"] = tree
            meta["loss"] = self._pending_loss()
            meta["training"] = self._training_mode if self._training_mode is not None else self.model.training
            if self._forward_state is not None:
                tensors.update(self._forward_state)
                meta["captured_at"] = "forward"
            else:
                meta["captured_at"] = "step"
        for name, b in self.model.named_buffers():
            tensors.setdefault(fmt.BUFFER + name, _cpu_copy(b))
        data = safetensors.torch.save(tensors, metadata={"trajscope": json.dumps(meta, allow_nan=True)})
        fmt.atomic_write_bytes(self.run_dir / fmt.STEPS_DIR / fmt.step_filename(step), data)

    def _write_manifest(self) -> None:
        groups = []
        for names, group in zip(self._group_names, self.optimizer.param_groups):
            hyper = {k: _jsonable(v) for k, v in group.items() if k != "params"}
            groups.append({"params": names, **hyper})
        trainable = {n for n, _ in self._trainable}
        manifest = {
            "format_version": fmt.FORMAT_VERSION,
            "trajscope_version": _VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "libraries": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "numpy": np.__version__,
                "safetensors": getattr(safetensors, "__version__", "unknown"),
            },
            "objective": self.objective,
            "storage": self.format,
            "schedule": self.schedule.to_json(),
            "params": [
                {"name": n, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."),
                 "trainable": n in trainable}
                for n, p in self._params
            ],
            "buffers": [
                {"name": n, "shape": list(b.shape), "dtype": str(b.dtype).removeprefix("torch.")}
                for n, b in self.model.named_buffers()
            ],
            "optimizer": {
                "class": f"{type(self.optimizer).__module__}.{type(self.optimizer).__qualname__}",
                "param_groups": groups,
            },
            "status": self._status,
            "num_steps": self.step,
            "final_step": self.step if self._status == fmt.STATUS_COMPLETE else None,
            "metadata": self.metadata,
        }
        fmt.atomic_write_json(self.run_dir / fmt.MANIFEST, manifest)
