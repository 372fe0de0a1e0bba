"""``derivatives="auto"`` on an analysis too small to repay forward-mode AD's one-time set-up:
reverse mode, the same numbers (:func:`trajscope.probe.trials.reverse_is_cheaper`).

conftest.py pins the shortcut off for every other test; here each test sets the set-up cost it
needs and whether this process has paid it, so no outcome depends on the machine's speed."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import trajscope
import trajscope.analysis.plan as plan
import trajscope.probe.trials as trials
from support.problems import make_mlp, train_classifier
from trajscope.probe import ProbeSettings

JVP_SETUP = "torch._decomp.decompositions_for_jvp"  # what torch imports on the first jvp


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "run"
    train_classifier(path, make_mlp, steps=4)
    return path


def _settings(r: trajscope.Run) -> ProbeSettings:
    return plan.probe_settings(r, points=9, margin=0.5, device="cpu", dtype=None, chunk_size=None,
                               batched=None, sharpness=False, sharpness_max_iter=20, reference=None)


def _analyze(run: Path, **kw: object) -> xr.Dataset:
    return trajscope.analyze(run, make_mlp, dtype="float64", points=5, margin=0.25, write=False,
                             progress=False, **kw)


@pytest.fixture
def unpaid(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process as if it had never run a jvp (torch keeps the set-up in sys.modules)."""
    monkeypatch.delitem(sys.modules, JVP_SETUP, raising=False)
    yield


def test_small_analysis_runs_in_reverse_mode_with_the_same_numbers(run: Path, unpaid: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trials, "FORWARD_AD_SETUP_S", 1e9)  # any line work costs less
    small = _analyze(run)
    assert small.attrs["derivatives"] == "reverse"
    assert small.attrs["derivatives_reason"] == trials.SMALL_ANALYSIS
    assert JVP_SETUP not in sys.modules  # the set-up it avoided was not paid after all
    forward = _analyze(run, derivatives="forward")
    assert forward.attrs["derivatives"] == "forward"
    assert float(np.abs(forward.dloss_line).min()) > 0  # a non-trivial slope is compared
    for name in forward.data_vars:
        np.testing.assert_allclose(small[name].values, forward[name].values, rtol=1e-10, atol=1e-12,
                                   equal_nan=True, err_msg=name)


def test_line_work_above_the_set_up_stays_in_forward_mode(run: Path, unpaid: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trials, "FORWARD_AD_SETUP_S", 1e-12)
    ds = _analyze(run)
    assert ds.attrs["derivatives"] == "forward" and ds.attrs["derivatives_reason"] == "forward-mode AD works"


def test_a_paid_set_up_keeps_forward_mode(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trials, "FORWARD_AD_SETUP_S", 1e9)
    monkeypatch.setitem(sys.modules, JVP_SETUP, types.ModuleType(JVP_SETUP))
    assert _analyze(run).attrs["derivatives"] == "forward"


def test_explicit_paths_are_taken_as_asked(run: Path, unpaid: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trials, "FORWARD_AD_SETUP_S", 1e9)
    ds = _analyze(run, derivatives="forward")
    assert ds.attrs["derivatives"] == "forward" and ds.attrs["derivatives_reason"] == "requested"


@pytest.mark.parametrize(("pairs", "cheaper"), [(1, True), (2, False)])
def test_the_estimate_is_pairs_times_points_times_a_reverse_point(run: Path, unpaid: None, pairs: int,
                                                                  cheaper: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # One evaluation of f takes 10 ms on a fake clock: 17 α points x 3 evaluations each x 10 ms
    # = 0.51 s of line work per pair, against a set-up of 1 s.
    ticks = iter([0.0, 0.010])
    monkeypatch.setattr(trials, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    monkeypatch.setattr(trials, "FORWARD_AD_SETUP_S", 1.0)
    r = trajscope.open_run(run)
    settings = _settings(r)
    assert len(settings.alphas) == 17 and trials.REVERSE_FORWARDS == 3.0
    assert trials.reverse_is_cheaper(make_mlp(), r.snapshot(0), pairs, settings, r.trainable) is cheaper


def test_no_evaluable_pair_leaves_the_decision_to_the_forward_trial(run: Path, unpaid: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trials, "FORWARD_AD_SETUP_S", 1e9)
    r = trajscope.open_run(run)
    settings = _settings(r)

    def no_loss(model: object, batch: object) -> object:
        raise RuntimeError("no loss here")

    broken = trajscope.Objective(model=make_mlp().model, loss=no_loss)
    assert trials.reverse_is_cheaper(broken, r.snapshot(0), len(r.pairs), settings, r.trainable) is False
    assert trials.reverse_is_cheaper(make_mlp(), None, 1, settings) is False  # no readable snapshot
