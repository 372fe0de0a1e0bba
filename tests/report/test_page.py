"""``trajscope report`` (trajscope.report.page, drawing the figures of trajscope.report.figures): every
figure draws the Dataset's data, labelled from its attrs, and the HTML page links every PNG."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

import trajscope
from support.recording import minibatches, record
from trajscope.cli import main as cli_main
from trajscope.report import figures, summary
from trajscope.report import page as rp
from trajscope.report.summary import convexity_ratio_window


def make_objective() -> trajscope.Objective:
    """A small tanh MLP classifier: non-convex, cheap to probe."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    return trajscope.Objective(model=model, loss=loss)


def _record(run_dir: Path, lr: float, steps: int = 14) -> None:
    obj = make_objective()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 6, generator=g), torch.randint(0, 3, (128,), generator=g)
    record(run_dir, model, opt, obj.loss, minibatches(x, y, steps, 32, g), objective=make_objective)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two analyzed runs (different learning rates) in directories named ``slow`` and ``fast``."""
    root = tmp_path_factory.mktemp("report_runs")
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 12-unit MLP: extra threads only contend on a busy machine
    try:
        for name, lr in (("slow", 0.05), ("fast", 0.5)):
            _record(root / name, lr)
            trajscope.analyze(root / name, make_objective, points=5, margin=0.25, dtype="float64",
                              progress=False)
            out[name] = root / name
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def datasets(runs: dict[str, Path]) -> dict[str, xr.Dataset]:
    return {name: trajscope.open_metrics(path) for name, path in runs.items()}


@pytest.fixture(scope="module")
def report(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> rp.Report:
    return rp.write_report([runs["slow"], runs["fast"]], tmp_path_factory.mktemp("rep"), beta=0.8, window=3)


# --- independent references ------------------------------------------------------------------


def ref_ema(v: np.ndarray, beta: float) -> np.ndarray:
    out, m, k = [], 0.0, 0
    for x in v:
        if np.isfinite(x):
            m, k = beta * m + (1 - beta) * x, k + 1
        out.append(m / (1 - beta**k) if k else np.nan)
    return np.array(out)


def ref_windowed(num: np.ndarray, den: np.ndarray, k: int) -> np.ndarray:
    out = []
    for i in range(len(num)):
        n = np.nansum(num[max(0, i - k + 1): i + 1])
        d = np.nansum(den[max(0, i - k + 1): i + 1])
        out.append(n / d if d != 0 else np.nan)
    return np.array(out)


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-12, atol=0, equal_nan=True)


# --- the data behind every figure is the Dataset's -------------------------------------------


def test_every_figure_written_and_nothing_skipped(report: rp.Report) -> None:
    assert list(report.figures) == [s.name for s in figures.FIGURES]
    assert report.skipped == {}
    for path in report.figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000


@pytest.mark.parametrize("label", ["slow", "fast"])
def test_line_figures_plot_dataset_values(report: rp.Report, datasets: dict[str, xr.Dataset], label: str) -> None:
    ds = datasets[label]
    d = report.data
    steps = ds["step"].values
    assert_close(d["loss"][f"loss/{label}"], ds["loss_line"].sel(alpha=0.0).values)
    assert_close(d["inst_gap"][f"inst_gap/{label}"], ds["inst_gap"].values)
    assert_close(d["inst_gap"][f"inst_gap/{label}@x"], steps)
    assert_close(d["inst_gap"][f"inst_gap_ema/{label}"], ref_ema(ds["inst_gap"].values, 0.8))
    assert_close(d["convexity_ratio"][f"convexity_ratio/{label}"], ds["convexity_ratio"].values)
    assert_close(d["convexity_ratio"][f"convexity_ratio_window/{label}"],
          ref_windowed(ds["convexity_num"].values, ds["convexity_den"].values, 3))
    assert_close(d["smoothness"][f"inst_smoothness/{label}"], ds["inst_smoothness"].values)
    assert_close(d["smoothness"][f"two_over_lr/{label}"], 2 / ds["lr"].values)
    assert_close(d["smoothness"][f"stability_ratio/{label}"], ds["inst_smoothness"].values * ds["lr"].values / 2)
    assert_close(d["update_corr"][f"update_corr/{label}"], ds["update_corr"].values)
    assert_close(d["update_corr"][f"update_corr_cumsum/{label}"], np.nancumsum(ds["update_corr"].values))
    assert_close(d["update_corr"][f"loss_change_cumsum/{label}"], np.cumsum(ds["loss_change"].values))
    for name in ("loss_replay_error", "grad_replay_error"):
        assert_close(d["replay"][f"{name}/{label}"], np.maximum(ds[name].values, figures.REPLAY_FLOOR))


@pytest.mark.parametrize("label", ["slow", "fast"])
def test_heat_map_is_the_loss_line(report: rp.Report, datasets: dict[str, xr.Dataset], label: str) -> None:
    ds = datasets[label]
    line = ds["loss_line"].values
    rel = line - ds["loss_line"].sel(alpha=0.0).values[:, None]
    expected = rel / np.abs(rel).max(axis=1, keepdims=True)
    mesh = report.data["loss_line"][f"loss_line/{label}"]
    assert mesh.shape == (ds.sizes["step"], ds.sizes["alpha"])
    assert_close(mesh, expected)
    assert_close(report.data["loss_line"][f"line_argmin/{label}@x"], ds["alpha"].values[line.argmin(axis=1)])
    assert_close(report.data["loss_line"][f"line_argmin/{label}"], ds["step"].values)


def test_labels_and_units_come_from_attrs(datasets: dict[str, xr.Dataset]) -> None:
    runs = {"only": datasets["slow"]}
    for fn, var in ((figures.fig_inst_gap, "inst_gap"), (figures.fig_convexity_ratio, "convexity_ratio"),
                    (figures.fig_update_corr, "update_corr"), (figures.fig_smoothness, "inst_smoothness")):
        fig = fn(runs)
        attrs = datasets["slow"][var].attrs
        assert fig.axes[0].get_ylabel() == f"{attrs['long_name']} [{attrs['units']}]"
        step = datasets["slow"]["step"].attrs
        assert fig.axes[0].get_xlabel() == f"{step['long_name']} [{step['units']}]"


def test_index_html_links_every_png_and_shows_the_summary(report: rp.Report,
                                                         datasets: dict[str, xr.Dataset]) -> None:
    class Links(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.imgs: list[str] = []
            self.hrefs: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "img":
                self.imgs.append(a["src"] or "")
            if tag == "a":
                self.hrefs.append(a.get("href") or "")

    text = report.index.read_text(encoding="utf-8")
    parser = Links()
    parser.feed(text)
    pngs = sorted(p.name for p in report.out_dir.glob("*.png"))
    assert sorted(parser.imgs) == pngs
    assert set(pngs) <= set(parser.hrefs)
    assert all((report.out_dir / src).is_file() for src in parser.imgs)
    # the summary table: one column per run, the headline numbers in it
    assert "<th>slow</th><th>fast</th>" in text
    frac = float(np.mean(datasets["fast"]["inst_gap"].values <= 0))
    assert f"{frac:.1%}" in text
    assert report.summary["fast"]["frac_inst_gap_le_0"] == pytest.approx(frac)
    sr = datasets["fast"]["inst_smoothness"].values * datasets["fast"]["lr"].values / 2
    assert report.summary["fast"]["median_stability_ratio_last_half"] == pytest.approx(
        np.median(sr[len(sr) // 2:]))


def test_run_dimension_input_matches_directories(runs: dict[str, Path], report: rp.Report,
                                                tmp_path: Path) -> None:
    """open_metrics([a, b]) (a ``run`` dim) gives the same figures as the two directories."""
    both = trajscope.open_metrics([runs["slow"], runs["fast"]])
    rep = rp.write_report(both, tmp_path, beta=0.8, window=3)
    for fig, data in report.data.items():
        assert set(rep.data[fig]) == set(data)
        for gid, arr in data.items():
            assert_close(rep.data[fig][gid], arr)


def test_optional_variables_are_drawn_only_when_present(datasets: dict[str, xr.Dataset]) -> None:
    ds = datasets["slow"]
    data = figures.figure_data(figures.fig_smoothness({"a": ds}))
    assert "sharpness/a" not in data
    extra = ds.assign(
        sharpness=("step", ds["inst_smoothness"].values * 1.5, {"long_name": "sharpness", "units": "loss/param^2"}),
        stability_ratio=("step", np.full(ds.sizes["step"], 0.25), {"long_name": "stability ratio", "units": "1"}),
    )
    data = figures.figure_data(figures.fig_smoothness({"a": extra}))
    assert_close(data["sharpness/a"], extra["sharpness"].values)
    assert_close(data["stability_ratio/a"], np.full(ds.sizes["step"], 0.25))  # the variable wins


def test_missing_variables_skip_their_figure(datasets: dict[str, xr.Dataset], tmp_path: Path) -> None:
    ds = datasets["slow"].drop_vars(["update_corr", "update_corr_same_batch"])
    rep = rp.write_report({"x": ds}, tmp_path)
    assert "update_corr" not in rep.figures and "update_corr" in rep.skipped
    assert not (tmp_path / "update_corr.png").exists()
    assert "update_corr.png" not in rep.index.read_text(encoding="utf-8")


def test_duplicate_directory_names_get_distinct_labels(tmp_path: Path) -> None:
    labels = rp._unique_labels([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"])
    assert list(labels.values()) == ["a/run", "b/run", "c"]


def test_run_dimension_with_duplicate_labels_keeps_both(datasets: dict[str, xr.Dataset]) -> None:
    """open_metrics labels runs by directory name only, so two `sgd` directories collide."""
    both = xr.concat([datasets["slow"], datasets["fast"]], dim=xr.DataArray(["sgd", "sgd"], dims="run"))
    runs = rp.load_runs(both)
    assert list(runs) == ["sgd", "sgd (1)"]
    assert_close(runs["sgd (1)"]["inst_gap"].values, datasets["fast"]["inst_gap"].values)


def test_windowed_ratio_and_ema_helpers() -> None:
    num, den = np.array([1.0, np.nan, 3.0, -1.0]), np.array([2.0, 1.0, 0.0, -1.0])
    ds = xr.Dataset({"convexity_num": ("step", num), "convexity_den": ("step", den)},
                    coords={"step": np.arange(4)})
    assert_close(convexity_ratio_window(ds, 2).values, ref_windowed(num, den, 2))
    v = np.array([np.nan, 1.0, 2.0, np.nan, 4.0])
    assert_close(summary.ema(v, 0.5), ref_ema(v, 0.5))
    with pytest.raises(trajscope.TrajscopeError, match="beta"):
        summary.ema(v, 1.0)


# --- the command line ------------------------------------------------------------------------


def run_cli(args: list[str]) -> int:
    try:
        cli_main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_report_overlays_runs(runs: dict[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["report", str(runs["slow"]), str(runs["fast"]), "-o", str(tmp_path / "r")]) == 0
    assert re.search(r"wrote .*index\.html \(7 figures\)", capsys.readouterr().out)
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == sorted(f"{s.name}.png" for s in figures.FIGURES)


def test_cli_report_defaults_to_run_dir(runs: dict[str, Path]) -> None:
    assert run_cli(["report", str(runs["slow"])]) == 0
    assert (runs["slow"] / "report" / "index.html").is_file()


def test_cli_report_without_analysis_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(tmp_path / "raw", 0.1, steps=3)
    assert run_cli(["report", str(tmp_path / "raw")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("trajscope: error:") and "analyze" in err and "\n" not in err
    assert "Traceback" not in err
