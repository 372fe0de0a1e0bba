"""Every example runs in ``--small`` mode and the finding it prints holds; its report renders
with the Dataset's data; ``explore.ipynb`` is the same notebook as ``explore.py`` and runs.

Regenerate the notebook after editing ``examples/explore.py``::

    python tests/system/test_examples.py --write-notebook
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import trajscope
from trajscope.report import figures
from trajscope.report import page as rp

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOK = EXAMPLES / "explore.ipynb"


def example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as module ``name`` (as ``python examples/<name>.py`` would
    record it: the objective is ``<name>:make_objective``)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def run_example(name: str, out: Path) -> dict[str, Any]:
    return example(name).main(["--small", "--out", str(out)])


# --- the report of each example ----------------------------------------------------------------


def check_report(result: dict[str, Any], runs: list[Path]) -> None:
    """The example's report exists, its page links every figure, and the figures draw the runs'
    Datasets (checked on ``inst_gap`` and ``convexity_ratio`` against open_metrics)."""
    index = Path(result["report"])
    assert index.is_file()

    class Imgs(HTMLParser):
        srcs: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "img":
                self.srcs.append(dict(attrs)["src"] or "")

    parser = Imgs()
    parser.srcs = []
    parser.feed(index.read_text(encoding="utf-8"))
    assert sorted(parser.srcs) == sorted(f"{s.name}.png" for s in figures.FIGURES)
    assert all((index.parent / s).stat().st_size > 5000 for s in parser.srcs)
    loaded = rp.load_runs(runs)
    data = figures.figure_data(figures.fig_inst_gap(loaded))
    data |= figures.figure_data(figures.fig_convexity_ratio(loaded))
    for label, ds in loaded.items():
        np.testing.assert_array_equal(data[f"inst_gap/{label}"], ds["inst_gap"].values)
        np.testing.assert_array_equal(data[f"convexity_ratio/{label}"], ds["convexity_ratio"].values)


# --- the examples --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def convex_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("convex")
    return out, run_example("convex", out)


def test_convex_inst_gap_never_positive(convex_run: tuple[Path, dict[str, Any]]) -> None:
    """Softmax regression is convex: the gap is ≤ 0 on every step, for SGD and for Adam."""
    out, res = convex_run
    for opt in ("sgd", "adam"):
        r = res[opt]
        assert r["pairs"] >= 25
        assert r["frac_inst_gap_le_0"] == 1.0
        assert r["frac_inst_gap_fwd_le_0"] == 1.0
        assert r["max_rel_line_integral_residual"] < 1e-3  # only Simpson's error on the grid
        assert r["max_grad_replay_error"] < 1e-5  # float64 replay of a float32 training step
        assert r["train_accuracy"] > 0.6
    check_report(res, [out / "sgd", out / "adam"])
    assert json.loads((out / "findings.json").read_text())["sgd"]["frac_inst_gap_le_0"] == 1.0


def test_edge_of_stability_smoothness_tracks_two_over_lr(tmp_path: Path) -> None:
    """At the larger lr, inst_smoothness sits at 2/lr (stability ratio ~1) while the loss falls,
    non-monotonically; at the smaller lr the short run is still in the stable regime."""
    res = run_example("edge_of_stability", tmp_path)
    hi, lo = res["lr1.2"], res["lr0.6"]
    assert 0.85 <= hi["median_stability_ratio_last_half"] <= 1.15
    assert hi["median_inst_smoothness_last_half"] == pytest.approx(2 / 1.2, rel=0.15)
    assert hi["final_loss"] < 0.6 * hi["initial_loss"]
    assert hi["frac_loss_increases"] > 0.1  # oscillating, not monotone
    assert lo["median_stability_ratio_last_half"] < 0.5 and lo["frac_loss_increases"] == 0.0
    assert lo["final_loss"] < 0.6 * lo["initial_loss"]
    check_report(res, [tmp_path / "lr0.6", tmp_path / "lr1.2"])


def test_random_scaling_makes_the_linear_term_unbiased(tmp_path: Path) -> None:
    """With s ~ Exp(1), loss_change − ℓ'(1)/s has mean zero (the O2NC identity); without scaling
    the same difference is inst_gap, whose mean is clearly negative."""
    res = run_example("random_scaling", tmp_path)
    plain, scaled = res["plain"], res["scaled"]
    assert abs(scaled["z_identity_residual"]) < 3
    assert plain["z_identity_residual"] < -3
    assert scaled["mean_scale"] != 1.0 and plain["mean_scale"] == 1.0
    # both runs train (the scaled one is noisier, not broken)
    assert plain["sum_loss_change"] < 0 and scaled["sum_loss_change"] < 0
    check_report(res, [tmp_path / "plain", tmp_path / "scaled"])


def test_cnn_convexity_identities_hold_along_the_path(tmp_path: Path) -> None:
    """Residual network with BatchNorm (train mode): most steps convex along their line, positive
    cumulative convexity ratio, faithful replay, for SGD+momentum and AdamW."""
    res = run_example("cnn", tmp_path)
    for opt in ("sgd", "adamw"):
        r = res[opt]
        assert r["pairs"] >= 5
        assert r["frac_inst_gap_le_0"] > 0.5
        assert r["final_convexity_ratio"] > 0
        assert r["sum_loss_change"] < 0
        assert r["test_accuracy"] > 0.5
        assert r["max_loss_replay_error"] < 1e-4 and r["max_grad_replay_error"] < 1e-3
    check_report(res, [tmp_path / "sgd", tmp_path / "adamw"])


def check_charlm(res: dict[str, Any]) -> None:
    """The character-level GPT learns (loss falls by over a nat per character), its steps are
    mostly convex along their line with a positive cumulative convexity ratio, and the replay of
    the eager model reproduces the training losses."""
    r = res["adamw"]
    assert r["pairs"] >= 5
    assert r["loss_last_tenth"] < r["loss_first_tenth"] - 1.0
    assert r["frac_inst_gap_le_0"] > 0.5
    assert r["final_convexity_ratio"] > 0
    assert r["max_loss_replay_error"] < 1e-4
    assert r["max_grad_replay_error"] < 1e-4  # clipped steps are compared clipped the same way


def test_charlm_trains_and_is_convex_along_its_steps(tmp_path: Path) -> None:
    """Eager (compiling costs a minute on the CPU: the compiled run is the slow test below), with
    gradient clipping and SDPA attention."""
    res = example("charlm").main(["--small", "--no-compile", "--out", str(tmp_path)])
    assert not res["config"]["compile"] and res["config"]["clip"] == 1.0
    check_charlm(res)
    check_report(res, [tmp_path / "adamw"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_charlm_compiled_records_the_plain_model_and_replays(tmp_path: Path) -> None:
    """As people train it: torch.compile (inductor) and clipping. The run names the plain model's
    parameters and the eager replay reproduces the compiled model's losses."""
    res = example("charlm").main(["--small", "--no-report", "--out", str(tmp_path)])
    assert res["config"]["compile"]
    check_charlm(res)
    manifest = json.loads((tmp_path / "adamw" / "trajscope.json").read_text())
    names = [p["name"] for p in manifest["params"]]
    assert names == [n for n, _ in example("charlm").make_objective().model.named_parameters()]


