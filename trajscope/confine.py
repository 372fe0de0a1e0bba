"""Writes that stay inside a run (or analysis) directory, whoever made the directory.

A run directory may come from someone else, and anything in it may be a planted symlink: every
file trajscope creates, replaces or removes inside a run goes through these helpers, which refuse
a symlink or a special file at the path (``lstat``, ``O_NOFOLLOW``) with one error naming it.
Atomic replacement of regular files (temp file + rename) is :func:`trajscope.runformat.atomic_write_bytes`.
A directory the user names for output is checked once for a link anywhere along its path
(:func:`unsafe_component`) and created one real directory at a time (:func:`make_dirs`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from trajscope.errors import RunFormatError

__all__ = ["check_replaceable", "link_error", "make_dirs", "open_nofollow", "remove_entry", "safe_output_dir",
           "unsafe_component"]


def open_nofollow(path: Path, flags: int, what: str) -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, 0o644)`` for a file trajscope writes inside a
    run (or an analysis directory): never through a symlink.

    Raises:
        RunFormatError: :func:`link_error` if ``path`` is a symlink, else naming ``path``, ``what``
            it is and the reason it cannot be opened.
    """
    if os.path.islink(path):  # also where O_NOFOLLOW does not exist
        raise link_error(path)
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if os.path.islink(path):  # planted between the check and the open
            raise link_error(path) from None
        raise RunFormatError(f"{path}: cannot open {what} ({exc.strerror})") from exc


def link_error(path: Path) -> RunFormatError:
    """The error for a symlink where trajscope writes inside a run (or an analysis directory)."""
    return RunFormatError(
        f"{path}: is a symlink; trajscope writes only inside the run (or analysis) directory and "
        "will not follow it (remove the link)"
    )


def safe_output_dir(root: Path, *parts: str) -> Path:
    """Create (if needed) and return ``root/parts...``, refusing any component that is a symlink
    or not a directory, so that what trajscope writes under a run directory stays inside it even
    when the directory came from someone else.

    Raises:
        RunFormatError: if a component is a symlink or a non-directory.
    """
    path = Path(root)
    for part in parts:
        if part in ("", ".", "..") or "/" in part or os.sep in part:
            raise RunFormatError(f"{path}: refusing output directory component {part!r}")
        path = path / part
        if path.is_symlink():
            raise link_error(path)
        if path.exists() and not path.is_dir():
            raise RunFormatError(f"{path}: expected a directory, found a file")
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            raise RunFormatError(f"{path}: cannot create directory ({exc.strerror})") from exc
    return path


def unsafe_component(path: Path) -> tuple[Path, str] | None:
    """The first existing component of the absolute ``path``, from the root down, that is a symlink
    or not a directory (``lstat``: never followed), with what it is; None when there is none.

    ``path`` itself may be absent (then so are the components below the first absent one), or a
    directory. An output directory the user names is checked with it once, so that what is written
    there cannot be redirected by a link anywhere along the way.
    """
    for part in [*reversed(path.parents), path]:
        try:
            mode = os.lstat(part).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            return part, f"cannot be inspected ({exc.strerror})"
        if stat.S_ISLNK(mode):
            return part, "is a symlink"
        if not stat.S_ISDIR(mode):
            return part, "is not a directory"
    return None


def make_dirs(path: Path) -> Path:
    """Create the absolute ``path`` and its missing parents one real directory at a time
    (:func:`safe_output_dir` from the deepest existing ancestor), so a link planted at a missing
    component while they are created is refused, never followed; returns ``path``.

    Raises:
        RunFormatError: a component is a symlink or not a directory, or cannot be created.
    """
    base = path
    missing: list[str] = []
    while not os.path.lexists(base) and base.parent != base:
        missing.insert(0, base.name)
        base = base.parent
    if base.is_symlink():
        raise link_error(base)
    if not base.is_dir():
        raise RunFormatError(f"{base}: expected a directory, found a file")
    return safe_output_dir(base, *missing)


def check_replaceable(path: Path) -> None:
    """Raise unless ``path`` is absent, a regular file or a real directory (``lstat``: never
    followed): what trajscope may remove or replace inside a run directory.

    Raises:
        RunFormatError: naming ``path`` if it is a symlink or a FIFO, socket or device.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RunFormatError(f"{path}: cannot inspect ({exc.strerror})") from exc
    if stat.S_ISLNK(mode):
        raise link_error(path)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise RunFormatError(f"{path}: expected a regular file or a directory, found a special file")


def remove_entry(path: Path) -> None:
    """Remove the file or directory tree at ``path`` (absent is fine) after :func:`check_replaceable`
    (``shutil.rmtree`` never follows links found inside the tree)."""
    import shutil

    check_replaceable(path)
    try:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    except OSError as exc:
        raise RunFormatError(f"{path}: cannot remove ({exc.strerror})") from exc
