"""Where an analysis is written and read: ``RUN/analysis`` by default, or a directory of the
user's choosing (``analyze(..., out=DIR)``, ``trajscope analyze RUN --out DIR``) so that a run
directory that cannot be written (a shared dataset, a mounted snapshot) can still be analyzed.

An analysis directory holds the same entries wherever it is (``metrics.nc``, ``pairs/``,
``.lock``: ``docs/format.md``), and is created and written through the same confinement helpers
(:func:`trajscope.confine.safe_output_dir` and the atomic writers). The readers
(:func:`trajscope.open_metrics`, :func:`trajscope.summarize`, :func:`trajscope.report.page.write_report`)
take the same directory as ``analysis=DIR`` (``--analysis DIR``).

Every directory the user names for output (``--out`` of ``analyze``, ``-o`` of ``report``) follows one
rule (:func:`output_dir`): it is made absolute once and used as such; it is refused when an
existing component is a symlink or not a directory, when it is a run directory, lies in a run's
storage, or lies inside a run directory that is not a run of the command. ``analyze`` also refuses,
unless forced, another run's ``analysis/`` and a directory whose ``metrics.nc`` is another run's or
not trajscope's (:func:`analysis_dir`).

An analysis knows its run: the Dataset's attrs ``run`` (the run's absolute path),
``run_manifest_sha256`` (the manifest's bytes) and ``run_identity`` (:func:`run_identity`). A reader
accepts it for a run (:func:`same_run`) whose manifest has those bytes, wherever the run lies now
(moved, copied), or which lies at ``run`` and has the same identity (a run analyzed while it
recorded, then closed; a run converted in place).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from trajscope import confine
from trajscope import runformat as fmt
from trajscope.errors import AnalysisError, RunFormatError, TrajscopeWarning, one_line

__all__ = ["analysis_dir", "check_read", "check_writable", "create_analysis_dir", "output_dir", "per_run",
           "run_identity", "same_run"]

PathLike = str | Path

STORAGE_ENTRIES = (fmt.STEPS_DIR, fmt.HDF5_FILE, fmt.MANIFEST, fmt.SCALARS, fmt.RECORDING_LOCK, fmt.PRUNED,
                   f".{fmt.STEPS_DIR}.converting", f".{fmt.HDF5_FILE}.converting")
"""The entries of a run directory that hold what was recorded: no output goes into them."""

IDENTITY_FIELDS = ("format_version", "trajscope_version", "objective", "schedule", "accumulation", "batch_fn",
                   "optimizer_state", "grads", "distributed", "compiled", "params", "buffers", "metadata")
"""The manifest fields the recorder writes at start and never changes: ``status``, ``error``,
``num_steps``, ``final_step`` and ``created`` are rewritten at close, the optimizer's groups follow
a schedule's learning rates and added groups, and ``convert`` changes ``storage``."""

SIGNATURE = ("trajscope_version", "run", "run_manifest_sha256")
"""The attrs every metrics Dataset trajscope writes has: a file without them is not trajscope's."""

ANALYSIS_WHAT = f"the analysis (it receives {fmt.METRICS_FILE} and {fmt.PAIRS_DIR}/)"


def analysis_dir(run_dir: Path, out: PathLike | None, *, force: bool = False) -> Path:
    """The analysis directory of the run in ``run_dir``: ``out`` (made absolute once, checked by
    :func:`output_dir`) or ``run_dir/analysis``; checked to be writable (:func:`check_writable`).

    ``out`` may not be another run's ``analysis/`` nor hold a ``metrics.nc`` of another run or one
    trajscope did not write, unless ``force``: then a :class:`TrajscopeWarning` says what is replaced.

    Raises:
        AnalysisError: the directory cannot be written (the message suggests ``--out``), or ``out``
            breaks :func:`output_dir`'s rule or belongs to another run (without ``force``).
    """
    if out is None:
        path = run_dir / fmt.ANALYSIS_DIR
        check_writable(path, "the analysis", "pass --out DIR (analyze(..., out=DIR)) to write it elsewhere")
        return path
    path, owner = output_dir(out, ANALYSIS_WHAT, [run_dir], analysis=True)
    _claim(path, run_dir, owner, f"out={str(out)!r}", force)
    check_writable(path, "the analysis", "pass --out DIR (analyze(..., out=DIR)) naming a directory you can write")
    return path


