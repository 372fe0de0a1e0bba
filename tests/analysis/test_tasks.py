"""The analysis graph (trajscope.analysis.tasks): one load task per snapshot shared by the pairs that read it,
deterministic keys, file references instead of load tasks in a process pool, and models built under the probe lock."""

from __future__ import annotations

from pathlib import Path

import pytest

import trajscope
import trajscope.analysis.loading as snapshots
import trajscope.analysis.tasks as tasks
from support.problems import classifier_run, make_mlp
from trajscope.errors import AnalysisError

STEPS = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classifier_run(tmp_path_factory.mktemp("par") / "run", steps=STEPS)


def test_each_snapshot_is_read_once(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    from trajscope.store import Storage

    real = Storage.read
    monkeypatch.setattr(Storage, "read", lambda self, s: reads.append(self.location(s).name) or real(self, s))
    monkeypatch.setattr(snapshots, "_recent", type(snapshots._recent)())
    trajscope.analyze(run_dir, make_mlp, write=False, progress=False)
    # steps 0..8: each read once although pairs share them (x_t is pair t's start, pair t−1's
    # end and pair t+1's previous step), across window boundaries too
    assert sorted(reads) == sorted(set(reads)) and len(reads) == STEPS + 1


def test_graph_keys_are_deterministic_and_shared(run_dir: Path) -> None:
    r = trajscope.open_run(run_dir)
    from trajscope.analysis.execution import Placement
    from trajscope.analysis.job import Job
    from trajscope.probe import ProbeSettings

    job = Job(r, None, "k", ProbeSettings(), "cpu", "dig", None, run_token="tok")

    def keys(window: list[int]) -> set:
        graph_tasks = tasks.window_graph(job, Placement(), window)
        graph = dict(tasks.dask.delayed(graph_tasks).__dask_graph__())
        return {k for k in graph if isinstance(k, tuple)}

    k = keys([2, 3, 4])
    assert k == keys([2, 3, 4])
    loads = sorted(s for name, s in k if name == "load-tok")
    assert loads == [1, 2, 3, 4, 5]  # five snapshots for three pairs: one load each
    assert {s for name, s in k if name == "pair-dig-tok"} == {2, 3, 4}
    assert ("params-tok", 0) in k


def test_process_pool_pair_tasks_get_file_references_without_load_tasks(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local process pool: no load task round trips; each pair task receives references the
    driver made by stat alone, and a file replaced after that is refused, not mixed in."""
    import os
    import pickle

    from trajscope.analysis.execution import Placement
    from trajscope.analysis.job import Job
    from trajscope.probe import ProbeSettings

    r = trajscope.open_run(run_dir)
    steps = [1, 2, 3]
    settings = ProbeSettings(alphas=(0.0, 1.0))

    job = Job(r, "support.problems:make_mlp", "key", settings, "cpu", "dig", None, run_token="tok")

    def graph_keys(by_path: bool) -> set[str]:
        graph_tasks = tasks.window_graph(job, Placement(by_path=by_path), steps)
        return {k[0] if isinstance(k, tuple) else k for t in graph_tasks for k in dict(t.dask)}

    assert {k for k in graph_keys(False) if k.startswith("load-")}  # in-process: load tasks
    by_path = graph_keys(True)
    assert not {k for k in by_path if k.startswith(("load-", "params-"))}, by_path
    assert {k for k in by_path if k.startswith("pair-")}

    path = r.step_path(3)
    monkeypatch.setattr(snapshots, "_recent", type(snapshots._recent)())
    ref = pickle.loads(pickle.dumps(snapshots.SnapshotRef.of(r.storage, 3)))
    assert isinstance(ref, snapshots.SnapshotRef) and not snapshots._recent  # nothing read yet
    assert snapshots.resolved(ref).step == 3
    st = os.stat(path)
    ref = snapshots.SnapshotRef.of(r.storage, 3)
    monkeypatch.setattr(snapshots, "_recent", type(snapshots._recent)())  # a fresh worker
    try:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten meanwhile
        with pytest.raises(AnalysisError, match="changed during the analysis"):
            snapshots.resolved(ref)
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_thread_workers_build_their_models_under_the_probe_lock(run_dir: Path) -> None:
    # Building a model draws its initial parameters from torch's global RNG; a probe in another
    # thread may be replaying that RNG for dropout at the moment, so workers build under the lock.
    held: list[bool] = []

    def factory() -> trajscope.Objective:
        held.append(tasks._PROBE_LOCK.locked())
        return make_mlp()

    trajscope.analyze(run_dir, factory, write=False, progress=False, scheduler="threads", workers=2)
    assert len(held) >= 2 and all(held)  # the driver's model and each worker thread's
