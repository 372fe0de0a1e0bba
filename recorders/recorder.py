"""The :class:`Recorder`: saves x_t, g_t and the minibatch z_t of scheduled optimizer steps.

How it hooks in, and why it cannot change training:

* ``optimizer.register_step_pre_hook`` fires inside ``optimizer.step()`` right before the update,
  so the parameters are x_t and ``p.grad`` is g_t exactly as the optimizer consumes it (after any
  ``GradScaler.unscale_`` and gradient clipping done before ``step``). When ``step`` is given a
  closure (LBFGS, PyTorch Lightning), the gradient only exists once the closure has run inside
  ``step``: the pre-hook then wraps the closure and captures right after its first call.
* on recorded steps only, each trainable parameter's post-accumulate-grad hook measures the
  gradient before clipping (:class:`~trajscope.recorders.preclip.PreclipNorms`).
* ``optimizer.register_step_post_hook`` fires after the update; it advances the step counter and
  appends the step's line to ``scalars.jsonl``.
* a forward pre-hook on the model captures, for recorded steps only, the RNG state and the
  buffers as they were when the step's forward pass began (what dropout and BatchNorm used).
* the hooks are :class:`~trajscope.recorders.hooks.BoundHook` objects: they hold the recorder
  weakly and copy or pickle as inert hooks, so ``copy.deepcopy(model)``, ``torch.save(model)``
  and EMA copies work while recording and never call into the recorder.

Every capture is a copy made on the training thread before the optimizer mutates anything; the
recorder never writes into a parameter, gradient or buffer and never draws random numbers, so
training with and without it gives bit-identical results (tested). Only the file I/O runs on a
background thread (:mod:`trajscope.recorders.storage`).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from trajscope import runformat as fmt
from trajscope.errors import RecorderError
from trajscope.recorders import arguments, distributed, sharded
from trajscope.recorders.backends import HDF5Writer, SafetensorsWriter
from trajscope.recorders.capture import ParamIndex, micro_entry, snapshot_entries, step_micro_batches, unwrap_model
from trajscope.recorders.follow import start_follower
from trajscope.recorders.forward import StepCapture, capture_forward
from trajscope.recorders.hooks import BoundHook, attach, detach, step_closure, with_capture_after_first_call
from trajscope.recorders.manifest import build_manifest, objective_name, write_manifest
from trajscope.recorders.preclip import PreclipNorms
from trajscope.recorders.rundir import RunLock, open_writer, prepare_run_dir, release_lock
from trajscope.recorders.scalars import ScalarsLog, step_line
from trajscope.recorders.schedule import Schedule, as_schedule
from trajscope.recorders.stats import RecorderStats
from trajscope.recorders.storage import AsyncWriter

__all__ = ["Recorder", "RecorderStats", "RecorderWarning", "objective_name"]


class RecorderWarning(UserWarning):
    """What the recorder tells while training goes on: recording stopped (``on_error="warn"``), or a
    setting of the training program keeps a step from replaying exactly (a compiled model's dropout)."""


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
        model: the module being trained; a ``torch.compile``, DDP or DataParallel wrapper is
            unwrapped, so its parameters are recorded by the plain module's ``named_parameters`` names.
        optimizer: the optimizer whose steps define the trajectory. A wrapper (accelerate's
            ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, any object exposing
            ``.optimizer``) is unwrapped: the hooks go on the torch optimizer inside, and an
            accelerate wrapper's ``GradScaler`` is taken as ``grad_scaler``.
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
        metadata: JSON-serialisable user metadata stored in the manifest, within the readers' limits
            (``trajscope.runformat.MAX_METADATA_DEPTH`` levels, ``MAX_MANIFEST_BYTES`` as written).
        overwrite: replace an existing run in ``run_dir`` (its analysis included); refused while
            another recorder or an analysis holds the run (a run directory has one writer).
        grad_scaler: the AMP ``GradScaler`` of a loop that clips unscaled gradients: its scale
            divides the pre-clip norm, so the recorded clip factor is the clip's alone.
        grads: store g_t (default). False stores no gradient, only the names of the parameters
            that had one; the analyzer recomputes g_t on the step's minibatch (``docs/recording.md``).
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
        format: str = "safetensors",
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
        grad_scaler: Any = None,
        grads: bool = True,
    ) -> None:
        wrapper = optimizer  # accelerate's AcceleratedOptimizer, Lightning's: hooks go on the optimizer inside
        optimizer = arguments.check_arguments(model, optimizer, format, accumulation, accumulation_reduction,
                                              on_error, max_pending, grads)
        if (note := arguments.compiled_dropout_warning(model)) is not None:
            warnings.warn(note, RecorderWarning, stacklevel=2)
        self.run_dir = Path(run_dir)
        self.model = unwrap_model(model)
        self.compiled = arguments.inductor_compiled(model)
        self.optimizer = optimizer
        self.objective = objective_name(objective)
        self.schedule: Schedule = as_schedule(schedule, every, window)
        self.format = format
        self.accumulation = accumulation
        self.accumulation_reduction = accumulation_reduction
        self.batch_fn = objective_name(batch_fn, "batch_fn")
        self.optimizer_state = bool(optimizer_state)
        self.grads = grads
        self.async_write = bool(async_write)
        self.max_pending = max_pending
        self.on_error = on_error
        self.direct_io = direct_io
        self.metadata = arguments.json_metadata(metadata)
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # the manifest's `created`: when recording began
        self._overwrite = overwrite
        self.rank, self.world_size = distributed.rank_and_world()
        self._index = ParamIndex.of(self.model, optimizer)

        self.step = 0  # index of the next optimizer step: it moves x_step to x_{step+1}
        self._micro: list[dict[str, Any]] = []  # micro-batches named for the coming step
        self._capture = StepCapture()
        self.grad_scaler = grad_scaler if grad_scaler is not None else arguments.wrapped_grad_scaler(wrapper)
        self._preclip = PreclipNorms([p for _, p in self._index.trainable])
        self.sharding: sharded.Sharding | None = None  # FSDP: set by start()
        # Storage and hooks, set up by start(); storage only on the writing rank.
        self._scalars: ScalarsLog | None = None
        self._writer: AsyncWriter | None = None
        self._store: SafetensorsWriter | HDF5Writer | None = None
        self._lock: RunLock | None = None  # the run's recording lock, held from start to close
        self._handles: list[Any] = []
        self._status = fmt.STATUS_RECORDING
        self._stats = RecorderStats()
        self._failed = False  # recording stopped after an error (on_error="warn")
        self._error: str | None = None
        self._open = self._closed = False

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
        Raises RecorderError if a write failed and ``on_error="raise"``."""
        if self._writer is not None:
            self._writer.flush()
        self._check_writer()

    def follow(self, **options: Any) -> subprocess.Popen[bytes] | None:
        """Start ``trajscope analyze RUN --follow`` in a process of its own (``options``: ``device``, ``to``,
        ``target``, ``poll``, ``log``: :func:`trajscope.recorders.follow.start_follower`); None off rank 0."""
        if not self._open or self.objective is None and options.get("objective") is None:
            raise RecorderError("follow(): needs an open recorder whose run names its objective (Recorder("
                                "objective='module:function'), or follow(objective=...))")
        return start_follower(self.run_dir, **options) if self.is_writer else None

    @property
    def is_writer(self) -> bool:
        """True on the process that writes the run (rank 0 under data parallelism)."""
        return self.rank == 0

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(crashed=exc_type is not None)

    def start(self) -> Recorder:
        """Create the run directory, write the manifest, start the writer, attach the hooks; returns self."""
        if self._open:
            return self
        if self._closed:
            raise RecorderError(f"{self.run_dir}: this Recorder was closed; create a new one")
        if self.world_size > 1:
            self._start_distributed()
        elif self.is_writer:
            self._open_storage()
        opt, model = self.optimizer, self.model  # BoundHooks: both stay copyable and picklable
        self._handles = attach(self, [
            opt.register_step_pre_hook(BoundHook(self._pre_step, opt)),
            opt.register_step_post_hook(BoundHook(self._post_step, opt)),
            model.register_forward_pre_hook(BoundHook(self._pre_forward, model)),
        ])
        self._open = True
        self._arm_grad_hooks()
        return self

    def _start_distributed(self) -> None:
        """Every rank: the layout (FSDP, or refused), the run opened by rank 0, then the other
        writers' part writers (:func:`.sharded.layout`, :func:`.sharded.open_ranks`: collectives)."""
        self.sharding = sharded.layout(self.model, self._index.params, self.format, self.optimizer_state)
        sharded.open_ranks(self.sharding, self._open_storage, self.run_dir)

    def _open_storage(self) -> None:
        """The run directory, its manifest and scalars (rank 0), and this rank's snapshot writer."""
        if self.is_writer:
            self._lock = prepare_run_dir(self.run_dir, self.format, overwrite=self._overwrite)
        try:
            self._write_manifest()
            if self.is_writer:
                self._scalars = ScalarsLog(self.run_dir / fmt.SCALARS, self._fail)
            pin = torch.cuda.is_available() and any(p.is_cuda for _, p in self._index.params)
            self._store, self._writer = open_writer(
                self.run_dir, self.format, self._index.declared(self.model, self.grads), direct_io=self.direct_io,
                slots=self.max_pending if self.async_write else 1, pin=pin, threaded=self.async_write,
                sharding=self.sharding)
        except BaseException:  # a failed start leaves the run to the next recorder
            release_lock(self._lock)
            raise

    def close(self, *, crashed: bool = False) -> None:
        """Detach the hooks, save the final state x_T, wait for the writer, mark the run's status.

        ``crashed=True`` (what the ``with`` block passes when training raised) skips the final
        state and marks the run ``crashed``; the steps written so far stay readable.

        Raises:
            RecorderError: a write failed and ``on_error="raise"`` (the run is marked crashed).
        """
        if not self._open:
            return
        detach(self, self._handles)
        self._handles = []
        self._open = False
        self._arm_grad_hooks()
        self._closed = True
        if self.sharding is not None:
            self.sharding.unwatch_clip()
        if self._writer is None:  # a rank that writes nothing (data parallel, an FSDP replica)
            return
        pending: BaseException | None = None
        try:
            if not self._failed:
                if self._micro and self.is_writer:
                    # rec.batch was called but no step followed (the loop broke out, or AMP
                    # skipped the very last step): keep the line so scalars.jsonl stays complete.
                    self._write_scalars(skipped=True)
                self._index.refresh(self.optimizer, self.step)  # the final manifest's param groups
                if not crashed:
                    self._submit(self.step, fmt.KIND_FINAL)
                if self._scalars is not None:
                    self._scalars.flush_deferred(force=True)
        except RecorderError as exc:
            pending = exc
        finally:
            pending = self._close_storage(pending, crashed)
        if pending is not None and not crashed and self.on_error == "raise":
            raise pending
        if pending is not None and not crashed and not self._failed:  # on_error="warn", not said yet
            warnings.warn(f"trajscope: {pending}; the run is marked crashed, and the steps written before "
                          "stay valid.", RecorderWarning, stacklevel=2)

    def _close_storage(self, pending: BaseException | None, crashed: bool) -> BaseException | None:
        """Stop the writer, close the files and write the final manifest; the error to raise."""
        assert self._writer is not None and self._store is not None
        self._writer.close()
        if self.sharding is not None:
            self.sharding.disconnect()
        try:
            self._store.close()
        except Exception as exc:  # noqa: BLE001 - reported like any write failure
            if self._writer.error is None and self._error is None:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                self._error = f"{self.run_dir / fmt.HDF5_FILE}: closing failed ({reason})"
                pending = pending or RecorderError(self._error)
        if self._scalars is not None:
            self._scalars.close()
        try:
            self._check_writer()
        except RecorderError as exc:
            pending = pending or exc
        failed = crashed or self._failed or self._error is not None
        self._status = fmt.STATUS_CRASHED if failed else fmt.STATUS_COMPLETE
        try:
            self._write_manifest()
        except (OSError, RecorderError) as exc:  # a full disk; a manifest grown past the readers' limit
            if pending is None and self.on_error == "raise" and not crashed:
                pending = exc if isinstance(exc, RecorderError) else RecorderError(
                    f"{self.run_dir / fmt.MANIFEST}: cannot write ({exc.strerror or exc})")
        release_lock(self._lock)  # after the final manifest: until then the run is being recorded
        return pending
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
        self._capture.on_batch(len(self._micro))
        self._micro.append(micro_entry(self, batch, loss, weight))

    def capture_forward_state(self, autocast: torch.autocast | None = None) -> None:
        """Capture the RNG state and buffers now, as the state of the coming forward pass.

        The model's forward pre-hook does this by itself; call it (as the Lightning adapter does)
        when the loss is computed by a method other than the recorded model's ``forward``.
        ``autocast``: the ``torch.autocast`` the coming forward pass will run under, when it is not
        in force yet (Lightning enters its precision plugin's autocast inside ``training_step``).
        """
        if self._open and self._capture.pending is None and self.schedule(self.step):
            self._capture.pending = capture_forward(self.model, buffers=not self._micro, autocast=autocast)

    # --- hooks ----------------------------------------------------------------------------------

    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        # The first training forward since the last rec.batch() is the one whose dropout masks
        # and running statistics produced the coming micro-batch's loss; evaluation passes under
        # no_grad are ignored. Buffers are the step's first micro-batch's: later ones keep only RNG.
        if self._capture.pending is None and torch.is_grad_enabled() and self.schedule(self.step):
            t0, c0 = time.perf_counter(), time.thread_time()
            self._capture.pending = capture_forward(module, buffers=not self._micro)
            self._refresh_trainable()  # before backward: the pre-clip hooks cover what trains now
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
        closure = step_closure(args, kwargs)
        if closure is None:
            self._capture_step()
            return None
        # The gradient is computed inside step() by the closure: capture after its first call.
        return with_capture_after_first_call(args, kwargs, closure, self._timed_capture_step)

    def _timed_capture_step(self) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            self._capture_step()
        finally:
            self._timed(t0, c0)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if self.is_writer and not self._failed:
                self._write_scalars(skipped=False)
            self._micro = []
            self.step += 1
            self._capture.clear()
            if self.sharding is not None:
                self.sharding.clip = None  # FSDP1: a clip belongs to its step
            self._arm_grad_hooks()
            self._check_writer()
        finally:
            self._timed(t0, c0)

    def _refresh_trainable(self) -> None:
        """Follow a change of the trainable set (unfreezing, ``add_param_group``, freezing)."""
        if self._index.refresh(self.optimizer, self.step):
            self._preclip.track([p for _, p in self._index.trainable])

    def _arm_grad_hooks(self) -> None:
        """Arm the pre-clip hooks for a recorded step (:class:`PreclipNorms`) of a single process, or
        of FSDP2, whose hooks see the sharded gradient as the optimizer will (summed over the ranks)."""
        measured = self.world_size == 1 or self.sharding is not None and self.sharding.kind == "fsdp2"
        self._preclip.arm(self._open and not self._failed and measured and self.schedule(self.step))

    # --- capturing --------------------------------------------------------------------------------

    def _capture_step(self) -> None:
        if not self._micro:
            raise RecorderError(
                f"step {self.step}: optimizer.step() was called without rec.batch(...) for a "
                "recorded step; call rec.batch(batch, loss=loss) before every optimizer.step()"
            )
        micro = step_micro_batches(self._micro, self.accumulation_reduction)
        self._refresh_trainable()  # the step's snapshot names its own trainable set when it changed
        clip = dict(self.sharding.clip or {}) if self.sharding is not None else {}  # FSDP1's own clip
        self._preclip.measure(self.grad_scaler, clip, self.sharding)  # sharded: on every rank
        if self.world_size > 1:  # each rank's micro-batches travel to rank 0 with their RNG states
            gathered = distributed.gather_micro_batches(micro, self._capture.micro_rng(len(micro)))
            if gathered is None:  # not rank 0: its batches now travel with rank 0's snapshot
                if self.sharding is not None and self.sharding.writes:
                    self._submit(self.step, fmt.KIND_STEP)  # its part: pieces of x_t and g_t
                return
            micro, rngs = gathered
            self._capture.adopt_gathered(rngs)
        self._submit(self.step, fmt.KIND_STEP, micro, clip)

    def _submit(self, step: int, kind: str, micro: list[dict[str, Any]] | None = None,
                clip: dict[str, Any] | None = None) -> None:
        """Copy the snapshot of ``step`` (a part of it, without ``micro`` on a rank other than 0 of a
        sharded run) into a free slot and queue it for writing."""
        if self._failed or self._writer is None:
            return
        tensors, meta = snapshot_entries(self, self._index, step, kind, micro, clip, self._capture)
        self._writer.copy_and_submit(step, kind, meta, tensors, self._stats)

    # --- scalars ------------------------------------------------------------------------------------

    def _lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def _write_scalars(self, *, skipped: bool) -> None:
        assert self._scalars is not None  # only the writing rank writes scalars
        self._scalars.add(*step_line(self, self._micro, self._lrs(), skipped=skipped))

    # --- errors -------------------------------------------------------------------------------------

    def _check_writer(self) -> None:
        """Surface a background write failure on the training thread (once)."""
        err = self._writer.error if self._writer is not None else None
        if err is not None and not self._failed:
            self._fail(err.message(), err.exc)

    def _fail(self, message: str, exc: BaseException) -> None:
        self._failed, self._error, self._status = True, message, fmt.STATUS_CRASHED
        # Mark the run now: if the process dies later, the manifest already says why.
        with contextlib.suppress(OSError, RecorderError):  # the failure at hand is the one to report
            self._write_manifest()
        if self.on_error == "raise":
            raise RecorderError(message) from exc
        warnings.warn(f"trajscope: {message}; recording stopped and training continues. The run is marked "
                      "incomplete; the steps written before stay valid.", RecorderWarning, stacklevel=4)

    def _write_manifest(self) -> None:
        if not self.is_writer:
            return
        manifest = build_manifest(self, self._index, status=self._status, error=self._error)
        write_manifest(self.run_dir / fmt.MANIFEST, manifest, self._lock)
