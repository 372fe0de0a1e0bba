"""Training that changes which parameters train: unfreezing a layer, ``optimizer.add_param_group``,
freezing a layer or dropping it from the optimizer, all after the recorder started. Every pair's
coordinates of x must be the parameters the step trained, so that ℓ(α) runs along the step training
took; runs recorded without the step's trainable set are corrected by the analyzer and flagged. In
HDF5 storage, gradient rows after a gap leave no allocated, never-written chunks.

Ground truth: f(x_{t+1}; z_t) − f(x_t; z_t) evaluated by hand from the recorded snapshots (float64).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn
from torch.func import functional_call

import trajscope
from support.rundirs import quad_run, rewrite_snapshot, step_file
from trajscope import runformat as fmt
from trajscope.analysis.health import FLAGS
from trajscope.errors import RunFormatError, TrajscopeWarning
from trajscope.recorders import Recorder
from trajscope.recorders.recorder import Recorder as RecorderClass
from trajscope.store.names import Coordinates, coordinates
from trajscope.store.run import open_run
from trajscope.tools.validate import validate_run

UNRECORDED = FLAGS["unrecorded_update"][0]
STEPS = 6
CHANGE_AT = 3


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def xent(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_objective() -> trajscope.Objective:
    return trajscope.Objective(model=mlp(), loss=xent)


Change = Callable[[int, nn.Module, torch.optim.Optimizer], None]


def unfreeze_layer1(t: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    if t == CHANGE_AT:
        model[2].requires_grad_(True)


def add_layer1_group(t: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    if t == CHANGE_AT:
        opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.3})


def freeze_layer0(t: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    if t == CHANGE_AT:
        model[0].requires_grad_(False)


def drop_layer0_from_optimizer(t: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    if t == CHANGE_AT:  # still requires grad: its gradient is computed but no longer consumed
        layer0 = {id(p) for p in model[0].parameters()}
        opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if id(p) not in layer0]


def record(run_dir: Path, storage: str, change: Change, *, layer1_from_start: bool) -> Path:
    """Six SGD+momentum steps on fresh minibatches; layer 1 (``2.*``) starts frozen unless
    ``layer1_from_start``, and ``change`` edits the trainable set before the step's forward."""
    model = mlp()
    model[2].requires_grad_(layer1_from_start)
    # with add_layer1_group, layer 1 trains only once its group is added
    params = [*model[0].parameters(), *model[4].parameters()] if change is add_layer1_group else model.parameters()
    opt = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    with Recorder(run_dir, model, opt, objective=make_objective, format=storage) as rec:
        for t in range(STEPS):
            change(t, model, opt)
            x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
            model.zero_grad()
            loss = xent(model, (x, y))
            loss.backward()
            rec.batch((x, y), loss=loss)
            opt.step()
    return run_dir


def by_hand(run_dir: Path) -> dict[int, float]:
    """f(x_{t+1}; z_t) − f(x_t; z_t) of every pair, from the recorded snapshots."""
    run, model = open_run(run_dir), mlp()
    out = {}
    for t in run.pairs:
        snap, nxt = run.snapshot(t), run.snapshot(t + 1)
        x, y = snap.batch
        with torch.no_grad():
            f0 = nn.functional.cross_entropy(functional_call(model, snap.params, (x,)), y)
            f1 = nn.functional.cross_entropy(functional_call(model, nxt.params, (x,)), y)
        out[t] = float(f1 - f0)
    return out


