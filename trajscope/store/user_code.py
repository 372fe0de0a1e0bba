"""Code that a run names, imported only from the analyzing user's environment.

A run names code, never holds it: the objective (``"module:function"`` in the manifest) and a
recorded ``batch_fn``. :func:`import_named` imports such a name. It accepts two dotted Python
identifiers only (no paths, no relative imports), puts the current directory on ``sys.path`` (as
``python -m`` does) unless it lies inside a run directory, and refuses, before executing it, a module
that would be imported from inside a run directory: a run directory received from someone else can
select code already importable here, never bring its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from trajscope.errors import ObjectiveError, one_line
from trajscope.runformat import MANIFEST

__all__ = ["import_named"]


def import_named(spec: str, what: str = "objective") -> Any:
    """The object named by ``"module:attr.path"`` in the analyzing user's environment.

    ``spec`` must be two dotted Python identifiers (no paths, no relative imports): a name from a
    run directory can only ever select code already importable in the analyzing environment. The
    current directory is put on ``sys.path`` (as ``python -m`` does) unless it lies inside a run
    directory, and a module found inside a run directory is refused before it is executed.

    Raises:
        ObjectiveError: naming ``what``, ``spec`` and what went wrong.
    """
    if not isinstance(spec, str):
        raise ObjectiveError(f"{what} {spec!r}: expected a 'module:function' string")
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not _dotted(mod_name) or not _dotted(fn_name):
        raise ObjectiveError(
            f"{what} {spec[:200]!r}: expected 'module:function' made of dotted Python "
            "identifiers (e.g. 'train:make_objective'); file paths and relative imports are refused"
        )
    cwd = os.getcwd()
    cwd_run = _enclosing_run_dir(Path(cwd))
    if cwd not in sys.path and cwd_run is None:
        sys.path.insert(0, cwd)
    _refuse_run_dir_module(mod_name.partition(".")[0], spec, what)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        hint = (f" (the current directory is inside the run directory {cwd_run} and is not put on "
                "sys.path)") if cwd_run is not None else ""
        raise ObjectiveError(
            f"{what} {spec!r}: cannot import module {mod_name!r} ({one_line(exc)}){hint}; run "
            "from the directory that holds it or pass --objective MODULE:FUNCTION"
        ) from exc
    except (Exception, SystemExit) as exc:  # a module that exits on import (a script's sys.exit)
        raise ObjectiveError(
            f"{what} {spec!r}: importing module {mod_name!r} raised "
            f"{type(exc).__name__}: {one_line(exc)}{_exit_hint(exc)}"
        ) from exc
    obj: Any = module
    for part in fn_name.split("."):
        if not hasattr(obj, part):
            raise ObjectiveError(f"{what} {spec!r}: module {mod_name!r} has no attribute {fn_name!r}")
        obj = getattr(obj, part)
    return obj


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _enclosing_run_dir(path: Path) -> Path | None:
    """The run directory (a directory holding ``trajscope.json``) ``path`` is in, if any."""
    try:
        path = path.resolve()
    except OSError:
        return None
    for d in (path, *path.parents):
        if (d / MANIFEST).is_file():
            return d
    return None


def _refuse_run_dir_module(top: str, spec: str, what: str = "objective") -> None:
    """Refuse, before executing it, a top-level module that would be imported from a run dir."""
    if top in sys.modules:
        return  # already imported by the user's own code
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return  # import_module reports it
    if found is None:
        return
    places = [found.origin] if found.origin and found.has_location else []
    places += list(found.submodule_search_locations or [])
    for place in places:
        run_dir = _enclosing_run_dir(Path(place).parent if found.origin == place else Path(place))
        if run_dir is not None:
            raise ObjectiveError(
                f"{what} {spec!r}: module {top!r} would be imported from {place}, inside the run "
                f"directory {run_dir}; trajscope never runs code from a run directory (move the "
                "module out or run from another directory)"
            )


def _exit_hint(exc: BaseException) -> str:
    """For a SystemExit: that the module ran as a script (training unguarded by ``__main__``)."""
    if not isinstance(exc, SystemExit):
        return ""
    return ("; the module exits when imported: put its script part under "
            "`if __name__ == \"__main__\":`")
