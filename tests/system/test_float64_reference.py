"""Every metric of the analyzer against the independent float64 reference (support/float64_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

import trajscope
from support.float64_reference import Reference, assert_matches_reference
from support.problems import classifier_run, make_mlp
from trajscope.probe import alpha_grid

POINTS = 5
STEPS = [0, 1, 4, 5, 8, 9]  # windows of 3 every 4, + final state 10


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory):
    return classifier_run(tmp_path_factory.mktemp("mlp") / "run", steps=10, every=4, window=3)


@pytest.fixture(scope="module")
def reference(mlp_run) -> dict[str, np.ndarray]:
    return Reference(mlp_run, make_mlp).all_pairs(STEPS, alpha_grid(POINTS, 0.5), sharpness=True)


@pytest.mark.parametrize("batched", [True, False], ids=["vmap", "pointwise"])
def test_every_metric_matches_reference(mlp_run, reference, batched: bool) -> None:
    ds = trajscope.analyze(mlp_run, make_mlp, dtype="float64", points=POINTS, batched=batched,
                           sharpness=True, write=False, progress=False)
    assert list(ds.step.values) == STEPS
    assert_matches_reference(ds, reference)
    # windows of 3: the pair starting mid-window has a recorded previous step, the others not
    assert np.isfinite(ds.grad_cos_prev.sel(step=5)) and np.isnan(ds.grad_cos_prev.sel(step=4))


def test_float32_analysis_close_to_reference(mlp_run, reference) -> None:
    ds = trajscope.analyze(mlp_run, make_mlp, points=POINTS, sharpness=True, write=False,
                           progress=False)
    for name in ("loss_line", "loss_change", "inst_smoothness", "update_corr", "grad_norm",
                 "update_norm", "sharpness", "param_norm", "convexity_ref_num"):
        want = reference[name]
        np.testing.assert_allclose(ds[name].values, want, rtol=2e-3,
                                   atol=1e-5 * np.nanmax(np.abs(want)), err_msg=name)
    assert np.all(ds.sharpness_converged.values == 1)


def test_update_corr_needs_recorded_next_gradient(mlp_run) -> None:
    ds = trajscope.analyze(mlp_run, make_mlp, points=3, write=False, progress=False)
    # pair (9, 10): step 10 is the final state, which has no gradient
    assert np.isnan(ds.update_corr.sel(step=9))
    assert np.isfinite(ds.update_corr.sel(step=8))
    # sharpness is opt-in
    assert "sharpness" not in ds
