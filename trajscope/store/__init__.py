"""Reading a recorded run: the run directory (:mod:`~trajscope.store.run`), its snapshots
(:mod:`~trajscope.store.snapshot`) and the storage formats they are read from
(:mod:`~trajscope.store.storage`, :mod:`~trajscope.store.safetensors`, :mod:`~trajscope.store.hdf5`;
the parts of a sharded snapshot, :mod:`~trajscope.store.shards`);
the comparison of named tensors (:mod:`~trajscope.store.names`) and the view of a run recorded
through a wrapper (:mod:`~trajscope.store.unwrap`).

Nothing here imports the analyzer or the recorder: the recorder writes what this package reads,
and the two meet only in :mod:`trajscope.runformat`. See ``docs/architecture.md``.
"""

from __future__ import annotations

# Importing the package registers both storage readers (store.storage.STORAGES), whichever
# module of it is imported first.
from trajscope.store import hdf5, safetensors  # noqa: F401
from trajscope.store.run import Run, open_run, read_snapshot
from trajscope.store.snapshot import Snapshot
from trajscope.store.storage import STORAGES, Storage, read_raw

__all__ = ["STORAGES", "Run", "Snapshot", "Storage", "open_run", "read_raw", "read_snapshot"]
