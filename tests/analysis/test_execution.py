"""Where the analysis runs (trajscope.analysis.execution): the same results under every scheduler (synchronous,
threads, processes, a cluster by address), its arguments, the worker devices, the progress bar."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import trajscope
from support.problems import classifier_run, make_mlp
from trajscope.errors import AnalysisError

STEPS = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classifier_run(tmp_path_factory.mktemp("par") / "run", steps=STEPS)


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


