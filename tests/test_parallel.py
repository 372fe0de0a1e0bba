"""The same results under every scheduler: synchronous, threads, processes, a cluster by address."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from problems import make_mlp, train_classifier

import trajscope
import trajscope.analysis.loading as snapshots
import trajscope.analysis.tasks as tasks
from trajscope.errors import AnalysisError

STEPS = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("par") / "run"
    train_classifier(run_dir, make_mlp, steps=STEPS, objective="problems:make_mlp")
    return run_dir


@pytest.fixture(scope="module")
def reference(run_dir: Path) -> xr.Dataset:
    return trajscope.analyze(run_dir, dtype="float64", write=False, progress=False)


def assert_agree(ds: xr.Dataset, ref: xr.Dataset, rtol: float = 1e-6) -> None:
    assert list(ds.step.values) == list(ref.step.values)
    assert set(ds.data_vars) == set(ref.data_vars)
    for name in ref.data_vars:
        want = ref[name].values
        scale = np.nanmax(np.abs(want)) if np.isfinite(want).any() else 1.0
        np.testing.assert_allclose(ds[name].values, want, rtol=rtol, atol=1e-12 * scale,
                                   equal_nan=True, err_msg=name)


@pytest.mark.parametrize("scheduler", ["threads", "processes"])
def test_local_schedulers_agree_with_synchronous(run_dir: Path, reference: xr.Dataset,
                                                 tmp_path: Path, scheduler: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ds = trajscope.analyze(run, dtype="float64", scheduler=scheduler, workers=2, progress=False)
    assert_agree(ds, reference)
    # every pair was persisted by the worker that computed it, and the Dataset written
    assert len(list((run / "analysis" / "pairs").glob("pair_*.safetensors"))) == STEPS
    assert_agree(trajscope.open_metrics(run), reference)


def test_local_cluster_reached_by_address(run_dir: Path, reference: xr.Dataset) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  protocol="tcp", dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://")
        ds = trajscope.analyze(run_dir, dtype="float64", scheduler=address, write=False,
                               progress=False)
        assert_agree(ds, reference)
        # a Client works as well, and analyze leaves it open
        with distributed.Client(address, set_as_default=False) as client:
            ds = trajscope.analyze(run_dir, dtype="float64", scheduler=client, write=False,
                                   progress=False, steps="2:6")
            # (cumulative metrics start at the first selected pair: compare with the same selection)
            assert_agree(ds, trajscope.analyze(run_dir, dtype="float64", write=False,
                                               progress=False, steps="2:6"))
            assert client.status == "running"


def test_each_snapshot_is_read_once(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    from trajscope.store.run import Storage

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


@pytest.mark.parametrize("kwargs, match", [
    ({"scheduler": "bogus"}, r"scheduler='bogus': expected synchronous, threads, processes"),
    ({"scheduler": "threads", "workers": 0}, r"workers=0: expected an int >= 1"),
    ({"scheduler": "tcp://127.0.0.1:1", "workers": 2}, r"workers=2: applies to the local schedulers"),
    ({"device": "gpu"}, r"device='gpu': expected cpu, cuda, cuda:N or auto"),
    ({"chunk_size": 0}, r"chunk_size=0: expected an int >= 1"),
    ({"steps": "0:9:0"}, r"steps=.*stride must be >= 1"),
])
def test_bad_arguments_name_the_argument(run_dir: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(AnalysisError, match=match):
        trajscope.analyze(run_dir, write=False, progress=False, **kwargs)


def test_unreachable_cluster_is_a_trajscope_error(run_dir: Path) -> None:
    pytest.importorskip("distributed")
    with pytest.raises(AnalysisError, match=r"scheduler='tcp://127.0.0.1:9': cannot connect"):
        from trajscope.analysis.execution import DistributedBackend

        DistributedBackend("tcp://127.0.0.1:9", timeout=1.0)


def test_worker_device_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from trajscope.analysis.execution import resolve_device

    assert resolve_device("cpu", 3) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1) == "cpu"
    with pytest.raises(AnalysisError, match=r"device='cuda': CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # one worker per GPU: worker slots 0, 1, 2, 3 → cuda:0, cuda:1, cuda:0, cuda:1
    assert [resolve_device("cuda", s) for s in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert resolve_device("auto", 1) == "cuda:1"
    assert resolve_device("cuda:1", 0) == "cuda:1"
    with pytest.raises(AnalysisError, match=r"device='cuda:2': this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda", 5) == "cuda"


def test_snapshots_ship_as_arrays_and_back() -> None:
    import pickle

    import torch

    from trajscope.analysis.loading import ShippedSnapshot, ship
    from trajscope.store.run import Snapshot

    snap = Snapshot(step=3, kind="step", params={"w": torch.randn(3, 2), "h": torch.randn(4).bfloat16()},
                    grads={"w": torch.randn(3, 2)}, rng={"cpu": torch.get_rng_state()},
                    batch={"x": (torch.arange(4), [1, "a", None]), "y": torch.tensor(2.5)},
                    loss=0.5, lr=[0.1], training=True)
    back = pickle.loads(pickle.dumps(ship(snap)))
    assert isinstance(back, ShippedSnapshot)
    for a, b in [(snap.params, back.params), (snap.grads, back.grads), (snap.rng, back.rng)]:
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
    assert torch.equal(back.batch["x"][0], snap.batch["x"][0]) and back.batch["x"][1] == [1, "a", None]
    assert back.batch["y"].item() == 2.5 and back.batch["y"].dim() == 0
    assert (back.step, back.kind, back.loss, back.lr, back.training) == (3, "step", 0.5, [0.1], True)


def test_cli_scheduler_address_and_usage_errors(run_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    distributed = pytest.importorskip("distributed")
    from trajscope.cli import main

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  protocol="tcp", dashboard_address=None) as cluster:
        main(["analyze", str(run), "--scheduler", cluster.scheduler_address, "--steps", "0:3",
              "--quiet"])  # returns normally on success
    assert len(trajscope.open_metrics(run).step) == 3
    for args, message in [(["--scheduler", "bogus"], "expected synchronous, threads, processes"),
                          (["--device", "gpu"], "expected cpu, cuda, cuda:N or auto"),
                          (["--workers", "0"], "--workers")]:
        with pytest.raises(SystemExit) as exc:
            main(["analyze", str(run), *args])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_progress_counts_pairs_and_is_quiet_off_a_terminal(run_dir: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    trajscope.analyze(run_dir, make_mlp, write=False, progress=None)  # stderr is not a terminal
    assert capsys.readouterr().err == ""
    trajscope.analyze(run_dir, make_mlp, write=False, progress=True, scheduler="threads", workers=2)
    err = capsys.readouterr().err
    assert f"{STEPS}/{STEPS}" in err and "pair/s" in err


def test_process_pools_pass_snapshots_by_path(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    import torch

    monkeypatch.setattr(snapshots, "_recent", type(snapshots._recent)())
    storage = trajscope.open_run(run_dir).storage
    snap_ref = snapshots.SnapshotRef.of(storage, 3)
    snap = snap_ref.resolve()
    blob = pickle.dumps(snap_ref)
    assert len(blob) < 1000  # a reference, not the tensors
    ref = pickle.loads(blob)
    assert isinstance(ref, snapshots.SnapshotRef)  # the driver never reads the file
    monkeypatch.setattr(snapshots, "_recent", type(snapshots._recent)())  # another process
    back = snapshots.resolved(ref)
    assert back.step == 3 and all(torch.equal(back.params[k], snap.params[k]) for k in snap.params)
    params = pickle.loads(pickle.dumps(snapshots.SnapshotRef.of(storage, 3, params_only=True))).resolve()
    assert set(params.params) == set(snap.params) and not params.grads and params.batch is None


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_cuda_under_local_schedulers_matches_cpu(run_dir: Path, reference: xr.Dataset,
                                                 scheduler: str) -> None:
    # page-locked snapshots, asynchronous copies, one probe at a time on the GPU
    ds = trajscope.analyze(run_dir, dtype="float64", device="cuda", scheduler=scheduler,
                           workers=2 if scheduler == "threads" else None, write=False, progress=False)
    assert ds.attrs["device"] == "cuda"
    assert_agree(ds, reference, rtol=1e-6)


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

    job = Job(r, "problems:make_mlp", "key", settings, "cpu", "dig", None, run_token="tok")

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
