"""Every metric of the analyzer against the independent float64 reference in reference.py."""

from __future__ import annotations

import numpy as np
import pytest

import trajscope
from problems import make_mlp, train_classifier
from reference import Reference


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("mlp") / "run"
    train_classifier(run_dir, make_mlp, steps=10, every=4, window=3, objective="problems:make_mlp")
    return run_dir


@pytest.mark.parametrize("batched", [True, False], ids=["vmap", "pointwise"])
def test_every_metric_matches_reference(mlp_run, batched: bool) -> None:
    ds = trajscope.analyze(mlp_run, make_mlp, dtype="float64", points=5, batched=batched,
                           write=False, progress=False)
    assert list(ds.step.values) == [0, 1, 4, 5, 8, 9]  # windows of 3 every 4, + final state 10
    ref = Reference(mlp_run, make_mlp).all_pairs(list(ds.step.values), ds.alpha.values)
    checked = set()
    for name, want in ref.items():
        got = ds[name].values
        scale = np.nanmax(np.abs(want))
        if name == "line_integral_residual":
            # ≈ 0 by construction: a difference of O(loss) numbers, so rounding is relative to the loss
            scale = np.nanmax(np.abs(ref["loss_line"]))
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * scale, err_msg=name)
        checked.add(name)
    produced = {v for v in ds.data_vars}
    # every variable the analyzer produces is covered by the reference
    assert produced <= checked, produced - checked


def test_float32_analysis_close_to_reference(mlp_run) -> None:
    ds = trajscope.analyze(mlp_run, make_mlp, points=5, write=False, progress=False)
    ref = Reference(mlp_run, make_mlp).all_pairs(list(ds.step.values), ds.alpha.values)
    for name in ("loss_line", "loss_change", "inst_smoothness", "update_corr", "grad_norm", "update_norm"):
        want = ref[name]
        np.testing.assert_allclose(ds[name].values, want, rtol=2e-3,
                                   atol=1e-5 * np.nanmax(np.abs(want)), err_msg=name)


def test_update_corr_needs_recorded_next_gradient(mlp_run) -> None:
    ds = trajscope.analyze(mlp_run, make_mlp, points=3, write=False, progress=False)
    # pair (9, 10): step 10 is the final state, which has no gradient
    assert np.isnan(ds.update_corr.sel(step=9))
    assert np.isfinite(ds.update_corr.sel(step=8))
