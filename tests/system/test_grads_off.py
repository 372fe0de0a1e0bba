"""``Recorder(grads=False)``: no gradient is stored, and the analysis recomputes g_t as c·G0.

The same deterministic float64 run is recorded twice, with and without gradients (the recorder
cannot change training, so both trajectories are bit-identical); analyzed in float64, every metric
equals the other run's except the documented ones (:data:`trajscope.metrics.builtins.GRADS_OFF_NAN`), which
are NaN without gradients and defined with them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trajscope
from support.rundirs import cli, edit_manifest, load_raw, rewrite_snapshot, save_raw, step_file
from trajscope import runformat as fmt
from trajscope.analysis.health import FLAGS, replay_failures
from trajscope.errors import RecorderError, RunFormatError
from trajscope.metrics.builtins import GRADS_OFF_NAN, GRADS_OFF_RECOMPUTED
from trajscope.metrics.registry import get_metrics
from trajscope.recorders import Recorder
from trajscope.report.summary import format_headline, format_summary, headline, summarize
from trajscope.store import open_run, read_snapshot
from trajscope.tools.validate import validate_run

DOCS = Path(__file__).resolve().parents[2] / "docs"
STEPS = 5
FAST: dict[str, Any] = {"dtype": "float64", "points": 3, "margin": 0.5, "progress": False, "write": False}


class Net(nn.Module):
    """A float64 tanh MLP with a trainable parameter the loss never uses (it has no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7, dtype=torch.float64)
        self.fc2 = nn.Linear(7, 3, dtype=torch.float64)
        self.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def net_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_net() -> trajscope.Objective:
    return trajscope.Objective(model=Net(), loss=net_loss)


def record(run_dir: Path, *, grads: bool, opt: str = "sgd", clip: str | None = None,
           storage: str = "safetensors") -> Path:
    """STEPS steps of ``opt`` (SGD+momentum or AdamW), clipping with ``clip`` (``"norm"``:
    ``clip_grad_norm_``, ``"value"``: ``clip_grad_value_``, small enough to clip every step)."""
    torch.manual_seed(0)
    model = Net()
    optimizer: torch.optim.Optimizer = (torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9) if opt == "sgd"
                                        else torch.optim.AdamW(model.parameters(), lr=0.05))
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, 3, (64,), generator=gen)
    with Recorder(run_dir, model, optimizer, objective="test_grads_off:make_net", grads=grads,
                  format=storage) as rec:
        for _ in range(STEPS):
            idx = torch.randint(0, 64, (16,), generator=gen)
            optimizer.zero_grad()
            loss = net_loss(model, (X[idx], Y[idx]))
            loss.backward()
            rec.batch((X[idx], Y[idx]), loss=loss)
            if clip == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            elif clip == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=2e-3)
            optimizer.step()
    return run_dir


def _with_twins(names: tuple[str, ...]) -> set[str]:
    """``names`` and the ``_by_layer`` twin of each per-layer one."""
    specs = get_metrics()
    return set(names) | {f"{n}_by_layer" for n in names if specs[n].per_layer}


