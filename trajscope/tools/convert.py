"""``trajscope convert``: rewrite a run's snapshots in the other storage format.

The stored tensors and metadata are copied bit for bit (bf16/fp16 included); only the container
changes. In place, the new storage is written under temporary names, moved into place, and the
manifest switched to it before the old storage is removed, so a conversion killed at any point
leaves a run that reads correctly (in one format or the other).

A sharded run (format version 3: each snapshot in parts, :mod:`trajscope.store.shards`) converts
to an unsharded one, in either format: its snapshots are written whole and its ``shards/``
removed, and the manifest says format version 2. To safetensors in place, each step file is
replaced whole where it is (each by a rename, so every step reads at any point).

Every name the conversion writes, renames or removes inside the run (the storage of either
format and its temporary name) must be a regular file, a real directory or absent: a symlink
planted there is refused before anything is written, so nothing outside the run is touched. A
run that is being recorded (its recorder holds ``RUN/.recording.lock``) is refused: the recorder
would go on writing the storage that the conversion removes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trajscope import confine
from trajscope import runformat as fmt
from trajscope.errors import RunFormatError
from trajscope.store.run import Run, open_run

__all__ = ["convert_run"]


def _declared(run: Run) -> list[tuple[str, str, tuple[int, ...]]]:
    """The fixed-shape tensors of the run (HDF5 datasets), from the manifest: no gradient for a run
    that stores none (``"grads": false``)."""
    out = []
    for p in run.manifest["params"]:
        shape = tuple(int(s) for s in p["shape"])
        dtype = str(p.get("dtype", "float32"))
        out.append((fmt.PARAM + p["name"], dtype, shape))
        if p.get("trainable", True) and run.grads_recorded:
            out.append((fmt.GRAD + p["name"], dtype, shape))
    for b in run.manifest.get("buffers", []):
        if isinstance(b, dict) and "name" in b and "shape" in b:
            out.append((fmt.BUFFER + b["name"], str(b.get("dtype", "float32")),
                        tuple(int(s) for s in b["shape"])))
    return out


def _write_all(run: Run, to: str, dest: Path, tmp_name: str) -> Path:
    """Write every snapshot of ``run`` in format ``to`` under ``dest/tmp_name``; return that path."""
    from trajscope.recorders.backends import HDF5Writer, SafetensorsWriter

    target = dest / tmp_name
    confine.remove_entry(target)  # a leftover of a killed conversion; a planted link is refused
    if to == fmt.STORAGE_HDF5:
        _copy_steps(run, HDF5Writer(target, _declared(run), {"trajscope_storage": fmt.STORAGE_HDF5,
                                                             "format_version": fmt.FORMAT_VERSION}))
    else:
        _copy_steps(run, SafetensorsWriter(dest, direct_io=False, steps_dir=target))
    return target


def _copy_steps(run: Run, writer: Any) -> None:
    """Write every snapshot of ``run``, read whole (a sharded one reassembled), with ``writer``
    (a storage writer of the recorder's), and close it."""
    from trajscope.recorders.storage import Slot, build_image

    slot = Slot()
    try:
        for step in run.steps:
            meta, tensors = run.storage.read_raw(step)
            image = build_image(slot, step, str(meta.get("kind", fmt.KIND_STEP)), meta,
                                list(tensors.items()))
            writer.write(image)
    finally:
        writer.close()


def _unshard_in_place(run: Run) -> None:
    """Rewrite each step file of the sharded safetensors run ``run`` whole, in ``steps/`` itself:
    each replaces its step file by a rename, so a conversion killed at any point leaves every step
    readable, sharded or whole. Its parts in ``shards/`` are removed after the manifest switch."""
    from trajscope.recorders.backends import SafetensorsWriter

    _copy_steps(run, SafetensorsWriter(run.path, direct_io=False))


def _check_not_recording(run: Run, force: bool) -> None:
    """Refuse to rewrite a run in place while its recorder may still write it.

    A live recorder holds ``RUN/.recording.lock``: such a run is refused even with ``force``. A
    run marked ``recording`` whose lock nobody holds lost its recorder (killed) and is converted.
    Without a lock to test (runs recorded without one), ``force`` says the recorder is gone.
    """
    if run.status != fmt.STATUS_RECORDING:
        return
    alive = fmt.recorder_alive(run.path)
    if alive:
        raise RunFormatError(
            f"{run.path / fmt.RECORDING_LOCK}: the run is being recorded (its recorder holds this lock); "
            "converting it in place would remove the storage the recorder writes: wait for the "
            "recorder to close, or convert a copy with --out"
        )
    if alive is None and not force:
        raise RunFormatError(
            f"{run.path / fmt.MANIFEST}: status is 'recording': the run may still be being recorded, "
            "and converting it in place would remove the storage its recorder writes; wait for the "
            "recorder to close, convert a copy with --out, or pass --force if the recorder is gone"
        )


def convert_run(run_dir: str | Path, to: str, *, out: str | Path | None = None,
                keep: bool = False, force: bool = False) -> Path:
    """Convert the run in ``run_dir`` to storage ``to`` (``"hdf5"`` or ``"safetensors"``).

    Args:
        run_dir: the run to convert.
        to: the target storage format.
        out: write a converted copy there (a new or empty directory) and leave ``run_dir`` as is.
            Without it the run is converted in place.
        keep: in place, keep the old storage files next to the new ones (the manifest names which
            one is read); refused for a sharded safetensors run converted to safetensors, which is
            rewritten where it lies.
        force: in place, convert a run whose manifest status is ``recording`` and that has no
            recording lock to test (a run with a live recorder is refused even so).

    Returns:
        The directory holding the converted run.

    Raises:
        RunFormatError: for an unknown format, an unreadable source, a non-empty ``out``, a
            symlink or special file where the conversion writes, ``keep`` where nothing can be
            kept, or (without ``force``) a run still marked ``recording``.
    """
    if to not in fmt.STORAGES:
        raise RunFormatError(f"to={to!r}: expected one of {', '.join(fmt.STORAGES)}")
    run = open_run(run_dir)
    src_kind = run.storage.kind
    sharded = os.path.lexists(run.path / fmt.SHARDS_DIR) or run.manifest["format_version"] > fmt.FORMAT_VERSION
    if out is None and src_kind == to and not sharded:
        return run.path
    # Converted snapshots are whole: the run is an unsharded one (``distributed`` still says how it
    # was trained).
    manifest = {**run.manifest, "storage": to, "format_version": min(run.manifest["format_version"],
                                                                     fmt.FORMAT_VERSION)}
    final_name = fmt.HDF5_FILE if to == fmt.STORAGE_HDF5 else fmt.STEPS_DIR
    if out is not None:
        dest = Path(out)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise RunFormatError(f"{dest}: already exists and is not an empty directory")
        dest.mkdir(parents=True, exist_ok=True)
        tmp = _write_all(run, to, dest, f".{final_name}.converting")
        tmp.rename(dest / final_name)
        scalars = run.path / fmt.SCALARS
        if scalars.exists():  # read as the reader does: a regular file (a FIFO would block)
            fmt.atomic_write_bytes(dest / fmt.SCALARS, fmt.read_file_bytes(scalars, "scalars"))
        fmt.atomic_write_json(dest / fmt.MANIFEST, manifest)
        return dest
    if keep and src_kind == to:
        raise RunFormatError(f"{run.path}: --keep: a sharded run converted to {to} in place is rewritten in "
                             f"{fmt.STEPS_DIR}/ itself, so its old storage cannot be kept; convert a copy with --out")
    _check_not_recording(run, force)
    _convert_in_place(run, to, manifest, keep=keep)
    return run.path


def _convert_in_place(run: Run, to: str, manifest: dict[str, Any], *, keep: bool) -> None:
    """Convert ``run`` to ``to`` in its own directory, then write ``manifest``: see :func:`convert_run`."""
    dest = run.path
    final_name = fmt.HDF5_FILE if to == fmt.STORAGE_HDF5 else fmt.STEPS_DIR
    old_name = fmt.STEPS_DIR if run.storage.kind == fmt.STORAGE_SAFETENSORS else fmt.HDF5_FILE
    for name in (f".{final_name}.converting", final_name, old_name, fmt.SHARDS_DIR):
        confine.check_replaceable(dest / name)  # refuse planted links before writing anything
    from trajscope.recorders.rundir import holding_run  # the recorder's own lock, imported when used

    # The run's one writer meanwhile: a recorder starting into it (overwrite=True) is refused.
    with holding_run(dest, "trajscope convert"):
        if final_name == old_name:  # a sharded safetensors run, made whole where it is
            _unshard_in_place(run)
        else:
            tmp = _write_all(run, to, dest, f".{final_name}.converting")
            final = dest / final_name
            confine.remove_entry(final)  # a leftover of an earlier conversion with keep=True
            tmp.rename(final)
        fmt.atomic_write_json(dest / fmt.MANIFEST, manifest)  # the switch: readers now use `to`
        if not keep:
            if final_name != old_name:
                confine.remove_entry(dest / old_name)
            confine.remove_entry(dest / fmt.SHARDS_DIR)  # the parts, now in whole snapshots
