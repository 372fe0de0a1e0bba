"""The metrics Dataset (trajscope.analysis.dataset): its layout and attrs, the file it is written to,
and ``open_metrics`` over several runs."""

from __future__ import annotations

import numpy as np
import xarray as xr

import trajscope
from support.problems import classifier_run


def test_dataset_layout_and_attrs(tmp_path) -> None:
    classifier_run(tmp_path / "run", steps=6)
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
    assert ds.attrs["objective"] == "support.problems:make_mlp"
    # the written file reads back identically
    back = trajscope.open_metrics(tmp_path / "run")
    xr.testing.assert_identical(back, ds)


def test_open_metrics_concatenates_runs(tmp_path) -> None:
    for name, seed in (("a", 0), ("b", 1)):
        classifier_run(tmp_path / name, steps=4, seed=seed)
        trajscope.analyze(tmp_path / name, points=3, progress=False)
    both = trajscope.open_metrics([tmp_path / "a", tmp_path / "b"])
    assert list(both.run.values) == ["a", "b"]
    assert both.inst_gap.dims == ("run", "step")
    assert not np.allclose(both.inst_gap.sel(run="a"), both.inst_gap.sel(run="b"))
