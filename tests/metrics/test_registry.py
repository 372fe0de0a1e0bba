"""The metric registry: one contract for built-ins and plugins, checked at registration.

The plugin tests use the real package in ``tests/plugin_pkg`` (the worked example of
``docs/adding-a-metric.md``). Installing it with pip needs the ``wheel`` package and, offline, may
not be possible, so the fixture lays it out exactly as an installer would: the package directory
plus a ``*.dist-info`` with ``METADATA`` and the ``entry_points.txt`` generated from its
``pyproject.toml``, on ``sys.path``. ``importlib.metadata`` discovers it from there like any
installed distribution.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomllib
from click.testing import CliRunner

import trajscope
from support.problems import make_quadratic, train_quadratic
from trajscope.cli import cli
from trajscope.errors import MetricRegistrationError, TrajscopeWarning
from trajscope.metrics import registry
from trajscope.metrics.registry import MetricSpec, get_metrics, markdown_table, metric, refresh_plugins, series

PLUGIN_SRC = Path(__file__).parents[1] / "plugin_pkg"


def install_plugin(target: Path) -> Path:
    """Lay out tests/plugin_pkg in ``target`` as pip would install it (site-packages layout)."""
    meta = tomllib.loads((PLUGIN_SRC / "pyproject.toml").read_text())["project"]
    shutil.copytree(PLUGIN_SRC / "trajscope_example_plugin", target / "trajscope_example_plugin")
    dist = target / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    eps = meta["entry-points"]["trajscope.metrics"]
    (dist / "entry_points.txt").write_text(
        "[trajscope.metrics]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
    )
    return target


@pytest.fixture
def plugin(tmp_path: Path):
    site = install_plugin(tmp_path / "site")
    sys.path.insert(0, str(site))
    refresh_plugins()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("trajscope_example_plugin", None)
        refresh_plugins()
        assert "relative_update" not in get_metrics()


def test_plugin_is_discovered_through_its_entry_point(plugin) -> None:
    eps = [ep.name for ep in importlib.metadata.entry_points(group="trajscope.metrics")]
    assert "relative_update" in eps
    spec = get_metrics()["relative_update"]
    assert spec.source == "trajscope-example-plugin"
    assert spec.per_layer and spec.holds_if == "< 0.1"


def test_plugin_metric_is_in_the_dataset(plugin, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_quadratic(run_dir, steps=3)
    ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", points=3, write=False,
                           progress=False)
    assert ds["relative_update"].attrs["metric_source"] == "trajscope-example-plugin"
    assert ds["relative_update"].attrs["description"] == "‖Δ_t‖ / ‖x_t‖ = ‖x_{t+1} − x_t‖ / ‖x_t‖"
    np.testing.assert_allclose(ds.relative_update.values,
                               ds.update_norm.values / ds.param_norm.values, rtol=1e-12)
    assert ds["relative_update_by_layer"].dims == ("step", "layer")


def test_plugin_is_listed_by_trajscope_metrics(plugin) -> None:
    # A fresh interpreter, as a user would run it: discovery from the entry point alone.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), *sys.path])}
    out = subprocess.run([sys.executable, "-m", "trajscope.cli", "metrics"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("relative_update "))
    assert "‖Δ_t‖ / ‖x_t‖" in line and "< 0.1" in line and "[trajscope-example-plugin]" in line
    assert "(+layer)" in line


def test_cli_metrics_lists_every_builtin() -> None:
    res = CliRunner().invoke(cli, ["metrics"])
    assert res.exit_code == 0
    for name, spec in get_metrics().items():
        line = next(l for l in res.output.splitlines() if l.split()[0] == name)
        assert spec.description in line and (spec.holds_if or "-") in line
    assert "(opt-in: --sharpness)" in next(l for l in res.output.splitlines() if l.startswith("sharpness "))
    md = CliRunner().invoke(cli, ["metrics", "--markdown"])
    assert md.output == markdown_table(get_metrics().values())


# --- the contract, checked at registration -------------------------------------------------------


def good(p: object) -> float:
    return 0.0


@pytest.mark.parametrize(
    ("kwargs", "fn", "match"),
    [
        ({"name": "Bad-Name"}, good, "expected snake_case"),
        ({"holds_if": "sometimes"}, good, "holds_if 'sometimes'"),
        ({"dims": ("time",)}, good, r"unknown dims \['time'\]"),
        ({"needs": ("hessian_trace",)}, good, r"unknown needs \['hessian_trace'\]"),
        ({"units": ""}, good, "'units' must be a non-empty string"),
        ({"per_layer": True, "dims": ("alpha",)}, good, "per_layer metrics must be scalar"),
        ({}, lambda p, q: 0.0, r"must take exactly one argument \(p: PairView\)"),
        ({"name": "inst_gap"}, good, "already registered by trajscope"),
    ],
)
def test_bad_pair_metrics_are_refused_at_registration(kwargs: dict, fn, match: str) -> None:
    spec = dict(name="my_metric", long_name="mine", units="1", description="0")
    spec.update(kwargs)
    with pytest.raises(MetricRegistrationError, match=match):
        metric(**spec)(fn)
    assert "my_metric" not in registry._REGISTRY


def test_bad_series_metrics_are_refused_at_registration() -> None:
    with pytest.raises(MetricRegistrationError, match="must name the variables it reads"):
        series("my_series", requires=(), long_name="s", units="1", description="d")(lambda ds: 0)
    with pytest.raises(MetricRegistrationError, match="requires must be empty"):
        registry.register(MetricSpec("my_pair", good, "pair", "p", "1", "d", requires=("inst_gap",)))


def test_error_names_the_plugin_distribution() -> None:
    with registry._loading_from("acme-metrics"):
        with pytest.raises(MetricRegistrationError, match=r"'my_metric' \(from acme-metrics\)"):
            metric("my_metric", long_name="m", units="1", description="d", holds_if="maybe")(good)


def test_broken_plugins_warn_and_good_ones_register(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("fake_trajscope_plugins")
    mod.spec_ok = MetricSpec("fake_ok", good, "pair", "ok", "1", "0", source="fake")  # type: ignore[attr-defined]
    mod.spec_bad = MetricSpec("fake_bad", good, "pair", "bad", "1", "0", holds_if="often")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_trajscope_plugins", mod)
    fake = [
        importlib.metadata.EntryPoint("ok", "fake_trajscope_plugins:spec_ok", "trajscope.metrics"),
        importlib.metadata.EntryPoint("bad", "fake_trajscope_plugins:spec_bad", "trajscope.metrics"),
        importlib.metadata.EntryPoint("gone", "no_such_module_xyz:m", "trajscope.metrics"),
        importlib.metadata.EntryPoint("odd", "fake_trajscope_plugins:__name__", "trajscope.metrics"),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: fake)
    refresh_plugins()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            specs = get_metrics()
        messages = [str(w.message) for w in caught if issubclass(w.category, TrajscopeWarning)]
        assert "fake_ok" in specs and "fake_bad" not in specs
        assert any("'bad'" in m and "holds_if 'often'" in m for m in messages), messages
        assert any("'gone'" in m and "no_such_module_xyz" in m for m in messages), messages
        assert any("'odd'" in m and "expected a MetricSpec" in m for m in messages), messages
        assert "inst_gap" in specs  # the built-ins are untouched
    finally:
        monkeypatch.undo()
        refresh_plugins()
    assert "fake_ok" not in get_metrics()


def test_spec_repr_is_one_line() -> None:
    r = repr(get_metrics()["inst_gap"])
    assert "\n" not in r and "inst_gap" in r and "holds_if='<= 0'" in r


def test_directly_registered_metric_survives_refresh() -> None:
    @metric("notebook_metric", long_name="n", units="1", description="‖Δ_t‖")
    def notebook_metric(p) -> float:
        return p.norm("delta")

    try:
        assert get_metrics()["notebook_metric"].source == "test_registry"  # its module
        refresh_plugins()
        assert "notebook_metric" in get_metrics()
    finally:
        registry._REGISTRY.pop("notebook_metric", None)


def test_rerunning_a_definition_replaces_it_and_another_module_is_refused() -> None:
    """A notebook cell run twice defines the metric again in the same module: the new one wins."""
    try:
        for scale in (1.0, 2.0):
            @metric("rerun_metric", long_name="r", units="param", description="s·‖Δ_t‖")
            def rerun_metric(p, s=scale) -> float:
                return s * p.norm("delta")

        assert get_metrics()["rerun_metric"].fn is rerun_metric
        other = types.FunctionType(good.__code__, {}, "other")
        other.__module__ = "somewhere_else"
        with pytest.raises(MetricRegistrationError, match="already registered by test_registry"):
            metric("rerun_metric", long_name="r", units="1", description="d")(other)
        assert get_metrics()["rerun_metric"].fn is rerun_metric
    finally:
        registry._REGISTRY.pop("rerun_metric", None)


def test_builtins_register_through_the_loader_not_on_import() -> None:
    """Importing trajscope.metrics.builtins registers nothing; get_metrics loads it like a plugin module."""
    code = (
        "import sys; import trajscope.metrics.builtins, trajscope.metrics.registry as r; "
        "assert r._REGISTRY == {}, list(r._REGISTRY); "
        "specs = r.get_metrics(); assert 'inst_gap' in specs and specs['inst_gap'].source == 'trajscope'; "
        "assert list(specs)[0] == 'loss_line'; "
        "assert 'torch' not in sys.modules and 'xarray' not in sys.modules, 'heavy import'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_cli_metrics_listing_does_not_import_torch() -> None:
    code = (
        "import sys; from trajscope.cli import main\n"
        "try:\n    main(['metrics'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "inst_gap" in out.stdout


def test_per_layer_view_refuses_whole_model_quantities() -> None:
    from trajscope.metrics.pair import LayerView, PairView
    from trajscope.testing import synthetic_pair

    stats, _ = synthetic_pair()
    view = LayerView(stats, 0)
    for name in ("ell", "dell", "integral_dell", "loss_line", "lr", "extra"):
        with pytest.raises(AttributeError, match=f"per-layer view has no '{name}': it is a whole-model"):
            getattr(view, name)
    assert PairView(stats).ell(1) == stats.loss_line[list(stats.alpha).index(1.0)]
    per_layer = [s for s in get_metrics().values() if s.per_layer]
    assert len(per_layer) >= 10
    values = registry.evaluate_pair(stats, per_layer)
    for s in per_layer:
        assert values[f"{s.name}_by_layer"].shape == (len(stats.layers),)
        assert np.isfinite(values[f"{s.name}_by_layer"]).all(), s.name


OLD_NAMES = textwrap.dedent('''
    import warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from trajscope.pairs import LayerView, PairStats, PairView, TERMS
        from trajscope.registry import MetricSpec, get_metrics, metric, series
        import trajscope.pairs, trajscope.registry  # already imported: no second warning
    import trajscope.metrics as m
    import trajscope.metrics.pair as pair
    assert (LayerView, PairStats, PairView, TERMS) == (m.LayerView, m.PairStats, m.PairView, pair.TERMS)
    assert (MetricSpec, get_metrics, metric, series) == (m.MetricSpec, m.get_metrics, m.metric, m.series)
    for w in caught:
        print(w.category.__name__, w.filename == "<string>", w.message)
''')


def test_the_old_plugin_names_still_import_and_warn_once() -> None:
    """A plugin written against ``trajscope.pairs`` / ``trajscope.registry`` keeps working for one
    release: the same objects as ``trajscope.metrics``, one DeprecationWarning per module, pointing
    at the plugin's own import line."""
    out = subprocess.run([sys.executable, "-c", OLD_NAMES], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("DeprecationWarning True trajscope.pairs is deprecated")
    assert "import PairView, LayerView, PairStats, TERMS and VECTORS from trajscope.metrics" in lines[0]
    assert lines[1].startswith("DeprecationWarning True trajscope.registry is deprecated")


def test_the_plugin_api_is_the_metrics_package() -> None:
    """What docs/adding-a-metric.md imports: the decorators and views from ``trajscope.metrics``,
    the same registry the analysis reads."""
    import trajscope.metrics as m

    assert m.metric is metric and m.series is series and m.get_metrics is get_metrics
    assert m.MetricSpec is MetricSpec and m.ENTRY_POINT_GROUP == "trajscope.metrics"
    assert {"metric", "series", "PairView", "LayerView", "MetricSpec", "get_metrics"} <= set(m.__all__)