def _assert_same(a: np.ndarray, b: np.ndarray, name: str) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, name
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
    ok = ~np.isnan(a)
    np.testing.assert_allclose(b[ok], a[ok], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module", params=[("sgd", None), ("adamw", "norm")], ids=["sgd", "adamw-clip-norm"])
def both(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    opt, clip = request.param
    root = tmp_path_factory.mktemp(f"{opt}-{clip}")
    on, off = (record(root / name, grads=g, opt=opt, clip=clip) for name, g in (("on", True), ("off", False)))
    return {"on": on, "off": off, "ds_on": trajscope.analyze(on, **FAST), "ds_off": trajscope.analyze(off, **FAST),
            "clip": clip}


def test_metrics_equal_the_recorded_gradient_run_but_the_documented_ones(both: dict[str, Any]) -> None:
    ds_on, ds_off = both["ds_on"], both["ds_off"]
    assert set(ds_on.data_vars) == set(ds_off.data_vars)
    nan = _with_twins(GRADS_OFF_NAN)
    assert nan <= set(ds_on.data_vars)
    for name in ds_on.data_vars:
        on, off = ds_on[name].values, ds_off[name].values
        if name in nan:
            assert np.all(np.isnan(off)), name
            assert np.isfinite(on).any(), name
        else:
            _assert_same(on, off, name)
    np.testing.assert_array_equal(ds_on.pair_flags.values, ds_off.pair_flags.values)
    # the recomputed g_t is c·G0: the g-based metrics are defined in every pair (on every layer
    # but the unused parameter's, whose g_t = 0)
    for name in _with_twins(GRADS_OFF_RECOMPUTED):
        v = ds_off[name]
        assert np.all(np.isfinite((v.drop_sel(layer="unused") if "layer" in v.dims else v).values)), name
    if both["clip"] == "norm":
        assert np.all(ds_off.clip_factor.values < 1)
        assert np.all(ds_off.pair_flags.values & FLAGS["clipped"][0])


def test_no_gradient_is_stored_and_each_step_names_its_gradients(both: dict[str, Any]) -> None:
    on, off = both["on"], both["off"]
    assert json.loads((off / fmt.MANIFEST).read_text())["grads"] is False
    assert json.loads((on / fmt.MANIFEST).read_text())["grads"] is True
    for t in range(STEPS):
        t_on, m_on = load_raw(step_file(on, t))
        t_off, m_off = load_raw(step_file(off, t))
        assert not any(k.startswith(fmt.GRAD) for k in t_off)
        assert "grad_names" not in m_on
        stored = [k[len(fmt.GRAD):] for k in t_on if k.startswith(fmt.GRAD)]
        assert sorted(stored) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]  # not `unused`
        assert m_off["grad_names"] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
        assert set(t_off) == {k for k in t_on if not k.startswith(fmt.GRAD)}
        assert open_run(off).snapshot(t).grad_names == tuple(m_off["grad_names"])


def _data_bytes(path: Path) -> dict[str, int]:
    header = fmt.read_safetensors_header(path)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_a_step_is_smaller_by_exactly_its_gradients(both: dict[str, Any]) -> None:
    on, off = both["on"], both["off"]
    for t in range(STEPS):
        bytes_on, bytes_off = _data_bytes(step_file(on, t)), _data_bytes(step_file(off, t))
        grad = sum(n for k, n in bytes_on.items() if k.startswith(fmt.GRAD))
        assert grad == 8 * (7 * 5 + 7 + 3 * 7 + 3)  # float64 gradients of fc1, fc2
        assert sum(bytes_on.values()) - sum(bytes_off.values()) == grad
        saved = step_file(on, t).stat().st_size - step_file(off, t).stat().st_size
        assert abs(saved - grad) < 512  # the headers differ by the grad entries and grad_names only
    final = step_file(on, STEPS)
    assert final.read_bytes() == step_file(off, STEPS).read_bytes()  # x_T holds no gradient either way


def test_validate_info_and_the_summary(both: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    off, ds_off = both["off"], both["ds_off"]
    report = validate_run(off)
    assert report.ok and report.problems == [] and report.warnings == []
    code, out, _ = cli(["info", str(off)], capsys)
    assert code == 0
    assert ("gradients  not stored (grads=False): the analysis recomputes g_t as c·G0; metrics of g_{t+1}, "
            "g_{t-1} and grad_replay_error are NaN") in out.splitlines()
    check = replay_failures(ds_off)
    assert check.ok and check.failed == 0 and check.pairs == STEPS
    h = headline(ds_off)
    assert np.isnan(h["max_grad_replay_error"]) and h["max_loss_replay_error"] <= 1e-12
    assert "pairs_replay_failed" not in h
    assert re.search(r"max grad_replay_error +n/a$", format_headline(h), re.M)
    s = summarize(ds_off)
    assert s["replay_ok"] and np.isnan(s["holds"]["grad_replay_error"])
    text = format_summary(s)
    assert re.search(r"^  max_grad_replay_error +n/a$", text, re.M)
    assert re.search(r"^  grad_replay_error +<= 1e-4 +n/a$", text, re.M)


def test_a_failed_loss_replay_still_fails_the_gate(both: dict[str, Any]) -> None:
    ds = both["ds_off"].copy()
    ds["loss_replay_error"] = ds["loss_replay_error"] + 1.0
    check = replay_failures(ds)
    assert not check.ok and check.failed == STEPS


def test_a_non_uniform_clip_leaves_g_unavailable(tmp_path: Path) -> None:
    on = record(tmp_path / "on", grads=True, clip="value")
    off = record(tmp_path / "off", grads=False, clip="value")
    assert all(open_run(off).snapshot(t).clip_uniform is False for t in range(STEPS))
    ds_on, ds_off = trajscope.analyze(on, **FAST), trajscope.analyze(off, **FAST)
    nan = _with_twins(GRADS_OFF_NAN) | _with_twins(GRADS_OFF_RECOMPUTED)
    for name in ds_on.data_vars:
        if name in nan:
            assert np.all(np.isnan(ds_off[name].values)), name
        else:
            _assert_same(ds_on[name].values, ds_off[name].values, name)
    for name in GRADS_OFF_RECOMPUTED:
        assert np.all(np.isfinite(ds_on[name].values)), name
    # flagged as clipped non-uniformly (and the unused parameter did not move), not as a non-finite
    # recorded gradient
    np.testing.assert_array_equal(ds_off.pair_flags.values,
                                  FLAGS["clipped_nonuniform"][0] | FLAGS["zero_update_layer"][0])


def test_hdf5_declares_no_gradient_datasets(tmp_path: Path) -> None:
    off = record(tmp_path / "off", grads=False, storage="hdf5")
    with h5py.File(off / fmt.HDF5_FILE, "r", libver="latest", swmr=True) as f:
        assert "grad" not in f and "param" in f
    run = open_run(off)
    snap = run.snapshot(0)
    assert snap.grads == {} and snap.grad_names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    assert validate_run(off).ok
    ref = record(tmp_path / "ref", grads=False)
    ds, ds_ref = trajscope.analyze(off, **FAST), trajscope.analyze(ref, **FAST)
    for name in ds.data_vars:
        _assert_same(ds_ref[name].values, ds[name].values, name)


def test_convert_keeps_a_run_without_gradients(both: dict[str, Any], tmp_path: Path) -> None:
    from trajscope.tools.convert import convert_run

    out = tmp_path / "h5"
    convert_run(both["off"], "hdf5", out=out)
    with h5py.File(out / fmt.HDF5_FILE, "r", libver="latest", swmr=True) as f:
        assert "grad" not in f
    assert open_run(out).snapshot(1).grad_names == open_run(both["off"]).snapshot(1).grad_names
    assert validate_run(out).ok


# --- a run that says one thing and stores another ---------------------------------------------------


def test_validate_reports_gradients_that_disagree_with_the_manifest(both: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    off = Path(shutil.copytree(both["off"], tmp_path / "off"))
    rewrite_snapshot(step_file(off, 1), lambda t, m: m.pop("grad_names"))
    rewrite_snapshot(step_file(off, 2), lambda t, m: m.update(grad_names=["fc1.weight", "nope"]))
    assert validate_run(off).problems == [
        f"{step_file(off, 1)}: the manifest says the run stores no gradients ('grads': false), but the "
        "snapshot lacks 'grad_names'",
        f"{step_file(off, 2)}: gradient 'nope' of a parameter the run does not train",
    ]
    edit_manifest(off, lambda m: m.update(grads=True))
    problems = validate_run(off).problems
    assert problems[0] == (f"{step_file(off, 0)}: holds 'grad_names' (a run that stores no gradients), but "
                           "the manifest says the run stores them ('grads' true or absent)")


def test_a_snapshot_with_gradients_and_grad_names_is_refused(both: dict[str, Any], tmp_path: Path) -> None:
    tensors, meta = load_raw(step_file(both["on"], 0))
    meta["grad_names"] = ["fc1.weight"]
    save_raw(tmp_path / "step_00000000.safetensors", tensors, meta)
    with pytest.raises(RunFormatError) as exc:
        read_snapshot(tmp_path / "step_00000000.safetensors")
    assert str(exc.value) == (f"{tmp_path / 'step_00000000.safetensors'}: holds both grad/ tensors and "
                              "'grad_names' (a run stores one or the other)")


def test_grads_must_be_a_bool(tmp_path: Path) -> None:
    model = Net()
    with pytest.raises(RecorderError) as exc:
        Recorder(tmp_path / "r", model, torch.optim.SGD(model.parameters(), lr=0.1), grads="no")  # type: ignore[arg-type]
    assert str(exc.value) == "grads='no': expected True (store g_t) or False (store no gradient)"


# --- the documented set is the code's --------------------------------------------------------------


def test_docs_list_exactly_the_metrics_that_change() -> None:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    m = re.search(r"\n## Runs recorded without gradients\n(.*?)\n## ", text, re.S)
    assert m, "docs/metrics.md lacks the section 'Runs recorded without gradients'"
    lists = {}
    for para in m.group(1).split("\n\n"):
        head = re.match(r"\*\*(NaN|Recomputed)\*\*", para.strip())
        if head:
            lists[head.group(1)] = re.findall(r"`([a-z_]+)`", para)
    assert lists.get("NaN") == list(GRADS_OFF_NAN)
    assert lists.get("Recomputed") == list(GRADS_OFF_RECOMPUTED)
