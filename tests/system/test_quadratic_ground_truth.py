"""Analytic ground truth on a stochastic quadratic f(x; b) = ½xᵀAx − bᵀx (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trajscope
from support.problems import A, make_quadratic, train_quadratic


@pytest.fixture(scope="module")
def quad(tmp_path_factory: pytest.TempPathFactory) -> tuple[trajscope.Run, list[torch.Tensor], object]:
    run_dir = tmp_path_factory.mktemp("quad") / "run"
    bs = train_quadratic(run_dir, steps=12)
    ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", progress=False)
    return trajscope.open_run(run_dir), bs, ds


def _x(run: trajscope.Run, t: int) -> torch.Tensor:
    return run.snapshot(t).params["x"]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_pairs_cover_every_step(quad) -> None:
    run, bs, ds = quad
    assert run.pairs == list(range(12))
    assert list(ds.step.values) == list(range(12))
    assert run.status == "complete" and run.final_step == 12


def test_inst_gap_closed_form(quad) -> None:
    run, _, ds = quad
    want = []
    for t in run.pairs:
        d = _x(run, t + 1) - _x(run, t)
        want.append(float(-0.5 * d @ A @ d))
    want = np.array(want)
    assert rel(ds.inst_gap.values, want) < 1e-8
    assert rel(ds.inst_gap_fwd.values, want) < 1e-8


def test_inst_smoothness_closed_form(quad) -> None:
    run, _, ds = quad
    want = np.array([
        float((A @ (d := _x(run, t + 1) - _x(run, t))).norm() / d.norm()) for t in run.pairs
    ])
    assert rel(ds.inst_smoothness.values, want) < 1e-8
    # and it lies between the extreme eigenvalues of A
    assert np.all(ds.inst_smoothness.values <= 5.0 + 1e-12)
    assert np.all(ds.inst_smoothness.values >= 0.2 - 1e-12)


def test_update_corr_closed_form(quad) -> None:
    run, bs, ds = quad
    want = []
    for t in run.pairs:
        x1 = _x(run, t + 1)
        d = x1 - _x(run, t)
        if t + 1 < len(bs):
            want.append(float((A @ x1 - bs[t + 1]) @ d))
        else:  # step t+1 is the final state: no next gradient was recorded
            want.append(np.nan)
    want = np.array(want)
    assert np.isnan(ds.update_corr.values[-1]) and np.isnan(want[-1])
    assert rel(ds.update_corr.values[:-1], want[:-1]) < 1e-8


def test_line_integral_residual_vanishes(quad) -> None:
    _, _, ds = quad
    scale = np.abs(ds.loss_change.values).max()
    assert np.all(np.abs(ds.line_integral_residual.values) <= 1e-8 * scale)


def test_loss_line_is_the_quadratic(quad) -> None:
    run, bs, ds = quad
    for i, t in enumerate(run.pairs[:3]):
        x0, x1 = _x(run, t), _x(run, t + 1)
        for j, a in enumerate(ds.alpha.values):
            x = x0 + a * (x1 - x0)
            want = float(0.5 * x @ A @ x - bs[t] @ x)
            assert ds.loss_line.values[i, j] == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_replay_is_exact_in_float64(quad) -> None:
    _, _, ds = quad
    assert ds.loss_replay_error.max() < 1e-12
    assert ds.grad_replay_error.max() < 1e-12
