"""What an analysis hands its graph and its tasks: one :class:`Job` for the whole analysis (in the
driver), and the :class:`PairJob` it gives every task of the graph.

A pair task needs a dozen things besides its snapshots: how to rebuild the objective, how to probe
(α grid, device, dtype, memory budget, reference point), where it runs, how its results are tagged
when persisted. They are the same for every pair of an analysis, so they travel as one object,
bound once per window of the graph (:func:`trajscope.analysis.tasks.window_graph`).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trajscope.analysis.persist import reference_inputs
from trajscope.objective import ObjectiveSource
from trajscope.probe.settings import ProbeSettings
from trajscope.runformat import KIND_STEP

if TYPE_CHECKING:
    from trajscope.analysis.execution import Placement
    from trajscope.store.run import Run

__all__ = ["Job", "PairJob"]


@dataclass(frozen=True)
class PairJob:
    """What every task of one analysis is handed (pickled with each window's graph).

    Attributes:
        source: the objective as the analysis was given it (``"module:function"``, a factory, an
            :class:`~trajscope.objective.Objective`; None: the name the run recorded).
        recorded: the objective name the run recorded.
        objective_key: names ``source`` stably in a worker's cache of objectives
            (:func:`~trajscope.analysis.tasks.objective_for`).
        run_path: the run a factory that takes the run is called with (opened in the worker).
        settings: how each pair is probed: α grid, device, dtype, memory budget, reference step.
        trainable: the coordinates of x unless a step recorded its own (the parameters with a
            gradient).
        placement: how a task sets up its worker (torch threads, device); None: as it is.
        digest: tags persisted pairs (:func:`~trajscope.analysis.persist.settings_digest`).
        ref_digest: tags persisted reference parts (:func:`~trajscope.analysis.persist.reference_digest`);
            None: they are not persisted.
    """

    source: ObjectiveSource
    recorded: str | None
    objective_key: str | None
    run_path: str
    settings: ProbeSettings
    trainable: list[str]
    placement: Placement | None
    digest: str
    ref_digest: str | None = None


@dataclass(frozen=True)
class Job:
    """One analysis, as its driver runs it: what every window of its graph shares.

    Attributes:
        run: the run, as the objective's model names its parameters.
        objective: the objective as given (see :attr:`PairJob.source`).
        objective_id: how the objective is named in the Dataset and the digests.
        settings: how each pair is probed.
        device: the ``device=`` spec, resolved per worker.
        digest: tags persisted pairs (their reference parts aside).
        pairs_dir: where pairs are persisted (None: nothing is written).
        local: the scheduler runs on this machine (the driver may run trials on ``settings.device``).
        ref_digest: tags persisted reference parts; None: none are kept (no reference point,
            nothing written, or x* unreadable).
        key: names the tasks: the pairs' digest with the reference point, so that two analyses of
            one run on one cluster with other reference points never share a task (default:
            ``digest``).
        run_token: names the run in the keys of the load tasks.

    Persisted results record what they were computed from (:meth:`inputs`): the identities of the
    snapshots are taken once per analysis (:meth:`identify`), before any is read for a pair.
    """

    run: Run
    objective: ObjectiveSource
    objective_id: str
    settings: ProbeSettings
    device: str
    digest: str
    pairs_dir: Path | None
    local: bool = True
    ref_digest: str | None = None
    key: str = ""
    run_token: str = ""
    _uid: str = field(default_factory=lambda: uuid.uuid4().hex, init=False, repr=False, compare=False)
    _identities: dict[int, str | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def task_key(self) -> str:
        """The tasks' names: :attr:`key`, or :attr:`digest` when none is set."""
        return self.key or self.digest

    @functools.cached_property
    def recorded(self) -> frozenset[int]:
        """The recorded steps."""
        return frozenset(self.run.steps)

    @property
    def init_step(self) -> int | None:
        """The step of x_0 (distance from initialisation), when the run recorded step 0."""
        steps = self.run.steps
        return steps[0] if steps and steps[0] == 0 else None

    def previous(self, t: int) -> int | None:
        """x_{t−1} of pair t, when it is a recorded step (the final state is not one)."""
        return t - 1 if (t - 1) in self.recorded and self.run.kind(t - 1) == KIND_STEP else None

    def roles(self, t: int) -> dict[str, int]:
        """The snapshots pair ``t`` reads, by role: x_t, x_{t+1}, and x_{t−1} and x_0 when recorded.
        A pruned x_{t−1} keeps its role (with no identity): the pair was computed with it."""
        prev = t - 1 if (t - 1) in self.run.pruned else self.previous(t)
        roles = {"x_t": t, "x_next": t + 1, "x_prev": prev, "x_0": self.init_step}
        return {role: s for role, s in roles.items() if s is not None}

    def identify(self, pairs: Iterable[int]) -> None:
        """Take the identity of every snapshot the pairs starting at ``pairs`` read (:meth:`roles`)
        and not taken yet, in one pass over the storage (:meth:`~trajscope.store.run.Run.identities`;
        None for one not on disk).

        Taken before the pairs' snapshots are read: a snapshot replaced in between is read anew
        but recorded under its old identity, so the next analysis recomputes its pairs (the
        other way round, a pair would be reused with data it was not computed from)."""
        missing = {s for t in pairs for s in self.roles(t).values()} - self._identities.keys()
        if missing:
            self._identities.update(self.run.identities(missing))

    def inputs(self, t: int) -> dict[str, str | None]:
        """What pair ``t`` reads, as persisted with its results
        (:data:`trajscope.analysis.persist.Inputs`): the run's identity and, by role, the identity
        of each snapshot the pair task is given."""
        self.identify([t])
        return {"run": self.run.identity, **{role: self._identities[s] for role, s in self.roles(t).items()}}

    def reference_inputs(self, t: int) -> dict[str, str | None]:
        """What the reference part of pair ``t`` reads besides x* (which its digest covers)."""
        return reference_inputs(self.inputs(t))

    def for_tasks(self, placement: Placement) -> PairJob:
        """What every task of this analysis is handed, placed by ``placement``."""
        source = self.objective
        # A shipped function or Objective has no stable identity in a worker: it is named once per
        # analysis, so that a worker builds its model once, not once per window or pair.
        key = (source if isinstance(source, str) else self.run.objective if source is None
               else f"{self.objective_id}#{self._uid}")
        return PairJob(source, self.run.objective, key, str(self.run.path), self.settings, self.run.trainable,
                       placement, self.digest, self.ref_digest)