def analyze(run_dir: Path) -> tuple[xr.Dataset, list[str]]:
    """The run's float64 metrics on the grid α ∈ {0, ½, 1}, and the TrajscopeWarnings analysis raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = trajscope.analyze(run_dir, dtype="float64", points=3, margin=0.0, progress=False, device="cpu")
    return ds, [str(w.message) for w in caught if issubclass(w.category, TrajscopeWarning)]


def check_loss_change(ds: xr.Dataset, run_dir: Path) -> None:
    """loss_change and ℓ(1) − ℓ(0) of every pair equal f(x_{t+1}; z_t) − f(x_t; z_t) by hand."""
    want = by_hand(run_dir)
    assert sorted(want) == list(range(STEPS))
    for t, v in want.items():
        got = ds.sel(step=t)
        assert abs(float(got.loss_change) - v) < 1e-10, (t, float(got.loss_change), v)
        line = got.loss_line
        assert abs(float(line.sel(alpha=1.0) - line.sel(alpha=0.0)) - v) < 1e-10, t


@pytest.mark.parametrize("storage", [fmt.STORAGE_SAFETENSORS, fmt.STORAGE_HDF5])
def test_a_layer_unfrozen_mid_run_is_recorded_and_analyzed(tmp_path: Path, storage: str) -> None:
    run_dir = record(tmp_path / "run", storage, unfreeze_layer1, layer1_from_start=False)
    ds, warned = analyze(run_dir)
    check_loss_change(ds, run_dir)
    run = open_run(run_dir)
    assert run.trainable == ["0.weight", "0.bias", "4.weight", "4.bias"]  # as recording started
    for t in range(STEPS):
        snap = run.snapshot(t)
        assert ("2.weight" in snap.grads) == (t >= CHANGE_AT), t
        assert snap.trainable == (None if t < CHANGE_AT else ("0.weight", "0.bias", "2.weight", "2.bias",
                                                               "4.weight", "4.bias"))
    moved = [not torch.equal(run.snapshot(t).params["2.weight"], run.snapshot(t + 1).params["2.weight"])
             for t in range(STEPS)]
    assert moved == [t >= CHANGE_AT for t in range(STEPS)]
    # the recorded gradient g_t of every coordinate is the replayed one: nothing is flagged
    assert float(ds.grad_replay_error.max()) < 1e-10
    assert not (ds.pair_flags.values & UNRECORDED).any() and not warned
    assert list(ds.layer.values) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    layer1 = ds.update_norm_by_layer.sel(layer="2.weight").values
    assert np.isnan(layer1[:CHANGE_AT]).all() and (layer1[CHANGE_AT:] > 0).all()
    rep = validate_run(run_dir)
    assert rep.problems == [], rep.problems


@pytest.mark.parametrize("storage", [fmt.STORAGE_SAFETENSORS, fmt.STORAGE_HDF5])
def test_a_param_group_added_mid_run_is_recorded_and_analyzed(tmp_path: Path, storage: str) -> None:
    run_dir = record(tmp_path / "run", storage, add_layer1_group, layer1_from_start=True)
    ds, warned = analyze(run_dir)
    check_loss_change(ds, run_dir)
    run = open_run(run_dir)
    groups = run.manifest["optimizer"]["param_groups"]
    assert [g["params"] for g in groups] == [["0.weight", "0.bias", "4.weight", "4.bias"], ["2.weight", "2.bias"]]
    assert [g["lr"] for g in groups] == [0.2, 0.3]
    assert [run.snapshot(t).lr for t in range(STEPS)] == [[0.2]] * CHANGE_AT + [[0.2, 0.3]] * (STEPS - CHANGE_AT)
    assert [("2.bias" in run.snapshot(t).grads) for t in range(STEPS)] == [t >= CHANGE_AT for t in range(STEPS)]
    assert float(ds.grad_replay_error.max()) < 1e-10
    assert not (ds.pair_flags.values & UNRECORDED).any() and not warned
    np.testing.assert_array_equal(ds.lr.values, [0.2] * STEPS)  # group 0's rate
    assert validate_run(run_dir).problems == []


@pytest.mark.parametrize("change", [freeze_layer0, drop_layer0_from_optimizer])
def test_a_layer_frozen_mid_run_leaves_the_coordinates(tmp_path: Path, change: Change) -> None:
    run_dir = record(tmp_path / "run", fmt.STORAGE_SAFETENSORS, change, layer1_from_start=True)
    ds, warned = analyze(run_dir)
    check_loss_change(ds, run_dir)
    run = open_run(run_dir)
    assert all(("0.weight" in run.snapshot(t).grads) == (t < CHANGE_AT) for t in range(STEPS))
    assert torch.equal(run.snapshot(CHANGE_AT).params["0.weight"], run.snapshot(STEPS).params["0.weight"])
    # a frozen layer's ∇f is not compared with a gradient training never computed
    assert float(ds.grad_replay_error.max()) < 1e-10 and not warned
    layer0 = ds.grad_norm_by_layer.sel(layer="0.weight").values
    assert np.isfinite(layer0[:CHANGE_AT]).all() and np.isnan(layer0[CHANGE_AT:]).all()
    assert validate_run(run_dir).problems == []


@pytest.mark.parametrize("storage", [fmt.STORAGE_SAFETENSORS, fmt.STORAGE_HDF5])
def test_a_run_that_did_not_record_the_change_is_corrected_and_flagged(
        tmp_path: Path, storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A recorder that never re-reads the trainable set: the unfrozen layer moves, with no gradient
    # and no trainable set recorded (as runs of recorders that did not follow the change).
    monkeypatch.setattr(RecorderClass, "_refresh_trainable", lambda self: None, raising=False)
    run_dir = record(tmp_path / "run", storage, unfreeze_layer1, layer1_from_start=False)
    monkeypatch.undo()
    ds, warned = analyze(run_dir)
    check_loss_change(ds, run_dir)
    run = open_run(run_dir)
    assert all("2.weight" not in run.snapshot(t).grads and run.snapshot(t).trainable is None for t in range(STEPS))
    flagged = (ds.pair_flags.values & UNRECORDED) != 0
    assert flagged.tolist() == [t >= CHANGE_AT for t in range(STEPS)]
    assert any("3 pair(s) (steps 3, 4, 5): parameters without a recorded gradient changed" in w for w in warned)
    # its g_t counts as zero, so the gradient replay exposes the pair
    err = ds.grad_replay_error.values
    assert (err[:CHANGE_AT] < 1e-10).all() and (err[CHANGE_AT:] > 1e-3).all()
    layer1 = ds.update_norm_by_layer.sel(layer="2.weight").values
    w = [run.snapshot(t).params["2.weight"] for t in range(STEPS + 1)]
    deltas = [float(torch.linalg.vector_norm(w[t + 1] - w[t])) for t in range(CHANGE_AT, STEPS)]
    assert np.isnan(layer1[:CHANGE_AT]).all()
    np.testing.assert_allclose(layer1[CHANGE_AT:], deltas, rtol=1e-12)


def test_hdf5_gradient_rows_after_a_gap_leave_no_unwritten_chunks(tmp_path: Path) -> None:
    """A layer frozen for two steps, then unfrozen: its gradient is absent from rows 1-2. Resizing an
    early-allocated dataset over the gap would allocate chunks nothing writes (holes that count in
    the file's size); every allocated chunk must hold a row the file names."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.Tanh(), nn.Linear(256, 3))  # 128 KiB weight: O_DIRECT rows
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    consumed = {}
    with Recorder(tmp_path / "run", model, opt, format="hdf5") as rec:
        for t in range(5):
            model[0].requires_grad_(t not in (1, 2))
            x, y = torch.randn(8, 128, generator=g), torch.randint(0, 3, (8,), generator=g)
            model.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.batch((x, y), loss=loss)
            if model[0].weight.grad is not None:
                consumed[t] = model[0].weight.grad.clone()
            opt.step()
    run = open_run(tmp_path / "run")
    assert sorted(consumed) == [0, 3, 4]
    for t in range(5):
        got = run.snapshot(t).grads.get("0.weight")
        assert (got is None) if t not in consumed else torch.equal(got, consumed[t]), t
    with h5py.File(tmp_path / "run" / fmt.HDF5_FILE, "r", swmr=True) as f:
        d = f["grad/0.weight"]
        metas = [json.loads(bytes(f["meta"][m0:m0 + n]).decode()) for m0, n in f["index/meta"][:]]
        for r in range(d.shape[0]):
            if d.id.get_chunk_info_by_coord((r, 0, 0)).byte_offset is not None:
                assert "grad/0.weight" in metas[r]["hdf5"]["rows"], r


def test_coordinates_are_the_trainable_set_then_recorded_gradients_then_changed_parameters() -> None:
    asked: list[str] = []

    def changed(n: str) -> bool:
        asked.append(n)
        return n == "e"

    c = coordinates(["a", "b", "c", "d", "e"], with_grad={"b", "c"}, trainable=["c", "a"], changed=changed)
    assert c == Coordinates(("c", "a", "b", "e"), ("e",))
    assert asked == ["d", "e"]  # one comparison per parameter that is not a coordinate otherwise
    assert coordinates(["a", "b"], with_grad={"b"}, trainable=None, changed=lambda n: False) == Coordinates(("b",))


def test_a_trainable_list_naming_a_parameter_the_snapshot_lacks_is_damage(tmp_path: Path) -> None:
    run_dir = quad_run(tmp_path / "run", steps=3)
    rewrite_snapshot(step_file(run_dir, 1), lambda tensors, meta: meta.__setitem__("trainable", ["x", "nope"]))
    with pytest.raises(RunFormatError, match=r"step_00000001.safetensors: snapshot 'trainable' names 'nope', "
                                             r"a parameter it does not hold$"):
        open_run(run_dir).snapshot(1)
    rewrite_snapshot(step_file(run_dir, 1), lambda tensors, meta: meta.__setitem__("trainable", "x"))
    with pytest.raises(RunFormatError, match=r"snapshot 'trainable' must be a list of parameter names$"):
        open_run(run_dir).snapshot(1)