def output_dir(path: PathLike, what: str, own: Sequence[PathLike], *,
               analysis: bool = False) -> tuple[Path, Path | None]:
    """``path``, a directory the user named for output, made absolute (lexically: ``..`` is folded
    before anything is looked up) and checked; with the run whose ``analysis/`` it is, when
    ``analysis`` and that run is not in ``own`` (None otherwise: for :func:`analysis_dir` to decide).

    Refused: an existing component that is a symlink or not a directory; a run directory (one
    holding a manifest); anything in a run's storage (:data:`STORAGE_ENTRIES`); anything inside a
    run directory that is not in ``own`` (the runs of the command), but its ``analysis/`` when
    ``analysis``.

    Raises:
        AnalysisError: ``out=<path>: <why>``, naming the component or run at fault.
    """
    named = f"out={str(path)!r}"
    absolute = Path(os.path.abspath(path))
    bad = confine.unsafe_component(absolute)
    if bad is not None:
        part, problem = bad
        real = ""
        if problem == "is a symlink":
            real = f" (name the directory by its real path, {os.path.realpath(absolute)})"
        raise AnalysisError(f"{named}: {part} {problem}; output is written only through real directories{real}")
    mine = {Path(os.path.realpath(r)) for r in own}
    owner = None
    for run in _runs_around(absolute):
        rel = absolute.relative_to(run).parts
        if not rel:
            raise AnalysisError(f"{named}: is a run directory; name a directory of its own for {what}")
        if rel[0] in STORAGE_ENTRIES:
            raise AnalysisError(f"{named}: lies in the storage of run {run} ({run / rel[0]}); name a directory "
                                f"outside it for {what}")
        if run in mine:
            continue
        if analysis and rel == (fmt.ANALYSIS_DIR,):
            owner = run
            continue
        raise AnalysisError(f"{named}: lies inside another run, {run}; name a directory outside it for {what}")
    return absolute, owner


def _runs_around(path: Path) -> Iterator[Path]:
    """``path`` and each of its ancestors that holds a manifest (a run directory), nearest first."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate / fmt.MANIFEST):
            yield candidate


def _claim(path: Path, run_dir: Path, owner: Path | None, named: str, force: bool) -> None:
    """Refuse (or, with ``force``, warn of) writing the analysis of ``run_dir`` into ``path`` when
    ``path`` is the ``analysis/`` of run ``owner`` or its ``metrics.nc`` is not this run's."""
    held = _held(path / fmt.METRICS_FILE, run_dir)
    if owner is None and held is None:
        return
    found = held or f"is the analysis directory of run {owner}, not of run {run_dir}"
    if not force:
        raise AnalysisError(f"{named}: {found}; name a directory of its own for the analysis of {run_dir}, "
                            "or pass --force (force=True) to replace it")
    warnings.warn(f"{named}: {found}; replacing it with the analysis of run {run_dir} (--force)",
                  TrajscopeWarning, stacklevel=4)


def _held(metrics: Path, run_dir: Path) -> str | None:
    """What ``metrics`` holds when it is a regular file that is not an analysis of ``run_dir``
    (another run's, or not trajscope's); None otherwise. A link or special file there is not read:
    the Dataset's rename replaces it."""
    try:
        if not stat.S_ISREG(os.lstat(metrics).st_mode):
            return None
    except OSError:
        return None
    attrs = _netcdf_attrs(metrics)
    if attrs is None or _unsigned(attrs) is not None:
        return f"holds {metrics}, which trajscope did not write"
    if same_run(attrs, run_dir):
        return None
    return f"holds the analysis of run {one_line(attrs['run'], 300)} ({metrics}), not of run {run_dir}"


def _netcdf_attrs(path: Path) -> dict[str, Any] | None:
    """The global attributes of the netCDF file ``path`` (a regular file), None if it is not one."""
    import netCDF4

    try:
        with netCDF4.Dataset(path, "r") as nc:
            return {k: nc.getncattr(k) for k in nc.ncattrs()}
    except (OSError, ValueError, RuntimeError):
        return None


def _unsigned(attrs: Mapping[str, Any]) -> str | None:
    """The first attr of :data:`SIGNATURE` missing from ``attrs`` (or not a string); None when all are there."""
    return next((k for k in SIGNATURE if not isinstance(attrs.get(k), str)), None)


def check_read(attrs: Mapping[str, Any], run_dir: Path, path: Path) -> None:
    """Raise unless ``attrs`` (of the Dataset read from ``path``) are a trajscope analysis of the run
    in ``run_dir`` (:func:`same_run`).

    Raises:
        RunFormatError: naming ``path`` and, for another run's analysis, both runs.
    """
    missing = _unsigned(attrs)
    if missing is not None:
        raise RunFormatError(f"{path}: not written by trajscope (no {missing!r} attribute), so not a metrics "
                             f"Dataset; write one with `trajscope analyze {run_dir}`")
    if not same_run(attrs, run_dir):
        raise RunFormatError(f"{path}: holds the analysis of run {one_line(attrs['run'], 300)}, not of run "
                             f"{run_dir}; read the analysis of {run_dir}, or write it with "
                             f"`trajscope analyze {run_dir}`")


