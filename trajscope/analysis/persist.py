"""What an analysis keeps on disk besides the Dataset: per-pair results and the run's lock.

Each finished pair is persisted by the task that computed it, in two files:

* ``analysis/pairs/pair_<t>.safetensors``: everything but the reference part, tagged with the
  digest of the probe settings (the reference step aside) and objective (:func:`settings_digest`);
* ``analysis/pairs/ref_<t>.safetensors``: the reference part (f(x*; z_t), ⟨G0, x_t − x*⟩,
  :mod:`trajscope.probe.reference_point`), tagged with that digest, the step of x* and its snapshot's identity
  (:func:`reference_digest`).

Each file also records the identities of what it was computed from (:class:`Tag`, :data:`Inputs`):
the recording (:attr:`trajscope.store.run.Run.identity`) and every snapshot it read
(:meth:`trajscope.store.run.Run.identities`). A result whose inputs differ from the run's current ones (a
snapshot replaced or rewritten, a run recorded anew in its directory) is recomputed, never reused:
the digests name how a pair was computed, the inputs what it was computed from.

In an analysis directory other than ``RUN/analysis`` the pairs' digest also covers the run's
path (:func:`pairs_digest`).

So an interrupted analysis (even SIGKILL) resumes where it stopped, new recorded steps only cost
their new pairs, and a new reference point only costs the reference parts. Pairs that take less
than :data:`PERSIST_EVERY_S` are written in groups (:func:`grouped_writes`): a kill loses at most
that much finished work. ``analysis/.lock`` keeps two analyses from writing one run's
``analysis/`` at once. :class:`PairTable` holds every pair's results in memory until the Dataset
is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from trajscope import confine
from trajscope import runformat as fmt
from trajscope.errors import AnalysisError, RunFormatError
from trajscope.metrics.pair import PairStats
from trajscope.probe.reference_point import ReferencePart, merge
from trajscope.probe.settings import ProbeSettings

__all__ = ["PERSIST_EVERY_S", "VERSION", "Inputs", "PairTable", "Tag", "analysis_lock", "grouped_writes", "later",
           "load_pair", "load_reference", "pair_path", "pairs_digest", "reference_digest", "reference_inputs",
           "reference_path", "remove_stale_temporaries", "same_inputs", "save_pair", "save_reference",
           "settings_digest"]

from trajscope._version import VERSION

"""The analyzer's version: part of the settings digest, and written into the Dataset."""


# --- per-pair partial results --------------------------------------------------------------------


def pair_path(pairs_dir: Path, step: int) -> Path:
    return pairs_dir / f"pair_{step:08d}.safetensors"


def reference_path(pairs_dir: Path, step: int) -> Path:
    """Where the reference part of pair ``step`` is persisted (next to the pair's other results)."""
    return pairs_dir / f"ref_{step:08d}.safetensors"


Inputs = Mapping[str, str | None]
"""What a persisted result was computed from: role → identity. Roles: ``run`` (the recording:
:attr:`trajscope.store.run.Run.identity`), and the snapshots read (:meth:`trajscope.store.run.Run.identities`):
``x_t`` and ``x_next`` (the pair), ``x_prev`` (x_{t−1}, when recorded) and ``x_0`` (when recorded);
a reference part reads ``x_t`` alone (x* is in its digest). None: the snapshot could not be read."""


@dataclasses.dataclass(frozen=True)
class Tag:
    """What a persisted file is tagged with: the ``digest`` of how it was computed
    (:func:`settings_digest`, :func:`pairs_digest`, :func:`reference_digest`) and the identities of
    the ``inputs`` it was computed from."""

    digest: str
    inputs: Inputs = dataclasses.field(default_factory=dict)


def same_inputs(recorded: str | None, current: Inputs) -> bool:
    """Whether a result whose metadata records ``recorded`` (the JSON of its :data:`Inputs`) was
    computed from the inputs ``current`` names: the same roles, each with the same identity.

    A snapshot that cannot be read (current identity None) is not held against the result: a damaged
    snapshot holds no other data, and a result computed while it was whole stays the best account
    of it (a damaged snapshot costs only the pairs that must read it). A result that records no
    inputs (written by an older trajscope) is recomputed.
    """
    try:
        then = json.loads(recorded) if recorded is not None else None
    except ValueError:
        return False
    if not isinstance(then, dict) or then.keys() != current.keys():
        return False
    return all(ident is None or then[role] == ident for role, ident in current.items())


def reference_inputs(inputs: Inputs) -> dict[str, str | None]:
    """The inputs of a pair's reference part, of those of the pair (:data:`Inputs`)."""
    return {role: inputs[role] for role in ("run", "x_t") if role in inputs}


