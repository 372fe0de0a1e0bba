"""The :class:`Recorder`: saves x_t, g_t and the minibatch z_t of scheduled optimizer steps.

How it hooks in, and why it cannot change training:

* ``optimizer.register_step_pre_hook`` fires inside ``optimizer.step()`` right before the update,
  so the parameters are x_t and ``p.grad`` is g_t exactly as the optimizer consumes it (after any
  ``GradScaler.unscale_`` and gradient clipping done before ``step``). When ``step`` is given a
  closure (LBFGS, PyTorch Lightning), the gradient only exists once the closure has run inside
  ``step``: the pre-hook then wraps the closure and captures right after its first call.
* ``optimizer.register_step_post_hook`` fires after the update; it advances the step counter and
  appends the step's line to ``scalars.jsonl``.
* a forward pre-hook on the model captures, for recorded steps only, the RNG state and the
  buffers as they were when the step's forward pass began (what dropout and BatchNorm used).

Every capture is a copy made on the training thread before the optimizer mutates anything; the
recorder never writes into a parameter, gradient or buffer and never draws random numbers, so
training with and without it gives bit-identical results (tested). Only the file I/O runs on a
background thread (:mod:`trajscope.recorders.storage`).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch

from trajscope import format as fmt
from trajscope.errors import RecorderError
from trajscope.recorders import distributed
from trajscope.recorders.schedule import Schedule, as_schedule
from trajscope.recorders.storage import (
    AsyncWriter,
    HDF5Writer,
    SafetensorsWriter,
    SlotPool,
    build_image,
    dtype_name,
)

__all__ = ["Recorder", "RecorderStats", "RecorderWarning", "objective_name"]

_VERSION = "0.1.0"
_DEFER_LIMIT = 64  # scalars lines kept while GPU losses are copied back without blocking


@dataclass
class RecorderStats:
    """What recording has cost so far (``Recorder.stats``), for tuning ``every``/``max_pending``.

    Attributes:
        snapshots: snapshots copied (recorded steps, plus the final state once closed).
        bytes: bytes of those snapshots (file sizes in the safetensors format).
        copy_seconds: training-thread time spent copying snapshots (the unavoidable part).
        wait_seconds: training-thread time spent waiting for a free buffer because the disk was
            behind (back-pressure); grows when ``every`` is too small for the disk.
        write_seconds: time the writer spent writing (on the background thread when async).
        hook_seconds, hook_cpu_seconds: wall and CPU time of the training thread inside the
            recorder (every hook and ``batch`` call, copies included): all recording adds to the
            training thread.
        write_cpu_seconds: CPU time of the writer (what it can take from training on a machine
            with no idle core).
    """

    snapshots: int = 0
    bytes: int = 0
    copy_seconds: float = 0.0
    wait_seconds: float = 0.0
    write_seconds: float = 0.0
    hook_seconds: float = 0.0
    hook_cpu_seconds: float = 0.0
    write_cpu_seconds: float = 0.0


class RecorderWarning(UserWarning):
    """Recording stopped (``on_error="warn"``) while training goes on; the run is incomplete."""


def objective_name(objective: str | Callable[..., Any] | None, what: str = "objective") -> str | None:
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
            raise RecorderError(f"{what}={objective!r}: expected 'module:function'")
        return objective
    if callable(objective):
        mod = getattr(objective, "__module__", None)
        qual = getattr(objective, "__qualname__", None)
        if not mod or not qual or "<locals>" in qual or "<lambda>" in qual:
            raise RecorderError(
                f"{what}={objective!r}: a callable {what} must be a module-level function "
                "so the analyzer can import it; pass 'module:function' instead"
            )
        if mod == "__main__":
            main_file = getattr(sys.modules.get("__main__"), "__file__", None)
            if main_file:
                mod = Path(main_file).stem
        return f"{mod}:{qual}"
    raise RecorderError(f"{what}={objective!r}: expected 'module:function' or a function")


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


def _as_float(loss: Any) -> float | None:
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().item())  # full precision: a float64 loss stays exact
    return float(loss)


def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names the analyzer's objective uses (DDP/DataParallel unwrapped)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


class Recorder:
    """Record a training run for offline analysis.

    Use it as a context manager around the training loop and call :meth:`batch` once per
    micro-batch, before ``optimizer.step()``, naming the minibatch that step consumes::

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
        model: the module being trained (a DDP/DataParallel wrapper is unwrapped); its parameters
            are recorded by ``named_parameters`` name.
        optimizer: the optimizer whose steps define the trajectory.
        objective: ``"module:function"`` (or the function itself) returning a
            :class:`trajscope.Objective`; how the analyzer rebuilds the loss.
        every, window: record steps t..t+window−1 for every t divisible by ``every``.
        schedule: instead of ``every``/``window``: ``Every(...)``, ``Log(...)``, ``At(...)`` or a
            list of steps (exactly those steps).
        format: ``"safetensors"`` (one file per recorded step) or ``"hdf5"`` (one file).
        accumulation: micro-batches per optimizer step (gradient accumulation): the number of
            :meth:`batch` calls one step consumes. The snapshot stores all of them.
        accumulation_reduction: how the step's loss is formed from its micro-batch losses when
            :meth:`batch` gets no ``weight``: ``"mean"`` (f = (1/m)·Σ f_i over the m micro-batches
            the step consumed; the usual ``(loss / m).backward()``) or ``"sum"`` (f = Σ f_i).
        batch_fn: store sample indices instead of batch tensors: :meth:`batch` is given the
            indices, and ``batch_fn(indices) -> batch`` (``"module:function"`` or a module-level
            function) rebuilds the batch at analysis time. For inputs too large to store.
        optimizer_state: also store the optimizer's per-parameter state (e.g. Adam's moments)
            as it was when the step's update was computed.
        async_write: write on a background thread (default). False writes inside the step.
        max_pending: snapshots copied but not yet written before training waits for the disk
            (back-pressure); host memory used is at most this many snapshots.
        on_error: ``"raise"``: a failed write raises :class:`RecorderError` at the next step or
            at close. ``"warn"``: it warns, recording stops, training continues, and the run is
            marked incomplete; everything written before stays valid.
        direct_io: write snapshot files with ``O_DIRECT`` (no page-cache copy) when the
            filesystem supports it. None (default) and True try it and fall back; False never.
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
        schedule: Schedule | list[int] | None = None,
        format: str = "safetensors",  # noqa: A002 - the public name the docs use
        accumulation: int = 1,
        accumulation_reduction: str = "mean",
        batch_fn: str | Callable[[Any], Any] | None = None,
        optimizer_state: bool = False,
        async_write: bool = True,
        max_pending: int = 2,
        on_error: str = "raise",
        direct_io: bool | None = None,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise RecorderError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise RecorderError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if format not in fmt.STORAGES:
            raise RecorderError(f"format={format!r}: expected one of {', '.join(fmt.STORAGES)}")
        if not isinstance(accumulation, int) or isinstance(accumulation, bool) or accumulation < 1:
            raise RecorderError(f"accumulation={accumulation!r}: expected an int >= 1")
        if accumulation_reduction not in ("mean", "sum"):
            raise RecorderError(
                f"accumulation_reduction={accumulation_reduction!r}: expected 'mean' or 'sum'"
            )
        if on_error not in ("raise", "warn"):
            raise RecorderError(f"on_error={on_error!r}: expected 'raise' or 'warn'")
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise RecorderError(f"max_pending={max_pending!r}: expected an int >= 1")
        self.run_dir = Path(run_dir)
        self.model = _unwrap_model(model)
        self.optimizer = optimizer
        self.objective = objective_name(objective)
        self.schedule: Schedule = as_schedule(schedule, every, window)
        self.format = format
        self.accumulation = accumulation
        self.accumulation_reduction = accumulation_reduction
        self.batch_fn = objective_name(batch_fn, "batch_fn")
        self.optimizer_state = bool(optimizer_state)
        self.async_write = bool(async_write)
        self.max_pending = max_pending
        self.on_error = on_error
        self.direct_io = direct_io
        self.metadata = dict(metadata or {})
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise RecorderError(f"metadata: must be JSON-serialisable ({exc})") from exc
        self._overwrite = overwrite
        self.rank, self.world_size = distributed.rank_and_world()

        names = {id(p): n for n, p in self.model.named_parameters()}
        self._params: list[tuple[str, torch.nn.Parameter]] = list(self.model.named_parameters())
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
        self._micro: list[dict[str, Any]] = []  # micro-batches named for the coming step
        self._fwd: dict[str, torch.Tensor] | None = None  # state at the first forward since batch()
        self._fwd_training: bool | None = None
        self._step_fwd: dict[str, torch.Tensor] | None = None  # ... adopted for the coming step
        self._step_fwd_training: bool | None = None
        self._handles: list[Any] = []
        self._scalars_fh: Any = None
        self._deferred: list[tuple[dict[str, Any], list[tuple[float, Any]], Any]] = []
        self._writer: AsyncWriter | None = None
        self._store: SafetensorsWriter | HDF5Writer | None = None
        self._status = fmt.STATUS_RECORDING
        self._stats = RecorderStats()
        self._failed = False  # recording stopped after an error (on_error="warn")
        self._error: str | None = None
        self._open = False
        self._closed = False

    @property
    def stats(self) -> RecorderStats:
        """Counters of what recording has cost so far (see :class:`RecorderStats`)."""
        if self._writer is not None:
            self._stats.write_seconds = self._writer.write_seconds
            self._stats.write_cpu_seconds = self._writer.write_cpu_seconds
        return self._stats

    def _timed(self, t0: float, c0: float) -> None:
        self._stats.hook_seconds += time.perf_counter() - t0
        self._stats.hook_cpu_seconds += time.thread_time() - c0

    def flush(self) -> None:
        """Block until every snapshot taken so far is written (e.g. before analyzing a live run).

        Raises:
            RecorderError: a write failed and ``on_error="raise"``.
        """
        if self._writer is not None:
            self._writer.flush()
        self._check_writer()

    @property
    def is_writer(self) -> bool:
        """True on the process that writes the run (rank 0 under data parallelism)."""
        return self.rank == 0

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(crashed=exc_type is not None)

    def start(self) -> None:
        """Create the run directory, write the manifest, start the writer and attach the hooks."""
        if self._open:
            return
        if self._closed:
            raise RecorderError(f"{self.run_dir}: this Recorder was closed; create a new one")
        if self.is_writer:
            self._prepare_dir()
            self._write_manifest()
            self._scalars_fh = open(self.run_dir / fmt.SCALARS, "a", encoding="utf-8")
            pin = torch.cuda.is_available() and any(p.is_cuda for _, p in self._params)
            pool = SlotPool(self.max_pending if self.async_write else 1, pin=pin)
            if self.format == fmt.STORAGE_HDF5:
                self._store = HDF5Writer(self.run_dir / fmt.HDF5_FILE, self._declared(),
                                         {"trajscope_storage": fmt.STORAGE_HDF5,
                                          "format_version": fmt.FORMAT_VERSION})
                where: Callable[[int], str] = lambda s: f"{fmt.HDF5_FILE} (step {s})"  # noqa: E731
            else:
                self._store = SafetensorsWriter(self.run_dir, direct_io=self.direct_io)
                where = lambda s: f"{fmt.STEPS_DIR}/{fmt.step_filename(s)}"  # noqa: E731
            self._writer = AsyncWriter(self._store.write, where, pool, threaded=self.async_write)
        self._handles = [
            self.optimizer.register_step_pre_hook(self._pre_step),
            self.optimizer.register_step_post_hook(self._post_step),
            self.model.register_forward_pre_hook(self._pre_forward),
        ]
        self._open = True

    def _prepare_dir(self) -> None:
        manifest_path = self.run_dir / fmt.MANIFEST
        if manifest_path.exists():
            if not self._overwrite:
                raise RecorderError(
                    f"{self.run_dir}: already holds a trajscope run; choose a new directory or "
                    "pass overwrite=True"
                )
            for name in (fmt.STEPS_DIR, fmt.ANALYSIS_DIR, "report"):  # report/: stale figures
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            (self.run_dir / fmt.SCALARS).unlink(missing_ok=True)
            (self.run_dir / fmt.HDF5_FILE).unlink(missing_ok=True)
            manifest_path.unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.format == fmt.STORAGE_SAFETENSORS:
            (self.run_dir / fmt.STEPS_DIR).mkdir(exist_ok=True)

    def _declared(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """Tensors with a fixed shape for the whole run: an HDF5 dataset each."""
        out = [(fmt.PARAM + n, dtype_name(p.dtype), tuple(p.shape)) for n, p in self._params]
        out += [(fmt.GRAD + n, dtype_name(p.dtype), tuple(p.shape)) for n, p in self._trainable]
        out += [(fmt.BUFFER + n, dtype_name(b.dtype), tuple(b.shape))
                for n, b in self.model.named_buffers()]
        return out

    def close(self, *, crashed: bool = False) -> None:
        """Detach the hooks, save the final state x_T, wait for the writer, mark the run's status.

        ``crashed=True`` (what the ``with`` block passes when training raised) skips the final
        state and marks the run ``crashed``; the steps written so far stay readable.

        Raises:
            RecorderError: a write failed and ``on_error="raise"`` (the run is marked crashed).
        """
        if not self._open:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        self._open = False
        self._closed = True
        if not self.is_writer:
            return
        pending: BaseException | None = None
        try:
            if not self._failed:
                if self._micro:
                    # rec.batch was called but no step followed (the loop broke out, or AMP
                    # skipped the very last step): keep the line so scalars.jsonl stays complete.
                    self._write_scalars(skipped=True)
                if not crashed:
                    self._submit(self.step, fmt.KIND_FINAL)
                self._flush_deferred(force=True)
        except RecorderError as exc:
            pending = exc
        finally:
            assert self._writer is not None and self._store is not None
            self._writer.close()
            try:
                self._store.close()
            except Exception as exc:  # noqa: BLE001 - reported like any write failure
                if self._writer.error is None:
                    self._error = self._error or f"closing {fmt.HDF5_FILE} failed ({exc})"
            if self._scalars_fh is not None:
                try:
                    self._scalars_fh.close()
                except OSError:
                    pass
            try:
                self._check_writer()
            except RecorderError as exc:
                pending = pending or exc
            failed = crashed or self._failed or self._error is not None
            self._status = fmt.STATUS_CRASHED if failed else fmt.STATUS_COMPLETE
            try:
                self._write_manifest()
            except OSError as exc:
                if pending is None and self.on_error == "raise" and not crashed:
                    pending = RecorderError(f"{self.run_dir / fmt.MANIFEST}: cannot write ({exc})")
        if pending is not None and not crashed and self.on_error == "raise":
            raise pending

    # --- the per-step calls ---------------------------------------------------------------------

    def batch(self, batch: Any, *, loss: torch.Tensor | float | None = None,
              weight: float | None = None) -> None:
        """Name a (micro-)batch of the coming optimizer step, and its loss as training computed it.

        Call it once per micro-batch, before ``optimizer.step()`` (with gradient accumulation,
        ``accumulation`` times per step). ``batch`` is passed to the objective's
        ``loss(model, batch)`` unchanged at analysis time: any nesting of tuples, lists and
        str-keyed dicts of tensors (numbers and strings allowed as leaves). With ``batch_fn``,
        pass the sample indices instead.

        Args:
            batch: the minibatch (or its sample indices with ``batch_fn``).
            loss: this micro-batch's loss as the objective computes it (before any division by
                the number of micro-batches).
            weight: the micro-batch's weight in the step's loss, f = Σ weight_i · f_i, when the
                ``accumulation_reduction`` rule does not describe the training loop (e.g. a loop
                that divides by the configured k while the epoch's last step has fewer).
        """
        if not self._open:
            raise RecorderError("Recorder.batch() called outside the recorder's `with` block")
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            self._batch(batch, loss, weight)
        finally:
            self._timed(t0, c0)

    def _batch(self, batch: Any, loss: torch.Tensor | float | None, weight: float | None) -> None:
        self._check_writer()
        if len(self._micro) >= self.accumulation:
            # No optimizer step consumed the previous micro-batches: GradScaler skipped it
            # (inf/NaN gradients). The step index is not consumed; the line records the skip.
            if self.is_writer and not self._failed:
                self._write_scalars(skipped=True)
            self._micro = []
            self._step_fwd = None
        if not self._micro:
            self._step_fwd, self._step_fwd_training = self._fwd, self._fwd_training
        self._fwd = None
        if weight is not None and not (isinstance(weight, (int, float)) and math.isfinite(weight)):
            raise RecorderError(f"step {self.step}: weight={weight!r}: expected a finite number")
        if self.batch_fn is not None and not isinstance(batch, torch.Tensor):
            try:
                batch = torch.as_tensor(batch, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise RecorderError(
                    f"step {self.step}: with batch_fn, rec.batch() takes the sample indices "
                    f"(a sequence of ints), got {type(batch).__name__}"
                ) from exc
        # Only recorded steps keep a reference to the batch (it is copied at the step).
        keep = self.schedule(self.step)
        self._micro.append({"batch": batch if keep else None, "loss": loss, "weight": weight})

    def capture_forward_state(self) -> None:
        """Capture the RNG state and buffers now, as the state of the coming forward pass.

        The model's forward pre-hook does this by itself; call it (as the Lightning adapter does)
        when the loss is computed by a method other than the recorded model's ``forward``.
        """
        if self._open and self._fwd is None and self.schedule(self.step):
            self._fwd = self._forward_state(self.model)
            self._fwd_training = self.model.training

    # --- hooks ----------------------------------------------------------------------------------

    def _forward_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = {fmt.RNG + "cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                state[f"{fmt.RNG}cuda{i}"] = torch.cuda.get_rng_state(i)
        for name, b in module.named_buffers():
            state[fmt.BUFFER + name] = _cpu_copy(b)
        return state

    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        # The first training forward since the last rec.batch() is the one whose dropout masks
        # and running statistics produced the coming micro-batch's loss; evaluation passes under
        # no_grad are ignored.
        if self._fwd is None and torch.is_grad_enabled() and self.schedule(self.step):
            t0, c0 = time.perf_counter(), time.thread_time()
            self._fwd = self._forward_state(module)
            self._fwd_training = module.training
            self._timed(t0, c0)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._pre_step_inner(args, kwargs)
        finally:
            self._timed(t0, c0)

    def _pre_step_inner(self, args: Any, kwargs: Any) -> Any:
        self._check_writer()
        if self._failed or not self.schedule(self.step):
            return None
        # torch passes step()'s own args, `self` included: step(closure) arrives as (opt, closure).
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if not callable(closure):
            self._capture_step()
            return None
        # The gradient is computed inside step() by the closure: capture after its first call
        # (later calls, e.g. LBFGS line search, evaluate other points).
        done = [False]

        def recorded_closure() -> Any:
            result = closure()
            if not done[0]:
                done[0] = True
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    self._capture_step()
                finally:
                    self._timed(t0, c0)
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": recorded_closure}
        return (args[0], recorded_closure, *args[2:]), kwargs

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if self.is_writer and not self._failed:
                self._write_scalars(skipped=False)
            self._micro = []
            self.step += 1
            self._fwd = self._step_fwd = None
            self._check_writer()
        finally:
            self._timed(t0, c0)

    # --- capturing --------------------------------------------------------------------------------

    def _weights(self) -> list[float]:
        m = len(self._micro)
        default = 1.0 / m if self.accumulation_reduction == "mean" else 1.0
        return [float(mb["weight"]) if mb["weight"] is not None else default for mb in self._micro]

    def _capture_step(self) -> None:
        if not self._micro:
            raise RecorderError(
                f"step {self.step}: optimizer.step() was called without rec.batch(...) for a "
                "recorded step; call rec.batch(batch, loss=loss) before every optimizer.step()"
            )
        weights = self._weights()
        micro = [{"batch": mb["batch"], "weight": w, "loss": _as_float(mb["loss"])}
                 for mb, w in zip(self._micro, weights)]
        if self.world_size > 1:
            gathered = distributed.gather_micro_batches(micro)
            if gathered is None:
                return  # not the writer: its batches now travel with rank 0's snapshot
            micro = gathered
        self._submit(self.step, fmt.KIND_STEP, micro)

    def _submit(self, step: int, kind: str, micro: list[dict[str, Any]] | None = None) -> None:
        """Copy the snapshot of ``step`` into a free slot and queue it for writing."""
        if self._failed or self._writer is None:
            return
        tensors: list[tuple[str, torch.Tensor]] = [(fmt.PARAM + n, p) for n, p in self._params]
        meta: dict[str, Any] = {"step": step, "kind": kind, "lr": self._lrs()}
        keys = {k for k, _ in tensors}
        if kind == fmt.KIND_STEP:
            assert micro is not None
            for name, p in self._trainable:
                if p.grad is not None:
                    if p.grad.layout != torch.strided:
                        raise RecorderError(
                            f"step {step}: gradient of {name!r} is sparse; not supported"
                        )
                    tensors.append((fmt.GRAD + name, p.grad))
            as_micro = (self.accumulation > 1 or self.world_size > 1
                        or any(mb["weight"] != 1.0 for mb in micro))
            batch = [mb["batch"] for mb in micro] if as_micro else micro[0]["batch"]
            tree, leaves = fmt.flatten_batch(batch)
            tensors += [(f"{fmt.BATCH}{i}", leaf) for i, leaf in enumerate(leaves)]
            meta["batch_tree"] = tree
            losses = [mb["loss"] for mb in micro]
            meta["loss"] = (None if any(v is None for v in losses)
                            else math.fsum(mb["weight"] * mb["loss"] for mb in micro))
            if as_micro:
                meta["micro_batches"] = {"weights": [mb["weight"] for mb in micro],
                                         "losses": losses}
            if self.batch_fn is not None:
                meta["batch_fn"] = self.batch_fn
            fwd = self._step_fwd if self._step_fwd is not None else self._fwd
            training = self._step_fwd_training if self._step_fwd is not None else self._fwd_training
            meta["training"] = training if training is not None else self.model.training
            if fwd is not None:
                tensors += list(fwd.items())
                meta["captured_at"] = "forward"
            else:
                meta["captured_at"] = "step"
            if self.optimizer_state:
                tensors += self._optimizer_state(meta)
            keys = {k for k, _ in tensors}
        for name, b in self.model.named_buffers():
            if fmt.BUFFER + name not in keys:
                tensors.append((fmt.BUFFER + name, b))
        t0 = time.perf_counter()
        slot = self._writer.pool.acquire()  # blocks while max_pending snapshots wait: back-pressure
        t1 = time.perf_counter()
        try:
            image = build_image(slot, step, kind, meta, tensors)
        except BaseException:
            self._writer.pool.release(slot)
            raise
        st = self._stats
        st.wait_seconds += t1 - t0
        st.copy_seconds += time.perf_counter() - t1
        st.snapshots += 1
        st.bytes += image.size
        self._writer.submit(image)

    def _optimizer_state(self, meta: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
        out = []
        scalars: dict[str, dict[str, Any]] = {}
        for name, p in self._trainable:
            for k, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out.append((f"{fmt.OPTIM}{name}/{k}", v))
                else:
                    scalars.setdefault(name, {})[str(k)] = _jsonable(v)
        if scalars:
            meta["optimizer_scalars"] = scalars
        return out

    # --- scalars ------------------------------------------------------------------------------------

    def _lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def _write_scalars(self, *, skipped: bool) -> None:
        line: dict[str, Any] = {
            "step": self.step,
            "loss": None,
            "lr": self._lrs(),
            "skipped": skipped,
            "recorded": (not skipped) and self.schedule(self.step),
        }
        if self.accumulation > 1:
            line["micro_batches"] = len(self._micro)
        weights = self._weights() if self._micro else []
        parts = [(w, mb["loss"]) for w, mb in zip(weights, self._micro)]
        if any(isinstance(v, torch.Tensor) and v.device.type == "cuda" for _, v in parts):
            # Do not stall the GPU pipeline for a log line: copy the losses back without
            # blocking and write the line once the copy has landed.
            host = []
            for w, v in parts:
                if isinstance(v, torch.Tensor):
                    h = torch.empty((), dtype=v.dtype, pin_memory=True)
                    h.copy_(v.detach().reshape(()), non_blocking=True)
                    v = h
                host.append((w, v))
            event = torch.cuda.Event()
            event.record()
            self._deferred.append((line, host, event))
            self._flush_deferred(force=len(self._deferred) >= _DEFER_LIMIT)
            return
        self._flush_deferred(force=True)
        line["loss"] = self._combine(parts)
        self._emit(line)

    @staticmethod
    def _combine(parts: list[tuple[float, Any]]) -> float | None:
        if not parts or any(v is None for _, v in parts):
            return None
        return math.fsum(w * _as_float(v) for w, v in parts)  # type: ignore[operator]

    def _flush_deferred(self, *, force: bool) -> None:
        while self._deferred:
            line, parts, event = self._deferred[0]
            if not force and not event.query():
                return
            event.synchronize()
            line["loss"] = self._combine(parts)
            self._deferred.pop(0)
            self._emit(line)

    def _emit(self, line: dict[str, Any]) -> None:
        try:
            self._scalars_fh.write(json.dumps(line, allow_nan=True) + "\n")
            self._scalars_fh.flush()
        except OSError as exc:
            self._fail(f"step {line['step']}: writing {fmt.SCALARS} failed ({exc.strerror or exc})", exc)

    # --- errors -------------------------------------------------------------------------------------

    def _check_writer(self) -> None:
        """Surface a background write failure on the training thread (once)."""
        err = self._writer.error if self._writer is not None else None
        if err is not None and not self._failed:
            self._fail(err.message(), err.exc)

    def _fail(self, message: str, exc: BaseException) -> None:
        self._failed = True
        self._error = message
        self._status = fmt.STATUS_CRASHED
        try:
            # Mark the run now: if the process dies later, the manifest already says why.
            self._write_manifest()
        except OSError:
            pass
        if self.on_error == "raise":
            raise RecorderError(message) from exc
        warnings.warn(
            f"trajscope: {message}; recording stopped and training continues. The run is marked "
            "incomplete; the steps written before stay valid.",
            RecorderWarning,
            stacklevel=4,
        )

    # --- manifest -----------------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        groups = []
        for names, group in zip(self._group_names, self.optimizer.param_groups):
            hyper = {k: _jsonable(v) for k, v in group.items() if k != "params"}
            groups.append({"params": names, **hyper})
        trainable = {n for n, _ in self._trainable}
        libraries = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "safetensors": getattr(safetensors, "__version__", "unknown"),
        }
        if self.format == fmt.STORAGE_HDF5:
            import h5py

            libraries["h5py"] = h5py.__version__
            libraries["hdf5"] = h5py.version.hdf5_version
        manifest = {
            "format_version": fmt.FORMAT_VERSION,
            "trajscope_version": _VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "libraries": libraries,
            "objective": self.objective,
            "storage": self.format,
            "schedule": self.schedule.to_json(),
            "accumulation": {"micro_batches": self.accumulation,
                             "reduction": self.accumulation_reduction},
            "batch_fn": self.batch_fn,
            "optimizer_state": self.optimizer_state,
            "distributed": {"world_size": self.world_size, "writer_rank": 0},
            "params": [
                {"name": n, "shape": list(p.shape), "dtype": dtype_name(p.dtype),
                 "trainable": n in trainable}
                for n, p in self._params
            ],
            "buffers": [
                {"name": n, "shape": list(b.shape), "dtype": dtype_name(b.dtype)}
                for n, b in self.model.named_buffers()
            ],
            "optimizer": {
                "class": f"{type(self.optimizer).__module__}.{type(self.optimizer).__qualname__}",
                "param_groups": groups,
            },
            "status": self._status,
            "error": self._error,
            "num_steps": self.step,
            "final_step": self.step if self._status == fmt.STATUS_COMPLETE else None,
            "metadata": self.metadata,
        }
        fmt.atomic_write_json(self.run_dir / fmt.MANIFEST, manifest)
