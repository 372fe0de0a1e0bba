"""Every metric of the analyzer against the independent float64 reference in reference.py."""

from __future__ import annotations

import numpy as np
import pytest
from problems import make_mlp, train_classifier
from reference import PROPERTY_CHECKS, Reference

import trajscope
from trajscope.probe import alpha_grid

POINTS = 5
STEPS = [0, 1, 4, 5, 8, 9]  # windows of 3 every 4, + final state 10


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("mlp") / "run"
    train_classifier(run_dir, make_mlp, steps=10, every=4, window=3, objective="problems:make_mlp")
    return run_dir


@pytest.fixture(scope="module")
def reference(mlp_run) -> dict[str, np.ndarray]:
    return Reference(mlp_run, make_mlp).all_pairs(STEPS, alpha_grid(POINTS, 0.5), sharpness=True)


def assert_matches_reference(ds, ref: dict[str, np.ndarray]) -> None:
    checked = set()
    for name, want in ref.items():
        got = ds[name].values
        scale = np.nanmax(np.abs(want))
        if name in ("line_integral_residual", "descent_lemma_gap", "convexity_ref_den"):
            # differences of O(loss) numbers: rounding is relative to the loss, not to the result
            scale = np.nanmax(np.abs(ref["loss_line"]))
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * scale, err_msg=name)
        assert ds[name].attrs["description"], name
        checked.add(name)
    for name, ok in PROPERTY_CHECKS.items():
        if name in ds:
            assert ok(ds[name].values), (name, ds[name].values)
            checked.add(name)
    produced = {v for v in ds.data_vars}
    # every variable the analyzer produces is covered by the reference
    assert produced <= checked, produced - checked


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
