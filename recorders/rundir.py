"""The recorder's run directory: preparing it, and the writer that stores the snapshots in it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from trajscope import format as fmt
from trajscope.errors import RecorderError
from trajscope.recorders.storage import AsyncWriter, HDF5Writer, SafetensorsWriter, SlotPool

__all__ = ["prepare_run_dir", "open_writer"]


def prepare_run_dir(run_dir: Path, storage: str, *, overwrite: bool) -> None:
    """Create ``run_dir`` (or empty an existing run in it when ``overwrite``) for a new run.

    Raises:
        RecorderError: ``run_dir`` holds a run and ``overwrite`` is False.
    """
    manifest_path = run_dir / fmt.MANIFEST
    if manifest_path.exists():
        if not overwrite:
            raise RecorderError(
                f"{run_dir}: already holds a trajscope run; choose a new directory or "
                "pass overwrite=True"
            )
        # The report goes too: its figures would describe the replaced run.
        for name in (fmt.STEPS_DIR, fmt.ANALYSIS_DIR, fmt.REPORT_DIR):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        (run_dir / fmt.SCALARS).unlink(missing_ok=True)
        (run_dir / fmt.HDF5_FILE).unlink(missing_ok=True)
        manifest_path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    if storage == fmt.STORAGE_SAFETENSORS:
        (run_dir / fmt.STEPS_DIR).mkdir(exist_ok=True)


def open_writer(
    run_dir: Path,
    storage: str,
    declared: list[tuple[str, str, tuple[int, ...]]],
    *,
    slots: int,
    pin: bool,
    threaded: bool,
    direct_io: bool | None,
) -> tuple[SafetensorsWriter | HDF5Writer, AsyncWriter]:
    """The store of ``storage`` in ``run_dir`` and the writer that feeds it from ``slots`` buffers.

    Args:
        declared: (key, dtype, shape) of the tensors fixed for the whole run (HDF5 datasets).
        slots: snapshot buffers; the training thread waits when all hold unwritten snapshots.
        pin: page-lock the buffers (fast copies from a GPU).
        threaded: write on a background thread.
        direct_io: see :class:`SafetensorsWriter`.
    """
    pool = SlotPool(slots, pin=pin)
    store: SafetensorsWriter | HDF5Writer
    if storage == fmt.STORAGE_HDF5:
        store = HDF5Writer(run_dir / fmt.HDF5_FILE, declared,
                           {"trajscope_storage": fmt.STORAGE_HDF5, "format_version": fmt.FORMAT_VERSION})
        where: Callable[[int], str] = lambda s: f"{fmt.HDF5_FILE} (step {s})"  # noqa: E731
    else:
        store = SafetensorsWriter(run_dir, direct_io=direct_io)
        where = lambda s: f"{fmt.STEPS_DIR}/{fmt.step_filename(s)}"  # noqa: E731
    return store, AsyncWriter(store.write, where, pool, threaded=threaded)
