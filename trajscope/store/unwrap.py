"""Runs recorded from a wrapped model, analyzed with the plain model.

``torch.compile`` names every parameter of the model it wraps ``_orig_mod.NAME``, DDP and
DataParallel ``module.NAME``; a run recorded through such a wrapper carries those names in its
manifest and snapshots, while the objective's model has the plain ones. :func:`unwrapped` gives
the analyzer a view of the run with the plain names: the manifest's parameter, buffer and
optimizer group names, and every snapshot read through its storage (parameters, gradients,
buffers, optimizer state), renamed once, where the analyzer first sees them. Nothing on disk
changes.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trajscope.errors import TrajscopeWarning
from trajscope.store.names import strip_prefix, wrapper_prefix
from trajscope.store.run import Run
from trajscope.store.snapshot import Snapshot
from trajscope.store.storage import Raw, Storage

if TYPE_CHECKING:
    import torch

__all__ = ["UnwrappedStorage", "unwrapped"]

_NAMED_KEYS = ("param/", "grad/", "buffer/", "optim/")
"""Stored tensor keys that carry a parameter or buffer name after their kind."""


class UnwrappedStorage(Storage):
    """A run's storage whose snapshots come with ``strip_prefix`` removed from every parameter,
    gradient, buffer and optimizer-state name (and from the ``grad_names`` of a run that stores no
    gradients). Pickles as the wrapped storage and the prefix."""

    def __init__(self, inner: Storage, strip_prefix: str) -> None:
        super().__init__(inner.run_path)
        self.inner = inner
        self.strip_prefix = strip_prefix
        self.kind = inner.kind

    def steps(self) -> list[int]:
        return self.inner.steps()

    def location(self, step: int) -> Path:
        return self.inner.location(step)

    def read_raw(self, step: int) -> Raw:
        meta, tensors = self.inner.read_raw(step)
        return meta, {self._key(k): t for k, t in tensors.items()}

    def read(self, step: int) -> Snapshot:
        return self._renamed(self.inner.read(step))

    def read_params(self, step: int) -> Snapshot:
        return self._renamed(self.inner.read_params(step))

    def stat(self, step: int) -> tuple[int, int]:
        return self.inner.stat(step)

    def unchanged(self, then: tuple[int, int], now: tuple[int, int]) -> bool:
        return self.inner.unchanged(then, now)

    def identities(self, steps: list[int]) -> dict[int, str | None]:
        return self.inner.identities(steps)

    def disk_bytes(self) -> int:
        return self.inner.disk_bytes()

    def _key(self, key: str) -> str:
        kind = next((k for k in _NAMED_KEYS if key.startswith(k)), None)
        return key if kind is None else kind + strip_prefix(key[len(kind):], self.strip_prefix)

    def _renamed(self, snap: Snapshot) -> Snapshot:
        def names(d: dict[str, Any]) -> dict[str, Any]:
            return {strip_prefix(n, self.strip_prefix): v for n, v in d.items()}

        unstored = snap.unstored_grad_names
        if unstored is not None:
            unstored = tuple(strip_prefix(n, self.strip_prefix) for n in unstored)
        # dataclasses.replace keeps the snapshot's class (the cache's ShippedSnapshot included)
        trainable = snap.trainable and tuple(strip_prefix(n, self.strip_prefix) for n in snap.trainable)
        return dataclasses.replace(snap, params=names(snap.params), grads=names(snap.grads),
                                   buffers=names(snap.buffers), optimizer_state=names(snap.optimizer_state),
                                   unstored_grad_names=unstored, trainable=trainable)


def unwrapped(run: Run, model: torch.nn.Module) -> Run:
    """``run`` with the plain names of ``model`` when it was recorded through a wrapper
    (:func:`trajscope.store.names.wrapper_prefix`), with a :class:`TrajscopeWarning` saying so;
    otherwise ``run`` itself."""
    prefix = wrapper_prefix([str(q["name"]) for q in run.manifest["params"]],
                            dict(model.named_parameters()))
    if not prefix:
        return run
    warnings.warn(
        f"{run.path}: the run's parameter names carry the wrapper prefix {prefix!r} (a model "
        "recorded through torch.compile, DDP or DataParallel); analyzing with the names of the "
        "objective's model",
        TrajscopeWarning,
        stacklevel=3,
    )
    manifest = copy.deepcopy(run.manifest)
    for key in ("params", "buffers"):
        for q in manifest.get(key, []):
            q["name"] = strip_prefix(str(q["name"]), prefix)
    for group in manifest.get("optimizer", {}).get("param_groups", []):
        if isinstance(group.get("params"), list):
            group["params"] = [strip_prefix(n, prefix) if isinstance(n, str) else n for n in group["params"]]
    return Run(run.path, manifest, run.steps, UnwrappedStorage(run.storage, prefix))