def save_pair(path: Path, stats: PairStats, tag: Tag | str) -> None:
    """Persist a pair's results (its reference part aside), tagged with ``tag`` (a bare digest: no
    inputs recorded)."""
    _save(path, stats.to_tensors(), {**_tag_meta(tag), "step": str(stats.step),
                                     "layers": json.dumps(list(stats.layers))})


def load_pair(path: Path, digest: str, inputs: Inputs | None = None) -> PairStats | None:
    """A persisted pair if it exists, was computed with the same settings and (unless ``inputs``
    is None) from the same inputs (:func:`same_inputs`), else None."""
    found = _load(path, digest)
    if found is None or (inputs is not None and not same_inputs(found[0].get("inputs"), inputs)):
        return None
    return _pair(*found)


def _pair(meta: dict[str, str], tensors: dict[str, np.ndarray]) -> PairStats | None:
    """The pair a persisted file's (metadata, arrays) hold; None if they do not parse."""
    try:
        return PairStats.from_tensors(int(meta["step"]), tuple(json.loads(meta["layers"])), tensors)
    except Exception:  # noqa: BLE001 - a damaged partial result is simply recomputed
        return None


def save_reference(path: Path, part: ReferencePart, tag: Tag | str) -> None:
    """Persist a pair's reference part, tagged with :func:`reference_digest` and its inputs."""
    _save(path, part.to_tensors(), {**_tag_meta(tag), "step": str(part.step), "reference": str(part.reference),
                                    "layers": json.dumps(list(part.layers))})


def load_reference(path: Path, digest: str, layers: tuple[str, ...],
                   inputs: Inputs | None = None) -> ReferencePart | None:
    """A persisted reference part if it exists, was computed for the same settings and x*
    (``digest``), from the same inputs (unless ``inputs`` is None) and covers ``layers`` (the
    pair's), else None."""
    found = _load(path, digest)
    if found is None or (inputs is not None and not same_inputs(found[0].get("inputs"), inputs)):
        return None
    meta, tensors = found
    try:
        part = ReferencePart.from_tensors(int(meta["step"]), int(meta["reference"]),
                                          tuple(json.loads(meta["layers"])), tensors)
    except Exception:  # noqa: BLE001 - a damaged partial result is simply recomputed
        return None
    return part if part.layers == tuple(layers) and part.x_ref.shape == (len(layers),) else None


def _tag_meta(tag: Tag | str) -> dict[str, str]:
    """The metadata fields of ``tag``: ``digest`` and, when it names any, ``inputs`` (JSON)."""
    if isinstance(tag, str):
        return {"digest": tag}
    meta = {"digest": tag.digest}
    if tag.inputs:
        meta["inputs"] = json.dumps(dict(tag.inputs), sort_keys=True)
    return meta


