"""``trajscope.testing.check_metric``: the contract check plugin authors run, on a synthetic quadratic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trajscope.errors import MetricRegistrationError
from trajscope.metrics import registry
from trajscope.metrics.pair import LayerView, PairView
from trajscope.metrics.registry import MetricSpec, get_metrics
from trajscope.testing import QuadraticPair, check_metric, synthetic_dataset, synthetic_pair

PLUGIN = Path(__file__).parent / "plugin_pkg"


@pytest.mark.parametrize("name", list(get_metrics()))
def test_every_registered_metric_keeps_the_contract(name: str) -> None:
    out = check_metric(get_metrics()[name])
    assert name in out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


CLOSED_FORMS: dict[str, tuple[object, float]] = {
    # name: (closed form of the QuadraticPair, atol); rtol 1e-9 everywhere
    "loss_change": (lambda q: q.ell(1) - q.ell(0), 0.0),
    "inst_gap": (lambda q: q.ell(1) - q.ell(0) - q.dell(1), 0.0),
    "inst_gap_fwd": (lambda q: q.ell(0) + q.dell(0) - q.ell(1), 0.0),
    "line_integral_residual": (lambda q: 0.0, 1e-12),  # ℓ' is linear: Simpson is exact
    "directional_curvature": (lambda q: (q.delta @ (q.h * q.delta)) / (q.delta @ q.delta), 0.0),
    "inst_smoothness": (lambda q: q.norm(q.G1 - q.G0) / q.norm(q.delta), 0.0),
    "stability_ratio": (lambda q: q.norm(q.G1 - q.G0) / q.norm(q.delta) * q.lr / 2, 0.0),
    "sharpness": (lambda q: q.h.max(), 0.0),
    "update_corr": (lambda q: q.g_next @ q.delta, 0.0),
    "convexity_ref_num": (lambda q: q.G0 @ (q.x - q.x_ref), 0.0),
    "convexity_ref_den": (lambda q: q.ell(0) - q.f(q.x_ref), 0.0),
    "update_norm": (lambda q: q.norm(q.delta), 0.0),
    "dist_from_init": (lambda q: q.norm(q.x - q.x0), 0.0),
    "effective_lr": (lambda q: q.norm(q.delta) / q.norm(q.g), 0.0),
    "update_cos_prev": (lambda q: _cos(q.delta, q.x - q.x_prev), 0.0),
    "grad_replay_error": (lambda q: q.norm(q.G0 - q.g) / q.norm(q.g), 0.0),
    "grad_replay_cos": (lambda q: _cos(q.G0, q.g), 0.0),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_builtin_metrics_match_the_quadratic_closed_form(name: str) -> None:
    fn, atol = CLOSED_FORMS[name]
    check_metric(get_metrics()[name], expected=fn, atol=atol)  # type: ignore[arg-type]


def test_synthetic_pair_is_an_sgd_step_on_the_quadratic() -> None:
    stats, q = synthetic_pair()
    np.testing.assert_allclose(q.delta, -q.lr * q.g, rtol=1e-12)
    np.testing.assert_allclose(q.G1 - q.G0, q.h * q.delta, rtol=1e-9, atol=1e-15)
    assert PairView(stats).dot("delta", "delta") == pytest.approx(q.delta @ q.delta, rel=1e-12)
    per_layer = [LayerView(stats, i).sq("delta") for i in range(len(stats.layers))]
    assert sum(per_layer) == pytest.approx(q.delta @ q.delta, rel=1e-12)
    assert np.isnan(PairView(synthetic_pair(needs=())[0]).extra("sharpness"))


def spec(fn, **kw: object) -> MetricSpec:
    fields = dict(name="my_check", fn=fn, kind="pair", long_name="m", units="1", description="d",
                  source="acme") | kw
    return MetricSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("made", "match"),
    [
        (spec(lambda p: p.ell(1), per_layer=True), r"'my_check' \(from acme\).*whole-model quantity"),
        (spec(lambda p: p.loss_line), r"shape \(17,\), expected \(\)"),
        (spec(lambda p: 1.0, dims=("alpha",)), r"shape \(\), expected \(17,\)"),
        (spec(lambda p: p.extra("sharpness")), r"declare needs=\('sharpness',\)"),
        (spec(lambda p: float("nan")), "not finite"),
        (spec(lambda p: p.dot("x", "g_next")), "no inner product term x.g_next"),
        (spec(lambda p: 0.0, holds_if="often"), "holds_if 'often'"),
        (spec(lambda p: 0.0, kind="series", requires=("no_such_metric",)), "no registered metric provides"),
        (spec(lambda ds: ds["loss_change"].values[:2], kind="series", requires=("loss_change",)),
         r"shape \(2,\), expected \(6,\)"),
    ],
)
def test_contract_violations_raise_one_clear_error(made: MetricSpec, match: str) -> None:
    with pytest.raises(MetricRegistrationError, match=match):
        check_metric(made)
    assert "my_check" not in registry._REGISTRY  # checking registers nothing


def test_expected_value_mismatch_names_both_values() -> None:
    with pytest.raises(MetricRegistrationError, match="expected"):
        check_metric(get_metrics()["update_norm"], expected=lambda q: 2 * q.norm(q.delta))


def test_series_metric_and_undecorated_function() -> None:
    out = check_metric(spec(lambda ds: np.cumsum(ds["update_norm"].values), kind="series",
                            requires=("update_norm",)))
    assert out["my_check"].shape == (6,)
    assert set(synthetic_dataset()["step"].values) == set(range(6))
    with pytest.raises(MetricRegistrationError, match="decorated with @metric/@series"):
        check_metric(lambda p: 0.0)


def test_the_docs_example_plugin_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGIN))
    monkeypatch.delitem(sys.modules, "trajscope_example_plugin", raising=False)
    with registry._loading_from("trajscope-example-plugin"):  # declared, not registered
        from trajscope_example_plugin import relative_update
    try:
        check_metric(relative_update, expected=lambda q: QuadraticPair.norm(q.delta) / q.norm(q.x))
    finally:
        sys.modules.pop("trajscope_example_plugin", None)
    assert "relative_update" not in registry._REGISTRY


def test_testing_module_does_not_import_torch() -> None:
    code = ("import sys; from trajscope.testing import check_metric; "
            "from trajscope.metrics.registry import get_metrics; "
            "[check_metric(s) for s in get_metrics().values()]; assert 'torch' not in sys.modules, 'torch'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