# --- explore: the script, and the notebook made of the same cells --------------------------------


def percent_cells(text: str) -> list[tuple[str, str]]:
    """Split a ``# %%`` script into (kind, source) cells; markdown cells lose their ``# ``."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        src = "\n".join(lines).strip("\n")
        if src:
            out.append((kind, src))
    return out


def notebook_json(cells: list[tuple[str, str]]) -> dict[str, Any]:
    def cell(kind: str, src: str) -> dict[str, Any]:
        lines = src.splitlines(keepends=True)
        c: dict[str, Any] = {"cell_type": kind, "metadata": {}, "source": lines}
        if kind == "code":
            c |= {"execution_count": None, "outputs": []}
        return c

    return {
        "cells": [cell(k, s) for k, s in cells],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def test_notebook_matches_explore_script() -> None:
    expected = notebook_json(percent_cells((EXAMPLES / "explore.py").read_text(encoding="utf-8")))
    actual = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert actual == expected, "examples/explore.ipynb is stale: python tests/system/test_examples.py --write-notebook"


def test_explore_notebook_cells_run_and_agree_with_numpy(convex_run: tuple[Path, dict[str, Any]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute the notebook's code cells in order (as Jupyter would) on the convex runs, then check
    its per-epoch, rolling and cross-run numbers against plain numpy on the same Dataset."""
    out, res = convex_run
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    monkeypatch.setattr(sys, "argv", ["explore", "--runs", str(out)])
    monkeypatch.syspath_prepend(str(EXAMPLES))
    ns: dict[str, Any] = {"__name__": "__main__", "__file__": str(EXAMPLES / "explore.py")}
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            exec(compile("".join(c["source"]), "explore.ipynb", "exec"), ns)
    f = ns["FINDINGS"]

    ds = trajscope.open_metrics(out / "sgd")
    gap, steps = ds["inst_gap"].values, ds["step"].values
    spe = trajscope.open_run(out / "sgd").manifest["metadata"]["steps_per_epoch"]
    epochs = steps // spe
    assert f["epochs"] == len(np.unique(epochs))
    for e in np.unique(epochs):
        sel = epochs == e
        assert f["frac_inst_gap_le_0_by_epoch"][e] == pytest.approx(np.mean(gap[sel] <= 0))
        assert f["mean_inst_gap_by_epoch"][e] == pytest.approx(np.mean(gap[sel]))
        assert f["convexity_ratio_by_epoch"][e] == pytest.approx(
            ds["convexity_num"].values[sel].sum() / ds["convexity_den"].values[sel].sum())
    rolling = [np.mean(gap[max(0, i - 9): i + 1]) for i in range(len(gap))]
    np.testing.assert_allclose(f["rolling_inst_gap"], rolling, rtol=1e-12)
    assert f["runs"] == ["sgd", "adam"]
    assert f["frac_inst_gap_le_0_by_run"] == [res["sgd"]["frac_inst_gap_le_0"], res["adam"]["frac_inst_gap_le_0"]]
    assert f["final_convexity_ratio_by_run"] == pytest.approx(
        [res["sgd"]["final_convexity_ratio"], res["adam"]["final_convexity_ratio"]])
    assert (out / "explore_inst_gap.png").stat().st_size > 5000


