"""End-to-end analysis: convexity on a convex problem, replay fidelity, the Dataset and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from click.testing import CliRunner
from problems import digits, make_mlp, make_softmax, train_classifier

import trajscope
from trajscope.cli import cli, main


def _train_softmax(run_dir, opt: str, steps: int = 25) -> None:
    X, Y = digits()
    torch.manual_seed(0)
    obj = make_softmax()
    model = obj.model
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9) if opt == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=0.05))
    gen = torch.Generator().manual_seed(0)
    with trajscope.Recorder(run_dir, model, optimizer, objective="problems:make_softmax") as rec:
        for _ in range(steps):
            idx = torch.randint(0, len(X), (64,), generator=gen)
            batch = (X[idx], Y[idx])
            optimizer.zero_grad()
            loss = obj.loss(model, batch)
            loss.backward()
            rec.batch(batch, loss=loss)
            optimizer.step()


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_softmax_regression_is_convex_along_every_step(tmp_path, opt) -> None:
    _train_softmax(tmp_path / "run", opt)
    ds = trajscope.analyze(tmp_path / "run", dtype="float64", progress=False)
    assert ds.sizes["step"] == 25
    # convex loss: both gaps are <= 0 up to float64 rounding of O(1) losses
    tol = 1e-12
    assert (ds.inst_gap.values <= tol).all(), ds.inst_gap.values.max()
    assert (ds.inst_gap_fwd.values <= tol).all(), ds.inst_gap_fwd.values.max()
    # ...and the loss along each step is a convex function of α (second differences >= 0)
    second = np.diff(ds.loss_line.values, n=2, axis=1)
    assert (second >= -1e-12).all()
    # cumulative convexity ratio of a convex function along descent steps is positive
    assert (ds.convexity_ratio.values[-5:] > 0).all()


def test_replay_error_of_a_deterministic_model(tmp_path) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=8, objective="problems:make_mlp")
    ds = trajscope.analyze(tmp_path / "run", progress=False)  # float32, as trained
    assert float(ds.loss_replay_error.max()) <= 1e-6
    assert float(ds.grad_replay_error.max()) <= 1e-6


def test_dataset_layout_and_attrs(tmp_path) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=6, objective="problems:make_mlp")
    ds = trajscope.analyze(tmp_path / "run", points=5, margin=0.25, progress=False)
    assert dict(ds.sizes) == {"step": 6, "alpha": 7, "layer": 6}
    np.testing.assert_allclose(ds.alpha.values, [-0.25, 0, 0.25, 0.5, 0.75, 1, 1.25])
    assert list(ds.layer.values) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                     "out.weight", "out.bias"]
    np.testing.assert_allclose(ds.lr.values, 0.1)
    for name, var in ds.data_vars.items():
        for attr in ("long_name", "units", "description", "holds_if"):
            assert attr in var.attrs, (name, attr)
    assert ds.inst_gap.attrs["holds_if"] == "<= 0"
    assert ds.loss_line.dims == ("step", "alpha")
    assert ds.grad_norm_by_layer.dims == ("step", "layer")
    # global norm = root of the sum of squared per-layer norms
    np.testing.assert_allclose(ds.grad_norm.values, np.sqrt((ds.grad_norm_by_layer.values ** 2).sum(1)))
    assert ds.attrs["objective"] == "problems:make_mlp"
    # the written file reads back identically
    back = trajscope.open_metrics(tmp_path / "run")
    xr.testing.assert_identical(back, ds)


def test_open_metrics_concatenates_runs(tmp_path) -> None:
    for name, seed in (("a", 0), ("b", 1)):
        train_classifier(tmp_path / name, make_mlp, steps=4, seed=seed, objective="problems:make_mlp")
        trajscope.analyze(tmp_path / name, points=3, progress=False)
    both = trajscope.open_metrics([tmp_path / "a", tmp_path / "b"])
    assert list(both.run.values) == ["a", "b"]
    assert both.inst_gap.dims == ("run", "step")
    assert not np.allclose(both.inst_gap.sel(run="a"), both.inst_gap.sel(run="b"))


def test_steps_and_metrics_selection(tmp_path) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=10, objective="problems:make_mlp")
    ds = trajscope.analyze(tmp_path / "run", steps="2:9:3", metrics=["convexity_ratio"],
                           points=3, write=False, progress=False)
    assert list(ds.step.values) == [2, 5, 8]
    # a series metric pulls in what it requires, and nothing else
    assert set(ds.data_vars) == {"convexity_num", "convexity_den", "convexity_ratio"}


def test_cli_analyze_info_metrics(tmp_path, monkeypatch) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=5, objective="problems:make_mlp")
    runner = CliRunner()
    res = runner.invoke(cli, ["info", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "status     complete" in res.output and "5 analyzable" in res.output
    res = runner.invoke(cli, ["analyze", str(tmp_path / "run"), "--points", "3"])
    assert res.exit_code == 0, res.output
    assert "pairs analyzed" in res.output and (tmp_path / "run/analysis/metrics.nc").exists()
    res = runner.invoke(cli, ["metrics"])
    assert res.exit_code == 0
    assert any(line.startswith("inst_gap ") and "<= 0" in line for line in res.output.splitlines())


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path / "nope")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert err.startswith("trajscope: error: ") and "nope: no such directory" in err
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path), "--points", "1"])
    assert exc.value.code == 2


def test_objective_override_and_missing_objective(tmp_path) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=3)  # no objective recorded
    with pytest.raises(trajscope.TrajscopeError, match="manifest names none; pass --objective"):
        trajscope.analyze(tmp_path / "run", progress=False)
    ds = trajscope.analyze(tmp_path / "run", "problems:make_mlp", points=3, progress=False)
    assert ds.sizes["step"] == 3
