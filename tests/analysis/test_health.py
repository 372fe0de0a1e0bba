"""Trouble the analysis works around (trajscope.analysis.health): NaN/Inf in parameters, gradients and
losses, and zero-length updates. The analysis never stops, the affected metrics are NaN (never ±Inf)
and the ``pair_flags`` coordinate says why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr

import trajscope
from support.problems import B_MEAN, DIM, QuadModel, make_quadratic, quad_loss
from support.rundirs import copy_run, quad_run, rewrite_snapshot, step_file
from trajscope.analysis.health import FLAGS
from trajscope.recorders import Recorder

F = {name: mask for name, (mask, _) in FLAGS.items()}


def train(run_dir: Path, steps: int = 6, *, lr: Callable[[int], float] = lambda t: 0.15,
          momentum: float = 0.9, poison: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
          model: nn.Module | None = None, loss: Callable = quad_loss) -> Path:
    gen = torch.Generator().manual_seed(7)
    model = model if model is not None else QuadModel()
    with torch.no_grad():
        model.x.copy_(torch.randn(DIM, generator=gen, dtype=torch.float64) * 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr(0), momentum=momentum)
    with Recorder(run_dir, model, opt, objective=None) as rec:
        for t in range(steps):
            b = B_MEAN + 0.3 * torch.randn(DIM, generator=gen, dtype=torch.float64)
            if poison is not None:
                b = poison(t, b)
            for g in opt.param_groups:
                g["lr"] = lr(t)
            opt.zero_grad()
            value = loss(model, b)
            value.backward()
            rec.batch(b, loss=value)
            opt.step()
    return run_dir


def analyze(run_dir: Path, objective: object = make_quadratic, **kw: object) -> xr.Dataset:
    return trajscope.analyze(run_dir, objective, dtype="float64", progress=False, **kw)


def no_inf(ds: xr.Dataset) -> None:
    for name, var in ds.data_vars.items():
        assert not np.isinf(var.values).any(), f"{name} holds ±Inf: {var.values}"


def flags(ds: xr.Dataset) -> dict[int, int]:
    return {int(s): int(f) for s, f in zip(ds.step.values, ds.pair_flags.values)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quad_run(tmp_path_factory.mktemp("clean") / "run", steps=6)


@pytest.fixture
def run_dir(clean: Path, tmp_path: Path) -> Path:
    return copy_run(clean, tmp_path / "run")


def test_clean_run_has_no_flags(clean: Path) -> None:
    ds = analyze(clean, write=False)
    assert flags(ds) == {t: 0 for t in range(6)}
    assert ds.pair_flags.attrs["flag_meanings"].split() == list(FLAGS)
    assert list(ds.pair_flags.attrs["flag_masks"]) == [m for m, _ in FLAGS.values()]
    assert "pair_flags" not in ds.data_vars  # a coordinate: it travels with every metric
    assert "pair_flags" in ds.inst_gap.coords


def test_training_diverges_to_nan(tmp_path: Path) -> None:
    """A NaN enters the minibatch at step 2: the loss, g_2 and every later iterate are NaN."""

    def poison(t: int, b: torch.Tensor) -> torch.Tensor:
        if t == 2:
            b = b.clone()
            b[0] = float("nan")
        return b

    run_dir = train(tmp_path / "run", poison=poison)
    ds = analyze(run_dir)  # does not raise
    assert list(ds.step.values) == [0, 1, 2, 3, 4, 5]
    no_inf(ds)
    f = flags(ds)
    assert f[0] == 0
    assert f[1] == F["nonfinite_next_grad"]  # only update_corr (g_2) is affected
    assert np.isnan(ds.update_corr.sel(step=1)) and np.isfinite(ds.inst_gap.sel(step=1))
    for bit in ("nonfinite_params", "nonfinite_grad", "nonfinite_loss", "nonfinite_replay_loss",
                "nonfinite_replay_grad"):
        assert f[2] & F[bit], bit
    for t in (3, 4, 5):
        assert f[t] & F["nonfinite_params"]
        assert np.isnan(ds.inst_gap.sel(step=t))
    assert np.isfinite(ds.inst_gap.sel(step=[0, 1])).all()
    # and the CLI completes with exit 0
    from trajscope.cli import main

    main(["analyze", str(run_dir), "-q", "--objective", "support.problems:make_quadratic", "--dtype", "float64",
          "--force"])


def test_nan_in_recorded_gradient_only(run_dir: Path, clean: Path) -> None:
    def nan_grad(t: dict, m: dict) -> None:
        t["grad/x"][0] = float("nan")

    rewrite_snapshot(step_file(run_dir, 2), nan_grad)
    ds = analyze(run_dir, write=False)
    no_inf(ds)
    assert flags(ds) == {0: 0, 1: F["nonfinite_next_grad"], 2: F["nonfinite_grad"], 3: 0, 4: 0, 5: 0}
    assert np.isnan(ds.grad_norm.sel(step=2)) and np.isnan(ds.grad_replay_error.sel(step=2))
    assert np.isnan(ds.update_corr.sel(step=1))
    # metrics that do not read g_2 are exactly those of the intact run
    ref = analyze(clean, write=False)
    for name in ("inst_gap", "inst_smoothness", "loss_change", "update_norm", "convexity_ratio"):
        np.testing.assert_array_equal(ds[name].values, ref[name].values, err_msg=name)


def test_inf_in_parameters(run_dir: Path) -> None:
    def inf_param(t: dict, m: dict) -> None:
        t["param/x"][0] = float("inf")

    rewrite_snapshot(step_file(run_dir, 3), inf_param)
    ds = analyze(run_dir, write=False)
    no_inf(ds)
    f = flags(ds)
    assert f[2] & F["nonfinite_params"] and f[3] & F["nonfinite_params"]
    assert f[0] == f[1] == f[4] == f[5] == 0
    for name in ("inst_gap", "inst_smoothness", "update_norm", "loss_change"):
        assert np.isnan(ds[name].sel(step=[2, 3])).all(), name
        assert np.isfinite(ds[name].sel(step=[0, 1, 4, 5])).all(), name
    assert np.isfinite(ds.convexity_ratio.values).all()  # cumulative series skip the NaN pairs


def test_nan_recorded_loss(run_dir: Path) -> None:
    rewrite_snapshot(step_file(run_dir, 1), lambda t, m: m.update(loss=float("nan")))
    ds = analyze(run_dir, write=False)
    assert flags(ds)[1] == F["nonfinite_loss"]
    assert np.isnan(ds.loss_replay_error.sel(step=1))
    assert np.isfinite(ds.inst_gap.sel(step=1))


def test_inf_recorded_loss(run_dir: Path) -> None:
    rewrite_snapshot(step_file(run_dir, 1), lambda t, m: m.update(loss=float("inf")))
    ds = analyze(run_dir, write=False)
    no_inf(ds)
    assert flags(ds)[1] == F["nonfinite_loss"]


def test_nonfinite_pairs_persist_and_resume(run_dir: Path) -> None:
    rewrite_snapshot(step_file(run_dir, 3), lambda t, m: t["param/x"].fill_(float("nan")))
    first = analyze(run_dir)
    second = analyze(run_dir)  # every pair now comes from analysis/pairs
    xr.testing.assert_identical(first.drop_attrs(), second.drop_attrs())
    on_disk = trajscope.open_metrics(run_dir)
    xr.testing.assert_equal(on_disk.drop_attrs(), first.drop_attrs())
    assert on_disk.pair_flags.attrs["flag_meanings"] == first.pair_flags.attrs["flag_meanings"]


def test_zero_length_update(tmp_path: Path) -> None:
    run_dir = train(tmp_path / "run", lr=lambda t: 0.0 if t == 2 else 0.1, momentum=0.0)
    ds = analyze(run_dir)
    no_inf(ds)
    f = flags(ds)
    assert f[2] == F["zero_update"]
    assert all(f[t] == 0 for t in (0, 1, 3, 4, 5))
    assert ds.update_norm.sel(step=2) == 0
    assert np.isnan(ds.inst_smoothness.sel(step=2))  # ‖ΔG‖/‖Δ‖ = 0/0
    assert np.isnan(ds.inst_smoothness_by_layer.sel(step=2)).all()
    # ℓ is evaluated at α = 0 and 1 on the same point; batched evaluation may round differently
    assert abs(ds.loss_change.sel(step=2)) < 1e-12 and abs(ds.inst_gap.sel(step=2)) < 1e-12
    assert np.isfinite(ds.grad_replay_error.sel(step=2))
    assert np.isfinite(ds.inst_smoothness.sel(step=[0, 1, 3, 4, 5])).all()


class _QuadPlusUnused(QuadModel):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))


def make_quad_plus_unused() -> trajscope.Objective:
    return trajscope.Objective(model=_QuadPlusUnused(), loss=quad_loss)


def test_zero_update_in_one_layer(tmp_path: Path) -> None:
    run_dir = train(tmp_path / "run", steps=3, model=_QuadPlusUnused(), momentum=0.0)
    ds = analyze(run_dir, make_quad_plus_unused)
    no_inf(ds)
    assert all(f == F["zero_update_layer"] for f in flags(ds).values())
    by_layer = ds.inst_smoothness_by_layer
    assert np.isnan(by_layer.sel(layer="unused")).all()
    assert np.isfinite(by_layer.sel(layer="x")).all()
    assert np.isfinite(ds.inst_smoothness).all()
    assert (ds.update_norm_by_layer.sel(layer="unused") == 0).all()


def test_flags_are_distinct_bits() -> None:
    masks = [m for m, _ in FLAGS.values()]
    assert all(m > 0 and m & (m - 1) == 0 for m in masks)  # one bit each
    assert len(set(masks)) == len(masks) and max(masks) < 2 ** 15  # fits the int16 coordinate
