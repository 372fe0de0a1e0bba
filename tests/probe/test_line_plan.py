"""The line evaluated under a memory budget (trajscope.probe.line_plan, with trajscope.probe.memory): chunks of α
points planned from one point's measured cost, the same numbers under a tight budget, and one
clear error when a single point does not fit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from torch import nn

import trajscope
from support.problems import ce_loss, train_classifier
from trajscope.errors import AnalysisError
from trajscope.objective import Objective
from trajscope.probe import line_plan, memory
from trajscope.probe.line_plan import SMALL_POINT
from trajscope.probe.memory import plan_chunk

if TYPE_CHECKING:
    import xarray as xr

N_ALPHAS = 17  # points=9, margin=0.5


def make_wide() -> Objective:
    """An MLP whose activations (batch 256 × 2048, float64: 4 MiB a tensor) dwarf its parameters,
    so that one α point's cost is well above the measurement's noise."""
    torch.manual_seed(0)
    return Objective(model=nn.Sequential(nn.Linear(10, 2048), nn.Tanh(), nn.Linear(2048, 4)), loss=ce_loss)


@pytest.fixture(autouse=True)
def owned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measure as the CLI and pool workers do, in a process trajscope owns (marks reset): exact
    costs, whatever peaks earlier tests left in this process."""
    monkeypatch.setattr(memory, "_OWNED", True)


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("wide") / "run"
    train_classifier(run, make_wide, steps=3, batch_size=256)
    return run


def _newest_plan() -> line_plan.LinePlan:
    """The plan of the analysis just run (synchronous scheduler: planned in this process)."""
    return list(line_plan._PLANS.values())[-1]


def _analyze(run: Path, **kw: object) -> xr.Dataset:
    return trajscope.analyze(run, make_wide, dtype="float64", batched=True, write=False, progress=False, **kw)


def test_tight_budget_plans_smaller_chunks_with_the_same_numbers(wide_run: Path) -> None:
    free = _analyze(wide_run)
    assert free.attrs["line_mode"] == "batched"
    assert free.attrs["line_chunk"] == N_ALPHAS  # the default budget holds every point
    point = _newest_plan().point_bytes  # this process's plan (synchronous scheduler)
    assert point > 4 * 2**20  # at least one activation tensor: the measurement sees the point
    # An explicit budget covers what the worker holds too: about three points of room beside it,
    # far below the N_ALPHAS a full chunk needs.
    budget = int(4 * point) + 64 * 2**20
    tight = _analyze(wide_run, max_memory=budget)
    plan = _newest_plan()
    assert 0 < plan.held < 64 * 2**20  # the model, the snapshots, x_t, x_(t+1), Δ_t: small here
    assert plan.budget == budget - plan.held  # the line's room
    assert 1 <= tight.attrs["line_chunk"] < N_ALPHAS
    assert tight.attrs["line_chunk"] == plan_chunk(plan.budget, plan.point_bytes, N_ALPHAS)
    for name in free.data_vars:
        np.testing.assert_allclose(tight[name].values, free[name].values, rtol=1e-10, atol=1e-12,
                                   equal_nan=True, err_msg=name)


def test_budget_below_what_a_pair_holds_is_refused_before_any_pair(wide_run: Path,
                                                                   calls: dict[str, list[int]]) -> None:
    """Below the least a pair of the run holds (model, two snapshots, three parameter-sized vectors),
    refused at once from the first snapshot's sizes, before any pair is probed."""
    with pytest.raises(AnalysisError, match=r"gives 1\.0 KiB per worker, below the .* one pair of this run holds "
                       r"at least \(the model .*, two snapshots of .*\)") as e:
        _analyze(wide_run, max_memory="1KiB")
    assert "\n" not in str(e.value)
    assert calls["probe"] == []


def test_budget_below_one_pair_with_its_activations_is_one_clear_error(wide_run: Path) -> None:
    """Above that floor but below what the first pair measures it needs (what it holds, one α
    point, G0): one line naming each part, before the line is evaluated beyond its first point."""
    with pytest.raises(AnalysisError, match=r"one pair needs .* held: the model, snapshots .*; one α point "
                       r".*; the gradient G0 .*\), more than the budget of 8\.0 MiB per worker") as e:
        _analyze(wide_run, max_memory="8MiB")
    assert "\n" not in str(e.value)


def test_calibration_records_the_choice(wide_run: Path) -> None:
    ds = trajscope.analyze(wide_run, make_wide, dtype="float64", write=False, progress=False)
    plan = _newest_plan()
    assert ds.attrs["line_mode"] == plan.mode in ("batched", "pointwise")
    if plan.point_bytes > SMALL_POINT:  # else batched without a timed trial
        assert plan.seconds_point > 0 and plan.seconds_batched > 0 and plan.calibration_points >= 2