# --- the script path: `python examples/x.py` records `x:make_objective` ---------------------------


def test_example_runs_as_a_script_and_reanalyzes_from_the_cli(tmp_path: Path) -> None:
    """Run convex.py as a script; the manifest names ``convex:make_objective``, and
    ``trajscope analyze`` run from ``examples/`` re-imports it and reproduces the Dataset."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend
    proc = subprocess.run([sys.executable, str(EXAMPLES / "convex.py"), "--small", "--no-report",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "finding: the convexity inequality holds on every step for both optimizers (yes)" in proc.stdout
    run = trajscope.open_run(tmp_path / "sgd")
    assert run.objective == "convex:make_objective"
    before = trajscope.open_metrics(tmp_path / "sgd")
    proc = subprocess.run([sys.executable, "-m", "trajscope.cli", "analyze", str(tmp_path / "sgd"),
                           "--force", "--quiet", "--dtype", "float64", "--points", "5", "--margin", "0.25"],
                          cwd=EXAMPLES, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    after = trajscope.open_metrics(tmp_path / "sgd")
    np.testing.assert_allclose(after["inst_gap"].values, before["inst_gap"].values, rtol=1e-10)


if __name__ == "__main__":
    if "--write-notebook" in sys.argv:
        nb = notebook_json(percent_cells((EXAMPLES / "explore.py").read_text(encoding="utf-8")))
        NOTEBOOK.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {NOTEBOOK}")