def _save(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    import safetensors.numpy

    data = safetensors.numpy.save(
        {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, metadata=meta)
    # Temp file + rename: a kill at any moment leaves the old state or the whole new file. No
    # fsync: after a power cut a torn file fails to parse and the pair is simply recomputed.
    fmt.atomic_write_bytes(path, data)


def _load(path: Path, digest: str) -> tuple[dict[str, str], dict[str, np.ndarray]] | None:
    """(metadata, arrays) of a persisted file tagged ``digest``; None if it is missing, tagged
    otherwise or damaged."""
    import safetensors.numpy

    if not path.exists():
        return None
    try:
        header = fmt.read_safetensors_header(path)
        meta = header.get("__metadata__", {})
        if meta.get("digest") != digest:
            return None
        return meta, safetensors.numpy.load(path.read_bytes())
    except Exception:  # noqa: BLE001 - a damaged partial result is simply recomputed
        return None


# --- when pairs are written ----------------------------------------------------------------------

PERSIST_EVERY_S = 1.0
"""Seconds (wall clock) between writes of finished pairs: a pair that ends sooner after the last
write waits, and is written with the first pair that ends this long after it. A pair that takes
longer is written as soon as it is done; a kill loses at most this much finished work.

Why not each at once: on some filesystems (a virtualised disk, a journal) the first file
operation after a stretch of computing is slow, and slows the computing around it
(docs/performance.md); written in groups, a run of small pairs pays it about once a second."""


class _Group:
    """The writes of pairs finished in this process since the last group was written."""

    def __init__(self) -> None:
        self._pending: list[Callable[[], None]] = []
        self._written = time.monotonic()
        self._lock = threading.Lock()  # thread workers finish pairs concurrently

    def add(self, write: Callable[[], None]) -> None:
        with self._lock:
            self._pending.append(write)
            due = time.monotonic() - self._written >= PERSIST_EVERY_S
        if due:
            self.flush()

    def flush(self) -> None:
        """Run every pending write; raise the first error once all were tried."""
        with self._lock:
            pending, self._pending, self._written = self._pending, [], time.monotonic()
        error: BaseException | None = None
        for write in pending:
            try:
                write()
            except Exception as exc:  # noqa: BLE001 - the others are still written, then it is raised
                error = error or exc
        if error is not None:
            raise error


_GROUPS: dict[str, _Group] = {}  # pairs directory → the group of the analysis writing there


@contextlib.contextmanager
def grouped_writes(pairs_dir: Path | None) -> Iterator[None]:
    """While open, :func:`later` for ``pairs_dir`` in this process writes in groups (see
    :data:`PERSIST_EVERY_S`); on exit every pending pair is written, before the analysis goes on
    or releases its lock, whether it ends normally, by an error or by an interrupt (then that
    error is the one raised). Tasks run in other processes write each pair at once."""
    if pairs_dir is None:
        yield
        return
    key = str(pairs_dir)
    group = _GROUPS[key] = _Group()
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            group.flush()
        raise
    else:
        group.flush()
    finally:
        _GROUPS.pop(key, None)


def later(pairs_dir: Path, write: Callable[..., None], *args: Any) -> None:
    """``write(*args)`` (persisting into ``pairs_dir``) with this process's group of writes for
    that directory if it has one (:func:`grouped_writes`), else now."""
    group = _GROUPS.get(str(pairs_dir))
    if group is None:
        write(*args)
    else:
        group.add(functools.partial(write, *args))


def settings_digest(settings: ProbeSettings, objective_id: str, objective_code: str = "") -> str:
    """The tag of persisted pairs: sha256 of the analyzer version, probe settings, the objective's
    name and what it computes (``objective_code``: :func:`trajscope.objective.objective_digest`).

    The reference step is left out: the results that depend on x* are persisted apart, under
    :func:`reference_digest`, so a new x* leaves the rest of every pair reusable.
    """
    probe = {k: v for k, v in settings.to_json().items() if k != "reference_step"}
    blob = json.dumps({"v": VERSION, "probe": probe, "objective": objective_id,
                       "code": objective_code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reference_digest(digest: str, reference_step: int | None, identity: str) -> str:
    """The tag of persisted reference parts: sha256 of the pairs' :func:`settings_digest`, the step
    of x* and its snapshot's identity (:func:`trajscope.probe.reference_point.snapshot_identity`), so a part
    computed for another x*, or for a snapshot since replaced, is recomputed."""
    blob = json.dumps({"pairs": digest, "reference": reference_step, "identity": identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pairs_digest(digest: str, run_dir: Path, path: Path) -> str:
    """The tag of the pairs persisted under the analysis directory ``path``: ``digest``
    (:func:`trajscope.analysis.persist.settings_digest`) for ``run_dir/analysis``; elsewhere it also covers
    the run's absolute path (symlinks resolved), so that a directory given to the analyses of two
    runs never hands one run's pairs to the other: sha256(digest + path), 16 hex digits."""
    if path.resolve() == (run_dir / fmt.ANALYSIS_DIR).resolve():
        return digest
    blob = f"{digest}\0{run_dir.resolve()}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class PairTable:
    """Every pair's :class:`PairStats`, packed into arrays allocated once per field.

    Why not a dict of PairStats: a pair's results are a few dozen small arrays that live to the
    end of the analysis, allocated (numpy data, torch storage) in the heap where the probe also
    allocates and frees megabytes of tensors. Each small survivor pins the freed memory around it
    (glibc returns a heap region to the OS only when nothing in it is alive), so memory would grow
    with the run. Copied here as they arrive, a pair's own arrays are freed at once and nothing
    small stays behind between the probes.
    """

    def __init__(self, steps: Sequence[int]) -> None:
        self._row = {t: i for i, t in enumerate(steps)}
        self._arrays: dict[str, np.ndarray] = {}
        self._filled: dict[str, np.ndarray] = {}
        self._layers: dict[int, tuple[str, ...]] = {}
        self._odd: dict[int, PairStats] = {}  # a pair whose shapes differ from the first (never seen)

    def __contains__(self, step: int) -> bool:
        return step in self._layers or step in self._odd

    def __len__(self) -> int:
        return len(self._layers) + len(self._odd)

    def put(self, stats: PairStats) -> None:
        i = self._row[stats.step]
        flat = stats.to_tensors()
        n = len(self._row)
        for key, value in flat.items():
            value = np.asarray(value, dtype=np.float64)
            arr = self._arrays.get(key)
            if arr is None:
                arr = self._arrays[key] = np.full((n, *value.shape), np.nan)
                self._filled[key] = np.zeros(n, dtype=bool)
            if arr.shape[1:] != value.shape:
                self._odd[stats.step] = stats
                return
        for key, value in flat.items():
            self._arrays[key][i] = value
            self._filled[key][i] = True
        self._layers[stats.step] = tuple(stats.layers)

    def discard(self, step: int) -> None:
        """Forget the results of ``step`` (a pair skipped after its persisted part was loaded)."""
        self._odd.pop(step, None)
        if self._layers.pop(step, None) is not None:
            i = self._row[step]
            for filled in self._filled.values():
                filled[i] = False

    def get(self, step: int) -> PairStats:
        if step in self._odd:
            return self._odd[step]
        i = self._row[step]
        views = {k: a[i] for k, a in self._arrays.items() if self._filled[k][i]}
        return PairStats.from_tensors(step, self._layers[step], views)


def load_persisted(table: PairTable, pairs_dir: Path, steps: Sequence[int], digest: str,
                   inputs: Callable[[int], Inputs] | None = None) -> int:
    """Put into ``table`` every pair of ``steps`` persisted with the same settings and, unless
    ``inputs`` is None, from the inputs ``inputs(t)`` names (without its reference part: see
    :func:`load_references`). Returns how many pairs were persisted with the same settings from
    other inputs (to be recomputed)."""
    changed = 0
    for t in steps:
        found = _load(pair_path(pairs_dir, t), digest)
        if found is None:
            continue
        if inputs is not None and not same_inputs(found[0].get("inputs"), inputs(t)):
            changed += 1
            continue
        s = _pair(*found)
        if s is not None:
            table.put(s)
    return changed


def load_references(table: PairTable, pairs_dir: Path, steps: Sequence[int], digest: str | None,
                    inputs: Callable[[int], Inputs] | None = None) -> list[int]:
    """Merge into every pair of ``steps`` in ``table`` its persisted reference part, and return the
    steps whose part is missing or stale (computed for another x*, or from other inputs than
    ``inputs(t)``). With ``digest`` None (no reference point) every pair gets the NaN part and
    none is returned."""
    stale: list[int] = []
    for t in steps:
        if t not in table:
            continue
        stats = table.get(t)
        part = None if digest is None else load_reference(reference_path(pairs_dir, t), digest, stats.layers,
                                                          None if inputs is None else inputs(t))
        if digest is not None and part is None:
            stale.append(t)
        else:
            table.put(merge(stats, part))
    return stale


# --- one analysis at a time per run --------------------------------------------------------------


@contextlib.contextmanager
def analysis_lock(analysis_dir: Path) -> Iterator[None]:
    """Hold ``analysis/.lock`` for the whole analysis, or fail at once naming the holder.

    An OS lock (flock), not a marker file: the kernel releases it when its holder dies, even by
    SIGKILL, so a killed analysis never blocks the next one. (On network filesystems without
    flock support the lock is advisory at best; the per-file writes are atomic regardless.)
    The holder's note is written into the lock file, so the file is opened only if it is a
    regular file of its own inside the run (see :func:`_open_lock_file`).

    Raises:
        AnalysisError: if another analysis holds the lock.
        RunFormatError: naming ``analysis/`` or ``analysis/.lock`` if either is a symlink or
            not a plain directory/file.
    """
    confine.safe_output_dir(analysis_dir.parent, analysis_dir.name)
    fh = _open_lock_file(analysis_dir / fmt.LOCK_FILE)
    try:
        if not _try_lock(fh):
            fh.seek(0)
            holder = fh.read().strip() or "unknown process"
            raise AnalysisError(
                f"{analysis_dir}: another analysis of this run is writing here ({holder}); wait "
                "for it to finish (analyze(..., write=False) computes without writing)"
            )
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            _unlock(fh)
    finally:
        fh.close()


def _open_lock_file(path: Path) -> IO[str]:
    """Open (creating it) the regular file ``path`` for reading and writing, never through a
    symlink, never blocking on a FIFO, and never a file with other hard links (its holder's note
    is written into it, so a link to a file elsewhere would be overwritten).

    Raises:
        RunFormatError: naming ``path`` if it is a symlink, not a regular file, or unopenable.
    """
    fd = confine.open_nofollow(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), "the lock file")
    st = os.fstat(fd)
    problem = ("expected a regular file, found a FIFO or special file" if not stat.S_ISREG(st.st_mode)
               else f"has {st.st_nlink} hard links; expected a file of its own" if st.st_nlink > 1 else "")
    if problem:
        os.close(fd)
        raise RunFormatError(f"{path}: {problem} (remove it)")
    return os.fdopen(fd, "r+", encoding="utf-8")


def _try_lock(fh: Any) -> bool:
    if sys.platform == "win32":  # no flock: a byte-range lock on the first byte
        import msvcrt

        try:
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(fh: Any) -> None:
    if sys.platform == "win32":
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def remove_stale_temporaries(analysis_dir: Path) -> None:
    """Temp files left by a killed analysis (the lock is ours, so none is being written now)."""
    for d in (analysis_dir, analysis_dir / fmt.PAIRS_DIR):
        if d.is_dir():
            for f in d.glob(".*.tmp-*"):
                with contextlib.suppress(OSError):
                    f.unlink()
