"""The built-in metrics (trajscope.metrics.builtins), the whole catalogue of metrics.md: every variable
produced and documented, closed forms on the
stochastic quadratic f(x; b) = ½xᵀAx − bᵀx (Hessian A, eigenvalues 0.2 … 5)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import trajscope
from support.problems import EIGS, A, make_quadratic, quad_loss, train_quadratic
from trajscope.metrics.registry import get_metrics, markdown_table

DOCS = Path(__file__).resolve().parents[2] / "docs"
LR = 0.15

# Every Dataset variable named in the catalogue (metrics.md), sharpness included.
CATALOGUE = [
    "loss_line", "dloss_line", "loss_change", "line_integral_residual", "line_argmin",
    "inst_gap", "inst_gap_fwd", "convexity_num", "convexity_den", "convexity_ratio",
    "convexity_ratio_ref", "weak_convexity", "directional_curvature",
    "inst_smoothness", "inst_smoothness_xbatch", "pathwise_smoothness", "stability_ratio",
    "sharpness", "descent_lemma_gap",
    "update_corr", "update_corr_same_batch", "update_corr_cumsum",
    "grad_norm", "update_norm", "param_norm", "dist_from_init", "grad_cos_prev",
    "update_cos_prev", "update_grad_cos", "effective_lr",
    "loss_replay_error", "grad_replay_error",
]
PER_LAYER = ["grad_norm", "update_norm", "param_norm", "dist_from_init", "grad_cos_prev",
             "update_cos_prev", "update_grad_cos", "effective_lr", "inst_smoothness"]


@pytest.fixture(scope="module")
def quad(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("quadcat") / "run"
    bs = train_quadratic(run_dir, steps=12, lr=LR)
    ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", sharpness=True,
                           progress=False)
    run = trajscope.open_run(run_dir)
    xs = [run.snapshot(t).params["x"] for t in range(13)]
    return run_dir, bs, xs, ds


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def test_every_catalogue_variable_is_produced_with_attrs(quad) -> None:
    *_, ds = quad
    for name in CATALOGUE + [f"{n}_by_layer" for n in PER_LAYER]:
        assert name in ds, name
        for key in ("long_name", "units", "description", "holds_if"):
            assert key in ds[name].attrs, (name, key)
        assert ds[name].attrs["description"], name
        assert ds[name].dims[0] == "step"
    for n in PER_LAYER:
        assert ds[f"{n}_by_layer"].dims == ("step", "layer")
    assert list(ds.layer.values) == ["x"]


def test_directional_and_pathwise_curvature_closed_form(quad) -> None:
    _, _, xs, ds = quad
    want = np.array([float(d @ A @ d / (d @ d)) for d in (xs[t + 1] - xs[t] for t in range(12))])
    assert rel(ds.directional_curvature.values, want) < 1e-6
    assert rel(ds.pathwise_smoothness.values, want) < 1e-6
    # convex: no weak-convexity constant needed
    assert np.all(ds.weak_convexity.values == 0)


def test_sharpness_is_lambda_max_of_A(quad) -> None:
    *_, ds = quad
    assert rel(ds.sharpness.values, np.full(12, EIGS.max())) < 1e-6
    assert np.all(ds.sharpness_converged.values == 1)
    assert np.all(ds.sharpness_iterations.values <= len(EIGS))  # Krylov space exhausted


def test_line_argmin_closed_form(quad) -> None:
    _, bs, xs, ds = quad
    grid = ds.alpha.values
    for t in range(12):
        d = xs[t + 1] - xs[t]
        slope = float((A @ xs[t] - bs[t]) @ d)
        a_star = -slope / float(d @ A @ d)  # minimiser of the parabola ℓ(α)
        assert ds.line_argmin.values[t] == grid[np.argmin(np.abs(grid - a_star))]


def test_reference_point_convexity_ratio_closed_form(quad) -> None:
    run_dir, bs, xs, ds = quad

    def want(ref: int) -> np.ndarray:
        xr_ = xs[ref]
        num = [float((A @ xs[t] - bs[t]) @ (xs[t] - xr_)) for t in range(12)]
        den = [float(quad_loss_at(xs[t], bs[t]) - quad_loss_at(xr_, bs[t])) for t in range(12)]
        return np.cumsum(num) / np.cumsum(den)

    assert rel(ds.convexity_ratio_ref.values, want(12)) < 1e-8  # default x*: the final state
    # f convex ⇒ ⟨∇f(x), x − x*⟩ ≥ f(x) − f(x*) pair by pair, so the ratio is ≥ 1 where den > 0
    ds6 = trajscope.analyze(run_dir, make_quadratic, dtype="float64", reference=6, write=False,
                            progress=False)
    assert rel(ds6.convexity_ratio_ref.values, want(6)) < 1e-8
    assert "reference_step" in ds6.attrs["probe"] and '"reference_step": 6' in ds6.attrs["probe"]
    with pytest.raises(trajscope.TrajscopeError, match="reference=99"):
        trajscope.analyze(run_dir, make_quadratic, reference=99, write=False, progress=False)


def quad_loss_at(x: torch.Tensor, b: torch.Tensor) -> float:
    return float(0.5 * x @ A @ x - b @ x)


def test_smoothness_family_closed_form(quad) -> None:
    _, bs, xs, ds = quad
    ds_ = [xs[t + 1] - xs[t] for t in range(12)]
    smooth = np.array([float((A @ d).norm() / d.norm()) for d in ds_])
    assert rel(ds.stability_ratio.values, smooth * LR / 2) < 1e-8
    xb = np.array([float((A @ d - (bs[t + 1] - bs[t])).norm() / d.norm()) for t, d in enumerate(ds_[:-1])])
    assert rel(ds.inst_smoothness_xbatch.values[:-1], xb) < 1e-8
    assert np.isnan(ds.inst_smoothness_xbatch.values[-1])  # x_12 is the final state: no g_12
    L = np.maximum.accumulate(smooth)
    gap = np.array([0.5 * float(d @ A @ d) for d in ds_]) - L / 2 * np.array([float(d @ d) for d in ds_])
    assert rel(ds.descent_lemma_gap.values, gap) < 1e-8
    assert np.all(ds.descent_lemma_gap.values <= 1e-12)  # L ≥ ‖AΔ‖/‖Δ‖ ≥ ΔᵀAΔ/‖Δ‖²


def test_trajectory_statistics_closed_form(quad) -> None:
    _, bs, xs, ds = quad
    g = [A @ xs[t] - bs[t] for t in range(12)]
    assert rel(ds.param_norm.values, [float(xs[t].norm()) for t in range(12)]) < 1e-12
    assert rel(ds.dist_from_init.values, [float((xs[t] - xs[0]).norm()) for t in range(12)]) < 1e-12
    # the first SGD step has no momentum yet: Δ_0 = −lr·g_0
    assert ds.effective_lr.values[0] == pytest.approx(LR, rel=1e-12)
    assert ds.update_grad_cos.values[0] == pytest.approx(1.0, rel=1e-12)
    cos = [float(g[t] @ g[t - 1] / (g[t].norm() * g[t - 1].norm())) for t in range(1, 12)]
    assert np.isnan(ds.grad_cos_prev.values[0])
    assert rel(ds.grad_cos_prev.values[1:], cos) < 1e-10
    np.testing.assert_array_equal(ds.grad_norm_by_layer.values[:, 0], ds.grad_norm.values)


def test_update_corr_cumsum_beside_loss_change_cumsum(quad) -> None:
    *_, ds = quad
    uc = ds.update_corr.values
    np.testing.assert_allclose(ds.update_corr_cumsum.values, np.cumsum(np.nan_to_num(uc)), rtol=1e-12)
    np.testing.assert_allclose(ds.loss_change_cumsum.values, np.cumsum(ds.loss_change.values), rtol=1e-12)


def test_docs_metrics_table_is_the_registry() -> None:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- registry-table:start -->\n(.*?)<!-- registry-table:end -->", text, re.S)
    assert m, "docs/metrics.md lacks the registry-table markers"
    builtins = [s for s in get_metrics().values() if s.source == "trajscope"]
    assert m.group(1) == markdown_table(builtins), (
        "docs/metrics.md is out of date: paste `trajscope metrics --markdown` between the markers"
    )
    # and every built-in is explained in the prose too
    for spec in builtins:
        assert text.count(f"`{spec.name}`") >= 2, spec.name


def test_docs_name_every_catalogue_variable() -> None:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    for name in CATALOGUE:
        assert f"`{name}`" in text, name


def test_reference_point_of_a_crashed_run(tmp_path) -> None:
    # A crashed run has no final state, hence no default x*: NaN, unless a step is named.
    from support.problems import QuadModel
    from support.recording import train_steps

    run_dir = tmp_path / "crashed"
    model = QuadModel()
    with torch.no_grad():
        model.x.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    b = torch.ones(6, dtype=torch.float64)
    with pytest.raises(KeyboardInterrupt):
        with trajscope.Recorder(run_dir, model, opt) as rec:
            train_steps(rec, model, opt, quad_loss, [b] * 4)
            raise KeyboardInterrupt
    run = trajscope.open_run(run_dir)
    assert run.status == "crashed" and run.final_step is None
    ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", points=3, write=False,
                           progress=False)
    assert np.all(np.isnan(ds.convexity_ratio_ref.values))
    ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", points=3, reference=3,
                           write=False, progress=False)
    assert np.all(np.isfinite(ds.convexity_ref_num.values))


def test_resumed_analysis_keeps_probe_extras(quad, monkeypatch: pytest.MonkeyPatch) -> None:
    # f(x*; z_t) and the sharpness results are persisted with each pair and read back on resume
    run_dir, *_, ds = quad
    import trajscope.analysis.tasks

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a persisted pair was probed again")

    monkeypatch.setattr(trajscope.analysis.tasks, "probe_pair", boom)
    again = trajscope.analyze(run_dir, make_quadratic, dtype="float64", sharpness=True, progress=False)
    for name in ds.data_vars:
        np.testing.assert_array_equal(again[name].values, ds[name].values, err_msg=name)
