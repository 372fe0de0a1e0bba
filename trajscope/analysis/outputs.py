"""Where an analysis is written and read: ``RUN/analysis`` by default, or a directory of the
user's choosing (``analyze(..., out=DIR)``, ``trajscope analyze RUN --out DIR``) so that a run
directory that cannot be written (a shared dataset, a mounted snapshot) can still be analyzed.

An analysis directory holds the same entries wherever it is (``metrics.nc``, ``pairs/``,
``.lock``: ``docs/format.md``), and is created and written through the same confinement helpers
(:func:`trajscope.confine.safe_output_dir` and the atomic writers). The readers
(:func:`trajscope.open_metrics`, :func:`trajscope.summarize`, :func:`trajscope.report.page.write_report`)
take the same directory as ``analysis=DIR`` (``--analysis DIR``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from trajscope import confine
from trajscope import runformat as fmt
from trajscope.errors import AnalysisError, RunFormatError

__all__ = ["analysis_dir", "check_writable", "create_analysis_dir", "per_run"]

PathLike = str | Path


def analysis_dir(run_dir: Path, out: PathLike | None) -> Path:
    """The analysis directory of the run in ``run_dir``: ``out`` (made absolute, so that ``.`` and
    ``..`` name a directory) or ``run_dir/analysis``; checked to be writable (:func:`check_writable`).

    Raises:
        AnalysisError: the directory cannot be written (the message suggests ``--out``), or
            ``out`` is a run directory itself.
    """
    if out is None:
        path = run_dir / fmt.ANALYSIS_DIR
        check_writable(path, "the analysis", "pass --out DIR (analyze(..., out=DIR)) to write it elsewhere")
        return path
    path = Path(os.path.abspath(out))
    if (path / fmt.MANIFEST).exists():
        raise AnalysisError(
            f"out={str(out)!r}: is a run directory; name a directory of its own for the analysis "
            f"(it receives {fmt.METRICS_FILE} and {fmt.PAIRS_DIR}/)"
        )
    check_writable(path, "the analysis", "pass --out DIR (analyze(..., out=DIR)) naming a directory you can write")
    return path


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
    """Create ``path`` (and its missing parents) and ``path/pairs``; ``path`` and ``pairs`` must be
    real directories, never symlinks (:func:`trajscope.confine.safe_output_dir`).

    Raises:
        RunFormatError: a component is a symlink or not a directory, or cannot be created.
    """
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFormatError(f"{path.parent}: cannot create directory ({exc.strerror})") from exc
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
