"""The trackers trajscope logs to (``--to``): TensorBoard, MLflow, Weights & Biases.

Each is a :class:`Sink`, opened by :func:`open_sink` from a ``--to`` name and a target. What gets
logged, and when, is :mod:`trajscope.report.export`'s business. Adding a tracker means one class with
the four methods of :class:`Sink` and one entry in :data:`TRACKERS`.

Each tracker's library is an optional extra (``pip install 'trajscope[tensorboard]'``, ``[mlflow]``,
``[wandb]``), imported only when that tracker is used. A missing one is one
:class:`~trajscope.errors.TrajscopeError` naming the extra to install.

Targets, and how to log beside the training run's own curves:

* ``tensorboard LOGDIR``: a log directory. Use the trainer's own directory to see both in one
  TensorBoard run; trajscope adds an event file of its own.
* ``mlflow [URI]``: a tracking URI (default: MLflow's own, ``MLFLOW_TRACKING_URI``). The metrics go
  to the run named by ``MLFLOW_RUN_ID`` when it is set (the trainer's run, resumed), else to a new
  run ``trajscope <run>`` in the experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``trajscope``).
* ``wandb [ENTITY/PROJECT[/RUN_ID]]``: a project (default ``trajscope``), or a run to resume (the
  trainer's). Otherwise a new run goes to the group ``WANDB_RUN_GROUP`` (default: the run
  directory's name), so group the training run the same way to see both together. Every
  trajscope metric is plotted against its own x axis ``trajscope/step``: W&B drops a logged step
  lower than the run's last, and a post-hoc export logs steps the training run passed long ago.
  ``WANDB_MODE=offline`` writes locally; sync the run later with ``wandb sync``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trajscope.errors import TrajscopeError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PREFIX", "TRACKERS", "MLflowSink", "Sink", "TensorBoardSink", "WandbSink", "open_sink"]

PREFIX = "trajscope"
"""The namespace of every tag trajscope logs."""


class Sink(Protocol):
    """Where :func:`trajscope.report.export.export` logs: one tracker run."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` (tag → number) at training step ``step``."""

    def config(self, values: dict[str, Any]) -> None:
        """Log the run's metadata and the analysis settings (JSON-serializable values)."""

    def figure(self, tag: str, fig: Figure, step: int) -> None:
        """Log a matplotlib figure as an image at ``step``."""

    def close(self) -> None:
        """Flush and close (every logged value is on disk, or sent, after it returns)."""


def _missing(to: str) -> TrajscopeError:
    return TrajscopeError(f"--to {to} needs the {to} package: pip install 'trajscope[{to}]'")


class TensorBoardSink:
    """A TensorBoard log directory (event files), written by torch's ``SummaryWriter``."""

    def __init__(self, target: str | Path | None, name: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        if target is None:
            raise TrajscopeError("--to tensorboard needs a target: the log directory")
        self._w = SummaryWriter(log_dir=str(target))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._w.add_scalar(tag, value, global_step=step)

    def config(self, values: dict[str, Any]) -> None:
        text = json.dumps(values, indent=2, sort_keys=True, default=str)
        self._w.add_text(f"{PREFIX}/config", "    " + text.replace("\n", "\n    "), global_step=0)

    def figure(self, tag: str, fig: Figure, step: int) -> None:
        self._w.add_figure(tag, fig, global_step=step, close=True)

    def close(self) -> None:
        self._w.close()


class MLflowSink:
    """An MLflow run, through ``MlflowClient`` (no global active run is touched)."""

    def __init__(self, target: str | Path | None, name: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow") from None
        self._client = MlflowClient(str(target) if target is not None else None)
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", PREFIX)
            found = self._client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found is not None else self._client.create_experiment(experiment)
            run_id = self._client.create_run(exp_id, run_name=f"{PREFIX} {name}").info.run_id
            self._owned = True
        else:
            self._owned = False
        self.run_id = run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for tag, value in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def config(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(values)
        params = [Param(k[:250], json.dumps(v, default=str)[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self._client.log_batch(self.run_id, params=params[i:i + 100])

    def figure(self, tag: str, fig: Figure, step: int) -> None:
        import matplotlib.pyplot as plt

        self._client.log_figure(self.run_id, fig, f"{tag}.png")
        plt.close(fig)

    def close(self) -> None:
        if self._owned:
            self._client.set_terminated(self.run_id)


class WandbSink:
    """A Weights & Biases run of its own (or the one ``target`` names, resumed)."""

    def __init__(self, target: str | Path | None, name: str) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        parts = str(target).strip("/").split("/") if target is not None else []
        if len(parts) > 3:
            raise TrajscopeError(f"--to wandb {target}: expected PROJECT, ENTITY/PROJECT or ENTITY/PROJECT/RUN_ID")
        entity = parts[0] if len(parts) >= 2 else None
        project = parts[-1] if len(parts) in (1, 2) else parts[1] if len(parts) == 3 else PREFIX
        run_id = parts[2] if len(parts) == 3 else None
        self._wandb = wandb
        self._run = wandb.init(entity=entity, project=project, id=run_id, resume="allow" if run_id else None,
                               group=None if run_id else os.environ.get("WANDB_RUN_GROUP", name),
                               name=None if run_id else f"{PREFIX}-{name}", job_type=PREFIX, reinit="create_new")
        self._run.define_metric(f"{PREFIX}/step")
        self._run.define_metric(f"{PREFIX}/*", step_metric=f"{PREFIX}/step")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log({f"{PREFIX}/step": step, **values})

    def config(self, values: dict[str, Any]) -> None:
        self._run.config.update({PREFIX: values}, allow_val_change=True)

    def figure(self, tag: str, fig: Figure, step: int) -> None:
        import matplotlib.pyplot as plt

        self._run.log({f"{PREFIX}/step": step, tag: self._wandb.Image(fig)})
        plt.close(fig)

    def close(self) -> None:
        self._run.finish()


TRACKERS: dict[str, type] = {"tensorboard": TensorBoardSink, "mlflow": MLflowSink, "wandb": WandbSink}
"""``--to`` name → its :class:`Sink` (each installed by the extra of the same name)."""


def open_sink(to: str, target: str | Path | None, name: str = PREFIX) -> Sink:
    """The tracker ``to`` (a :data:`TRACKERS` name), logging to ``target`` (see the module
    docstring) for the run directory named ``name``.

    Raises:
        TrajscopeError: an unknown tracker, a missing or malformed target, or its library not installed.
    """
    if to not in TRACKERS:
        raise TrajscopeError(f"--to {to!r}: expected one of {', '.join(TRACKERS)}")
    sink: Sink = TRACKERS[to](target, name)
    return sink


def _flatten(values: dict[str, Any], prefix: str = PREFIX) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"trajscope.a.b": 1}`` (MLflow's params are flat)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out