def same_run(attrs: Mapping[str, Any], run_dir: Path) -> bool:
    """Whether a Dataset with ``attrs`` is an analysis of the run now in ``run_dir``: its manifest
    has the bytes the analysis read (wherever the run lies: moved, copied), or the run lies where the
    analysis found it (``run``) and has its :func:`run_identity` (the manifest rewritten since: a run
    analyzed while recording, then closed; a run converted in place). A manifest that cannot be read
    or parsed, or a Dataset without ``run_identity``, leaves the path to decide."""
    raw = _manifest_bytes(run_dir)
    if raw is not None and attrs.get("run_manifest_sha256") == hashlib.sha256(raw).hexdigest():
        return True
    if not _same_dir(attrs.get("run"), run_dir):
        return False
    recorded = attrs.get("run_identity")
    manifest = _parsed(raw)
    if not isinstance(recorded, str) or manifest is None:
        return True
    return recorded == run_identity(manifest, complete=attrs.get("run_status") == fmt.STATUS_COMPLETE)


def run_identity(manifest: Mapping[str, Any], *, complete: bool) -> str:
    """SHA-256 of the manifest's :data:`IDENTITY_FIELDS` (canonical JSON), and of ``created`` when the
    run was ``complete`` when analyzed: a complete run's manifest is rewritten only by ``convert``,
    which keeps ``created``, while a recording one gets a new ``created`` at close."""
    fields = {k: manifest.get(k) for k in IDENTITY_FIELDS}
    if complete:
        fields["created"] = manifest.get("created")
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _manifest_bytes(run_dir: Path) -> bytes | None:
    try:
        return fmt.read_bounded(run_dir / fmt.MANIFEST, fmt.MAX_MANIFEST_BYTES, "manifest")
    except RunFormatError:
        return None


def _parsed(raw: bytes | None) -> dict[str, Any] | None:
    """The manifest parsed from ``raw``; None when it is not a JSON object."""
    if raw is None:
        return None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return manifest if isinstance(manifest, dict) else None


def _same_dir(recorded: Any, run_dir: Path) -> bool:
    """Whether the path ``recorded`` (from a Dataset) names ``run_dir``, symlinks resolved."""
    if not isinstance(recorded, str):
        return False
    try:
        return os.path.realpath(recorded) == os.path.realpath(run_dir)
    except (ValueError, OSError):  # a NUL in a path from a file
        return False


def check_writable(path: Path, what: str, hint: str) -> None:
    """Raise unless this process may create or write ``path``: its nearest existing ancestor
    (``path`` itself when it exists) must be a directory it can write and enter (``os.access``,
    which also answers for a read-only mount).

    Raises:
        AnalysisError: ``<ancestor>: not writable, so <what> cannot be written to <path>; <hint>``.
    """
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise AnalysisError(f"{existing}: not writable, so {what} cannot be written to {path}; {hint}")


def create_analysis_dir(path: Path) -> None:
    """Create ``path`` (and its missing parents) and ``path/pairs``; each directory created, ``path``
    and ``pairs`` must be real directories, never symlinks (:func:`trajscope.confine.make_dirs`,
    :func:`trajscope.confine.safe_output_dir`).

    Raises:
        RunFormatError: a component is a symlink or not a directory, or cannot be created.
    """
    if not path.parent.is_dir():
        confine.make_dirs(path.parent)  # one real directory at a time: a link planted meanwhile is refused
    confine.safe_output_dir(path.parent, path.name, fmt.PAIRS_DIR)


def per_run(analysis: PathLike | Sequence[PathLike | None] | None, n: int) -> list[Path | None]:
    """``analysis=`` of a reader given ``n`` runs, as one entry per run (None: ``RUN/analysis``):
    None, one directory (for one run), or a sequence of ``n`` entries.

    Raises:
        AnalysisError: the count differs from the runs'.
    """
    if analysis is None:
        return [None] * n
    dirs = [analysis] if isinstance(analysis, (str, Path)) else list(analysis)
    if len(dirs) != n:
        raise AnalysisError(
            f"analysis: expected one directory per run ({n} run(s), {len(dirs)} director"
            f"{'y' if len(dirs) == 1 else 'ies'})"
        )
    return [None if d is None else Path(d) for d in dirs]
