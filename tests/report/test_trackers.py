"""The trackers (trajscope.report.trackers) read back with their own readers: MLflow's
``MlflowClient`` on a local tracking store, W&B's offline run files. (TensorBoard's round trip:
``tests/analysis/test_follow.py``.)"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import trajscope
from support.problems import classifier_run
from support.rundirs import cli


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    run = classifier_run(tmp_path_factory.mktemp("trk") / "run", steps=5)
    return run, trajscope.analyze(run, progress=False)


def _per_pair(ds) -> dict[str, np.ndarray]:
    return {n: ds[n].values for n, v in ds.data_vars.items() if v.dims == ("step",) and v.dtype.kind == "f"}


def test_export_to_mlflow_reads_back_through_mlflow_client(analyzed, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store without a database
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    run, ds = analyzed
    uri = (tmp_path / "mlruns").as_uri()
    code, out, err = cli(["export", str(run), uri, "--to", "mlflow"], capsys)
    assert code == 0, err
    client = MlflowClient(uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("trajscope").experiment_id])
    assert mlrun.info.run_name == "trajscope run" and mlrun.info.status == "FINISHED"
    steps = [int(t) for t in ds["step"].values]
    for name, values in _per_pair(ds).items():
        history = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, f"trajscope/{name}")}
        assert sorted(history) == steps, name
        np.testing.assert_allclose([history[t] for t in steps], values, rtol=1e-12, equal_nan=True, err_msg=name)
    assert mlrun.data.params["trajscope.analysis.probe"].startswith('"{')
    artifacts = [a.path for a in client.list_artifacts(mlrun.info.run_id, "trajscope/figures")]
    assert "trajscope/figures/inst_gap.png" in artifacts


def test_export_to_mlflow_logs_into_the_trainers_run(analyzed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(uri)
    trainer = client.create_run(client.create_experiment("training")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", trainer)  # MLflow's own way to name the run to log into
    run, ds = analyzed
    assert cli(["export", str(run), uri, "--to", "mlflow"], capsys)[0] == 0
    history = client.get_metric_history(trainer, "trajscope/loss_change")
    assert [m.step for m in history] == [int(t) for t in ds["step"].values]
    assert client.get_run(trainer).info.status == "RUNNING"  # the trainer's run is left to the trainer


def test_export_to_wandb_offline_reads_back_from_its_files(analyzed, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from support import wandb_files

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, ds = analyzed
    code, out, err = cli(["export", str(run), "myproject", "--to", "wandb"], capsys)
    assert code == 0, err
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = [r for r in wandb_files.history(path) if "trajscope/inst_gap" in r]
    assert [r["trajscope/step"] for r in rows] == [int(t) for t in ds["step"].values]
    for name, values in _per_pair(ds).items():
        got = [r[f"trajscope/{name}"] for r in rows]
        np.testing.assert_allclose([math.nan if g is None or g == "NaN" else g for g in got], values,
                                   rtol=1e-12, equal_nan=True, err_msg=name)
    config = wandb_files.config(path)
    assert config["trajscope"]["analysis"]["derivatives"] == ds.attrs["derivatives"]
    assert any(k.startswith("trajscope/figures/inst_gap/") for r in wandb_files.history(path) for k in r)


def test_a_bad_wandb_target_is_one_line(analyzed, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run, _ = analyzed
    code, _, err = cli(["export", str(run), "a/b/c/d", "--to", "wandb"], capsys)
    assert code == 1 and err.strip() == ("trajscope: error: --to wandb a/b/c/d: expected PROJECT, ENTITY/PROJECT "
                                         "or ENTITY/PROJECT/RUN_ID")


def test_a_followed_analysis_logs_each_value_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``analyze --follow --to mlflow`` in rounds (20 pairs, a few per round): every metric at every
    pair's step exactly once, equal to the final Dataset."""
    from mlflow.tracking import MlflowClient

    from trajscope.report.export import analyze_to

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    run = classifier_run(tmp_path / "run", steps=20, batch_size=8)
    uri = (tmp_path / "mlruns").as_uri()
    lines: list[str] = []
    ds = analyze_to(trajscope.open_run(run), None, {}, follow=True, poll=0.1, to="mlflow", target=uri,
                    echo=lines.append)
    assert len(lines) >= 3 and lines[-1].endswith("(20 so far)")  # several rounds
    client = MlflowClient(uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("trajscope").experiment_id])
    steps = [int(t) for t in ds["step"].values]
    for name, values in _per_pair(ds).items():
        history = client.get_metric_history(mlrun.info.run_id, f"trajscope/{name}")
        assert sorted(m.step for m in history) == steps, name  # once per step
        got = {m.step: m.value for m in history}
        np.testing.assert_allclose([got[t] for t in steps], values, rtol=1e-12, equal_nan=True, err_msg=name)
