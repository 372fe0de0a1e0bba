"""The run's manifest (``trajscope.json``) as the recorder writes it.

The manifest describes the whole run: where the objective lives, the schedule, the parameters and
buffers with their shapes and dtypes, the optimizer's hyperparameters, and the run's status. The
recorder rewrites it at start, when recording fails, and at close: within the size readers accept,
and on a full disk too (:func:`write_manifest`).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch

from trajscope import runformat as fmt
from trajscope._version import VERSION
from trajscope.errors import RecorderError
from trajscope.recorders.arguments import encode_indented
from trajscope.recorders.capture import ParamIndex, Recording, jsonable, named_buffers
from trajscope.recorders.rundir import RunLock
from trajscope.recorders.storage import dtype_name

__all__ = ["objective_name", "library_versions", "build_manifest", "write_manifest"]


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
        module: str | None = getattr(objective, "__module__", None)
        qual: str | None = getattr(objective, "__qualname__", None)
        if not module or not qual or "<locals>" in qual or "<lambda>" in qual:
            raise RecorderError(
                f"{what}={objective!r}: a callable {what} must be a module-level function "
                "so the analyzer can import it; pass 'module:function' instead"
            )
        if module == "__main__":
            main_file = getattr(sys.modules.get("__main__"), "__file__", None)
            if main_file:
                module = Path(main_file).stem
        return f"{module}:{qual}"
    raise RecorderError(f"{what}={objective!r}: expected 'module:function' or a function")


def library_versions(storage: str) -> dict[str, str]:
    """Versions of the libraries that wrote the run (h5py and HDF5 only for an HDF5 run)."""
    libraries = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": getattr(safetensors, "__version__", "unknown"),
    }
    if storage == fmt.STORAGE_HDF5:
        import h5py  # only here: a safetensors run never imports h5py

        libraries["h5py"] = h5py.__version__
        libraries["hdf5"] = h5py.version.hdf5_version
    return libraries


def build_manifest(rec: Recording, index: ParamIndex, *, status: str, error: str | None) -> dict[str, Any]:
    """The manifest of ``rec``'s run as it stands now (``num_steps``: steps taken so far)."""
    groups = []
    for names, group in zip(index.group_names, rec.optimizer.param_groups):
        hyper = {k: jsonable(v) for k, v in group.items() if k != "params"}
        groups.append({"params": names, **hyper})
    trainable = index.initial  # a step whose trainable set differs records its own
    optimizer_class = type(rec.optimizer)
    sharding = rec.sharding
    return {
        "format_version": fmt.FORMAT_VERSION if sharding is None else fmt.SHARDED_FORMAT_VERSION,
        "trajscope_version": VERSION,
        "created": rec.created,
        "libraries": library_versions(rec.format),
        "objective": rec.objective,
        "storage": rec.format,
        "schedule": rec.schedule.to_json(),
        "accumulation": {"micro_batches": rec.accumulation,
                         "reduction": rec.accumulation_reduction},
        "batch_fn": rec.batch_fn,
        "optimizer_state": rec.optimizer_state,
        "grads": rec.grads,
        "distributed": {"world_size": rec.world_size, "writer_rank": 0,
                        **(sharding.manifest() if sharding is not None else {})},
        "compiled": rec.compiled,
        "params": [
            {"name": n, "shape": list(p.shape if sharding is None else sharding.global_shape(p)),
             "dtype": dtype_name(p.dtype),
             "trainable": n in trainable}
            for n, p in index.params
        ],
        "buffers": [
            {"name": n, "shape": list(b.shape), "dtype": dtype_name(b.dtype)}
            for n, b in named_buffers(rec.model)
        ],
        "optimizer": {
            "class": f"{optimizer_class.__module__}.{optimizer_class.__qualname__}",
            "param_groups": groups,
        },
        "status": status,
        "error": error,
        "num_steps": rec.step,
        "final_step": rec.step if status == fmt.STATUS_COMPLETE else None,
        "metadata": rec.metadata,
    }


_RESERVE_SLACK = 1 << 16
"""Bytes kept beyond two manifests' worth for the last rewrite: the error text, a few more groups."""


def write_manifest(path: Path, manifest: dict[str, Any], lock: RunLock | None) -> None:
    """Replace the manifest ``path`` with ``manifest`` atomically, keeping room for the next time.

    Each write first makes sure ``lock`` keeps a reserve of disk space for two such manifests
    (:meth:`~trajscope.recorders.rundir.RunLock.reserve`). A write that fails (a full disk) removes
    its temporary file, gives the reserve back and is tried once more: that is how a run whose
    snapshot write filled the disk still ends marked ``crashed`` with the cause in ``error``.

    Raises:
        RecorderError: the manifest is larger than :data:`~trajscope.runformat.MAX_MANIFEST_BYTES`,
            the most a reader accepts (nothing is written).
        OSError: the write failed with the reserve given back too, naming ``path``; no temporary
            file is left behind.
    """
    data = encode_indented(manifest) + b"\n"  # the size Recorder(metadata=...) was measured by
    if len(data) > fmt.MAX_MANIFEST_BYTES:
        raise RecorderError(
            f"{path}: the manifest would be {len(data)} bytes, more than the {fmt.MAX_MANIFEST_BYTES} "
            "bytes a reader accepts; record less metadata (or fewer parameter tensors)"
        )
    if lock is not None:
        lock.reserve(2 * len(data) + _RESERVE_SLACK)
    while True:
        try:
            fmt.atomic_write_bytes(path, data)
            return
        except OSError:  # atomic_write_bytes left no temporary and named the file
            if lock is None or not lock.free_reserve():
                raise
