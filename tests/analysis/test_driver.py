"""``trajscope.analyze`` end to end (trajscope.analysis.driver): convexity on a convex problem, replay
fidelity, the objective from the manifest or given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trajscope
from support.problems import classifier_run, digits, make_mlp, make_softmax, train_classifier
from support.recording import minibatches, record


def _train_softmax(run_dir, opt: str, steps: int = 25) -> None:
    X, Y = digits()
    torch.manual_seed(0)
    obj = make_softmax()
    model = obj.model
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9) if opt == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=0.05))
    gen = torch.Generator().manual_seed(0)
    record(run_dir, model, optimizer, obj.loss, minibatches(X, Y, steps, 64, gen),
           objective="support.problems:make_softmax")


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
    classifier_run(tmp_path / "run", steps=8)
    ds = trajscope.analyze(tmp_path / "run", progress=False)  # float32, as trained
    assert float(ds.loss_replay_error.max()) <= 1e-6
    assert float(ds.grad_replay_error.max()) <= 1e-6


def test_objective_override_and_missing_objective(tmp_path) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=3)  # no objective recorded
    with pytest.raises(trajscope.TrajscopeError, match="manifest names none; pass --objective"):
        trajscope.analyze(tmp_path / "run", progress=False)
    ds = trajscope.analyze(tmp_path / "run", "support.problems:make_mlp", points=3, progress=False)
    assert ds.sizes["step"] == 3
