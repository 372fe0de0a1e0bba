"""Aggregations over the Dataset and ``trajscope summary`` (trajscope.report.summary), on hand-made Datasets
with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

import trajscope
from support.problems import train_quadratic
from trajscope.cli import cli
from trajscope.errors import AnalysisError
from trajscope.report.summary import (
    convexity_ratio_by_epoch,
    convexity_ratio_cumulative,
    convexity_ratio_ema,
    convexity_ratio_window,
    format_headline,
    format_summary,
    headline,
    holds_fraction,
    l0l1_fit,
    summarize,
)


def make_ds(num, den, steps=None, **extra) -> xr.Dataset:
    steps = np.arange(len(num)) if steps is None else np.asarray(steps)
    data = {"convexity_num": ("step", np.asarray(num, float), {"holds_if": ""}),
            "convexity_den": ("step", np.asarray(den, float), {"holds_if": ""})}
    for k, (v, h) in extra.items():
        data[k] = ("step", np.asarray(v, float), {"holds_if": h})
    return xr.Dataset(data, coords={"step": steps})


def test_cumulative_window_and_epoch_ratios() -> None:
    ds = make_ds([1, 2, 3, 4], [2, 2, 2, 2], steps=[0, 1, 10, 11])
    np.testing.assert_allclose(convexity_ratio_cumulative(ds).values, [0.5, 0.75, 1.0, 1.25])
    np.testing.assert_allclose(convexity_ratio_window(ds, 2).values, [0.5, 0.75, 1.25, 1.75])
    np.testing.assert_allclose(convexity_ratio_window(ds, 1).values, [0.5, 1, 1.5, 2])
    by = convexity_ratio_by_epoch(ds, steps_per_epoch=10)
    assert list(by.epoch.values) == [0, 1]
    np.testing.assert_allclose(by.values, [3 / 4, 7 / 4])
    # an epoch coordinate, when the Dataset has one
    by2 = convexity_ratio_by_epoch(ds.assign_coords(epoch=("step", [0, 0, 0, 1])))
    np.testing.assert_allclose(by2.values, [6 / 6, 4 / 2])
    with pytest.raises(AnalysisError, match="steps_per_epoch"):
        convexity_ratio_by_epoch(ds)


def test_ema_ratio_is_a_ratio_of_averages() -> None:
    num, den = np.array([1.0, -3.0, 2.0]), np.array([1.0, 1.0, 4.0])
    beta = 0.9
    a = b = 0.0
    want = []
    for x, y in zip(num, den):
        a, b = beta * a + (1 - beta) * x, beta * b + (1 - beta) * y
        want.append(a / b)
    np.testing.assert_allclose(convexity_ratio_ema(make_ds(num, den), beta).values, want)
    # β = 0: the per-step ratio
    np.testing.assert_allclose(convexity_ratio_ema(make_ds(num, den), 0.0).values, num / den)


def test_holds_fraction_counts_defined_pairs_only() -> None:
    ds = make_ds([1, 1, 1, 1], [1, 1, 1, 1],
                 inst_gap=([-1, 0, 2, np.nan], "<= 0"),
                 update_corr=([1, -1, -1, -1], "< 0"),
                 inst_smoothness=([1, 2, 3, 4], "bounded"),
                 loss_replay_error=([np.nan] * 4, "<= 1e-5"))
    h = holds_fraction(ds)
    assert h["inst_gap"] == pytest.approx(2 / 3)
    assert h["update_corr"] == pytest.approx(3 / 4)
    assert "inst_smoothness" not in h and "convexity_num" not in h
    assert np.isnan(h["loss_replay_error"])


def test_l0l1_fit_frontier() -> None:
    # s_t ≤ L0 + L1·n_t with s = (2, 3, 5), n = (1, 2, 4)
    ds = make_ds([0, 0, 0], [1, 1, 1], inst_smoothness=([2, 3, 5], ""),
                 replay_grad_norm=([1, 2, 4], ""))
    fit = l0l1_fit(ds, l1=[0.0, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(fit.l0.values, [5, 3, 1, 0])
    # L1 = 1, L0 = 1: bounds (2, 3, 5): tight everywhere
    np.testing.assert_allclose(fit.looseness_median.sel(l1=1.0), 1.0)
    np.testing.assert_allclose(fit.looseness_max.sel(l1=0.0), 5 / 2)
    frontier = l0l1_fit(ds)
    assert frontier.l1.values[0] == 0 and frontier.l1.values[-1] == pytest.approx(2.0)  # max s/n
    assert frontier.l0.values[-1] == pytest.approx(0.0)
    assert np.all(np.diff(frontier.l0.values) <= 1e-12)  # L0 decreases as L1 grows
    # the bound holds at every point of the frontier
    s, n = np.array([2, 3, 5.0]), np.array([1, 2, 4.0])
    for l1, l0 in zip(frontier.l1.values, frontier.l0.values):
        assert np.all(s <= l0 + l1 * n + 1e-12)


def test_summary_cli_and_python_twin(tmp_path) -> None:
    run_dir = tmp_path / "run"
    train_quadratic(run_dir, steps=8)
    res = CliRunner().invoke(cli, ["summary", str(run_dir)])
    assert res.exit_code != 0  # not analyzed yet
    res = CliRunner().invoke(cli, ["analyze", str(run_dir), "--dtype", "float64", "--points", "3",
                                   "--sharpness", "--reference", "4", "-q"])
    assert res.exit_code == 0, res.output
    ds = trajscope.open_metrics(run_dir)
    assert '"reference_step": 4' in ds.attrs["probe"]
    np.testing.assert_allclose(ds.sharpness.values, 5.0, rtol=1e-6)  # λ_max(A)
    s = trajscope.summarize(run_dir, steps_per_epoch=4)
    assert s["pairs"] == 8
    assert s["holds"]["inst_gap"] == 1.0  # convex quadratic
    assert s["holds"]["descent_lemma_gap"] == 1.0
    assert set(s["convexity_ratio"]["by_epoch"]) == {0, 1}
    assert s["l0l1"]["L_plain"] == pytest.approx(s["max_inst_smoothness"])
    assert "median_stability_ratio_last_half" in s
    assert s["median_sharpness"] == pytest.approx(5.0, rel=1e-6)
    res = CliRunner().invoke(cli, ["summary", str(run_dir), "--steps-per-epoch", "4"])
    assert res.exit_code == 0, res.output
    assert "where the theory holds" in res.output and "(L0, L1)-smoothness fit" in res.output
    assert "per epoch: 0:" in res.output
    res = CliRunner().invoke(cli, ["summary", str(run_dir), "--json"])
    assert json.loads(res.output)["pairs"] == 8


def test_one_ema_and_the_report_reads_the_datasets_derived_variables() -> None:
    import trajscope.report as report
    from trajscope.report import figures
    from trajscope.report.summary import ema, fraction, line_argmin, running_sum, stability_ratio, table_rows

    assert report.ema is ema and figures.ema is ema
    num, den = np.array([1.0, -3.0, 2.0, 0.5]), np.array([1.0, 1.0, 4.0, 2.0])
    np.testing.assert_allclose(convexity_ratio_ema(make_ds(num, den), 0.7).values,
                               ema(num, 0.7) / ema(den, 0.7), rtol=1e-14)
    ds = make_ds(num, den, inst_smoothness=([1, 2, 3, 4], ""), loss_change=([1, np.nan, 2, 3], ""),
                 update_corr=([np.nan] * 4, "< 0")).assign_coords(lr=("step", np.full(4, 0.5)))
    # without the series variables: their definitions
    np.testing.assert_allclose(stability_ratio(ds), [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(running_sum(ds, "loss_change"), [1, 1, 3, 6])
    rows = table_rows(ds)
    assert rows["sum_loss_change"] == 6 and np.isnan(rows["sum_update_corr"])
    assert rows["median_stability_ratio_last_half"] == pytest.approx(0.875)
    assert rows["frac_stability_ratio_gt_1"] == 0.0
    assert fraction([1.0, -1.0, np.nan], "< 0") == 0.5
    # with them, the variables win
    ds2 = ds.assign(stability_ratio=("step", np.full(4, 2.0)), loss_change_cumsum=("step", np.arange(4.0)))
    np.testing.assert_allclose(stability_ratio(ds2), 2.0)
    np.testing.assert_allclose(running_sum(ds2, "loss_change"), np.arange(4.0))
    assert table_rows(ds2)["frac_stability_ratio_gt_1"] == 1.0
    line = xr.Dataset({"loss_line": (("step", "alpha"), [[3.0, 1.0, 2.0], [np.nan, 5.0, 4.0]])},
                      coords={"alpha": [0.0, 0.5, 1.0]})
    np.testing.assert_allclose(line_argmin(line), [0.5, 1.0])
    np.testing.assert_allclose(line_argmin(line.assign(line_argmin=("step", [0.0, 0.0]))), [0.0, 0.0])


def test_headline_leaves_zero_update_pairs_out_and_counts_clipped_pairs() -> None:
    from trajscope.analysis.health import FLAGS

    zero, clipped, nonuniform = (FLAGS[n][0] for n in ("zero_update", "clipped", "clipped_nonuniform"))
    # lr = 0 warm-up: two pairs with Δ = 0, where inst_gap = 0 would read as "convex"
    ds = make_ds([1] * 5, [1] * 5, inst_gap=([0, 0, 1, -1, 1], "<= 0"),
                 update_corr=([0, 0, 1, 1, -1], "> 0"))
    ds = ds.assign_coords(pair_flags=("step", np.array([zero, zero, clipped, clipped, nonuniform], np.int16)))
    h = headline(ds)
    assert h["pairs"] == 5 and h["pairs_moved"] == 3
    assert h["frac_inst_gap_le_0"] == pytest.approx(1 / 3)
    assert h["frac_update_corr_gt_0"] == pytest.approx(2 / 3)
    assert h["pairs_clipped"] == 3
    text = format_headline(h)
    assert "clipped on 3 of 5 pairs" in text
    assert holds_fraction(ds)["inst_gap"] == pytest.approx(1 / 3)
    assert "clipped on 3 of 5 pairs" in format_summary(summarize(ds))
    # without flags (or with none set) nothing is left out and nothing is said about clipping
    plain = make_ds([1] * 3, [1] * 3, inst_gap=([0, 1, -1], "<= 0"))
    h = headline(plain)
    assert "pairs_moved" not in h and "pairs_clipped" not in h
    assert h["frac_inst_gap_le_0"] == pytest.approx(2 / 3)
    assert "clipped" not in format_headline(h)
