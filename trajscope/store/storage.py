"""How a run's snapshots are read, whatever their format: the :class:`Storage` interface, its
format registry, and the stored form of a snapshot.

A run's snapshots are stored in one format, named by the manifest's ``storage`` field. Each format
has one reader here (a :class:`FormatStorage` subclass, registered in :data:`STORAGES` under its
format name: :mod:`trajscope.store.safetensors`, :mod:`trajscope.store.hdf5`); its writer is the
recorder's (:mod:`trajscope.recorders.backends`). A reader hands out the stored form of a
snapshot, ``(metadata, {key: CPU tensor})`` (:data:`Raw`); :meth:`Storage.read` builds the
:class:`~trajscope.store.snapshot.Snapshot` from it with
:func:`~trajscope.store.snapshot.snapshot_from_raw`, the same way for every format.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from trajscope import runformat as fmt
from trajscope.store.snapshot import Snapshot, snapshot_from_raw

__all__ = ["STORAGES", "FormatStorage", "Raw", "Storage", "read_raw", "register", "stat_path"]

Raw = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""The stored form of one snapshot: (``trajscope`` metadata, {key: CPU tensor})."""


class Storage(abc.ABC):
    """How a run's snapshots are stored, as the reader sees them: one :class:`FormatStorage` per
    format, or a view over one (:class:`trajscope.store.unwrap.UnwrappedStorage`)."""

    kind = ""

    def __init__(self, run_path: Path) -> None:
        self.run_path = run_path

    @abc.abstractmethod
    def steps(self) -> list[int]:
        """Steps with a complete snapshot, ascending."""

    @abc.abstractmethod
    def location(self, step: int) -> Path:
        """Where the snapshot of ``step`` is (a file, or a pseudo-path inside a container)."""

    @abc.abstractmethod
    def read_raw(self, step: int) -> Raw:
        """The stored form of the snapshot of ``step``: (metadata, {key: CPU tensor}).

        Raises:
            RunFormatError: if it is missing or damaged.
        """

    def read(self, step: int) -> Snapshot:
        """The whole snapshot of ``step``. Raises :class:`RunFormatError` if it is damaged."""
        return snapshot_from_raw(*self.read_raw(step), where=self.location(step))

    def read_params(self, step: int) -> Snapshot:
        """The snapshot of ``step`` with its parameters only (x_0, x*): formats that can read
        part of a snapshot do so. Raises :class:`RunFormatError` if it is damaged."""
        full = self.read(step)
        return Snapshot(step=full.step, kind=full.kind, params=full.params)

    @abc.abstractmethod
    def stat(self, step: int) -> tuple[int, int]:
        """(mtime in ns, size in bytes) of what holds the snapshot of ``step``, or (-1, -1) if it
        is missing. Made without reading the snapshot; :meth:`unchanged` compares two."""

    def unchanged(self, then: tuple[int, int], now: tuple[int, int]) -> bool:
        """Whether a snapshot stat'ed as ``then`` and later as ``now`` still holds the same data."""
        return then == now

    def identities(self, steps: list[int]) -> dict[int, str | None]:
        """Step → a cheap identity of its snapshot, made without reading its tensors; None where
        it cannot be read, or where the format has none (:meth:`trajscope.store.run.Run.identities`)."""
        return dict.fromkeys(steps)

    @abc.abstractmethod
    def disk_bytes(self) -> int:
        """Bytes the snapshots occupy on disk."""


class FormatStorage(Storage):
    """A storage format: reads a snapshot from its location alone, so that a snapshot path can be
    read without its run (:func:`read_raw`: ``read_snapshot``, ``trajscope convert``). Subclasses
    are registered in :data:`STORAGES`."""

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether ``path`` names a snapshot in the form this format's :meth:`location` hands out
        and no other format could: a backend that claims nothing is only the fallback."""
        return False

    @classmethod
    @abc.abstractmethod
    def read_location(cls, path: Path) -> Raw:
        """The stored form of the snapshot at ``path`` (a :meth:`location` of this format).

        Raises:
            RunFormatError: if it is missing or damaged.
        """

    def read_raw(self, step: int) -> Raw:
        return type(self).read_location(self.location(step))


STORAGES: dict[str, type[FormatStorage]] = {}
"""Format name (the manifest's ``storage``) → its :class:`Storage`. Filled by :func:`register` as
the reader modules are imported; importing :mod:`trajscope.store` imports them all."""

_S = TypeVar("_S", bound=type[FormatStorage])


def register(cls: _S) -> _S:
    """Class decorator: make ``cls`` the reader of format ``cls.kind``."""
    if cls.kind not in fmt.STORAGES:
        raise ValueError(f"{cls.__name__}.kind={cls.kind!r} is not a format named in trajscope.runformat")
    STORAGES[cls.kind] = cls
    # The registry lists formats in the order of trajscope.runformat.STORAGES whatever the import order
    # (messages name the formats in that order).
    ordered = sorted(STORAGES.items(), key=lambda item: fmt.STORAGES.index(item[0]))
    STORAGES.clear()
    STORAGES.update(ordered)
    return cls


def read_raw(path: str | Path) -> Raw:
    """The stored form of one snapshot, whatever the format: (metadata, {key: CPU tensor}).

    ``path`` is a snapshot's :meth:`Storage.location`. The format that claims it reads it; a path
    no format claims is read as the default format's (safetensors: a step file).
    """
    p = Path(path)
    default = STORAGES[fmt.STORAGE_SAFETENSORS]
    for cls in STORAGES.values():
        if cls is not default and cls.claims(p):
            return cls.read_location(p)
    return default.read_location(p)


def stat_path(path: Path) -> tuple[int, int]:
    """(mtime in ns, size in bytes) of ``path``, or (-1, -1) if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)  # missing: the reader reports it as a damaged snapshot
    return (st.st_mtime_ns, st.st_size)
