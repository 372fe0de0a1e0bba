"""Runs recorded from a wrapped model (trajscope.store.unwrap).

Runs recorded through a wrapper (torch.compile's ``_orig_mod.``, DDP's ``module.``) analyze
with the plain model's objective: the names are mapped once, with a warning."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trajscope
from support import recording
from trajscope.errors import ObjectiveError, TrajscopeWarning
from trajscope.store.names import wrapper_prefix
from trajscope.store.run import open_run
from trajscope.store.unwrap import UnwrappedStorage, unwrapped
from trajscope.tools.validate import validate_run

N_IN, N_HID, N_OUT = 5, 8, 3
OBJECTIVE = "test_unwrap:make_net"


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_IN, N_HID), nn.BatchNorm1d(N_HID), nn.Tanh(), nn.Linear(N_HID, N_OUT))


def xent(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_net() -> trajscope.Objective:
    return trajscope.Objective(model=net(), loss=xent)


def make_other() -> trajscope.Objective:
    """Not the trained model: one layer fewer."""
    torch.manual_seed(0)
    return trajscope.Objective(model=nn.Sequential(nn.Linear(N_IN, N_HID), nn.BatchNorm1d(N_HID)), loss=xent)


class Wrapper(nn.Module):
    """What DDP/DataParallel (``attr="module"``) or torch.compile (``attr="_orig_mod"``) do to the
    names: the wrapped model is one submodule."""

    def __init__(self, inner: nn.Module, attr: str) -> None:
        super().__init__()
        self.attr = attr
        self.add_module(attr, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.attr)(x)


def record(run_dir: Path, wrap: Any = None, steps: int = 4, **kw: Any) -> Path:
    model = net()
    trained = wrap(model) if wrap is not None else model
    opt = torch.optim.Adam(trained.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    batches = ((torch.randn(16, N_IN, generator=g), torch.randint(0, N_OUT, (16,), generator=g)) for _ in range(steps))
    return recording.record(run_dir, trained, opt, xent, batches, objective=OBJECTIVE, optimizer_state=True, **kw)


def analyze_warned(run_dir: Path, prefix: str, **kw: Any) -> Any:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = trajscope.analyze(run_dir, progress=False, **kw)
    said = [w for w in caught if issubclass(w.category, TrajscopeWarning) and repr(prefix) in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    return ds


def assert_same(ds: Any, ref: Any) -> None:
    assert set(ds.data_vars) == set(ref.data_vars)
    for name in ref.data_vars:
        np.testing.assert_allclose(ds[name].values, ref[name].values, rtol=1e-5, atol=1e-7,
                                   equal_nan=True, err_msg=name)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Any:
    run_dir = record(tmp_path_factory.mktemp("plain") / "run")
    return trajscope.analyze(run_dir, write=False, progress=False)


def test_run_with_torch_compile_names_analyzes_with_the_plain_model(tmp_path: Path, plain: Any) -> None:
    # The recorder records a compiled model under the plain names (tests/recorders/test_hooks.py); a run
    # recorded under torch.compile's ``_orig_mod.`` names (an older recorder, or another tool) is
    # made here with a module holding the model as ``_orig_mod``, which names parameters the same way.
    run_dir = record(tmp_path / "run", lambda m: Wrapper(m, "_orig_mod"))
    r = open_run(run_dir)
    assert r.manifest["params"][0]["name"] == "_orig_mod.0.weight"
    ds = analyze_warned(run_dir, "_orig_mod.")
    assert_same(ds, plain)
    assert list(ds.layer.values) == list(plain.layer.values)


@pytest.mark.parametrize(("attrs", "prefix", "kw"), [
    (["module"], "module.", {"format": "hdf5"}),
    (["_orig_mod", "module"], "module._orig_mod.", {}),
])
def test_module_prefixes_combined_and_every_scheduler(tmp_path: Path, plain: Any, attrs: list[str], prefix: str,
                                                      kw: dict[str, Any]) -> None:
    def wrap(m: nn.Module) -> nn.Module:
        for attr in attrs:
            m = Wrapper(m, attr)
        return m

    run_dir = record(tmp_path / "run", wrap, **kw)
    assert_same(analyze_warned(run_dir, prefix, write=False), plain)
    assert_same(analyze_warned(run_dir, prefix, scheduler="processes", workers=2), plain)


def test_snapshots_read_through_the_view_have_plain_names(tmp_path: Path) -> None:
    run_dir = record(tmp_path / "run", lambda m: Wrapper(m, "module"), steps=2)
    with pytest.warns(TrajscopeWarning):
        r = unwrapped(open_run(run_dir), net())
    assert isinstance(r.storage, UnwrappedStorage)
    names = [n for n, _ in net().named_parameters()]
    assert [q["name"] for q in r.manifest["params"]] == names
    assert r.trainable == names
    assert [q["name"] for q in r.manifest["buffers"]] == [n for n, _ in net().named_buffers()]
    assert r.manifest["optimizer"]["param_groups"][0]["params"] == names
    snap = r.snapshot(1)  # Adam has state after its first step
    assert set(snap.params) == set(names) and set(snap.grads) == set(names)
    assert set(snap.optimizer_state) == set(names)
    assert set(snap.buffers) == {n for n, _ in net().named_buffers()}
    assert set(r.storage.read_params(1).params) == set(names)
    # the run on disk and a plain view of it are untouched
    assert open_run(run_dir).manifest["params"][0]["name"] == "module.0.weight"
    assert unwrapped(open_run(run_dir), Wrapper(net(), "module")).storage.kind == "safetensors"


def test_a_wrapped_run_of_another_model_keeps_the_error(tmp_path: Path) -> None:
    run_dir = record(tmp_path / "run", lambda m: Wrapper(m, "_orig_mod"), steps=2)
    with pytest.raises(ObjectiveError, match=r"parameter '_orig_mod\.0\.weight' is recorded but the objective's "
                                             "model has no such parameter"):
        trajscope.analyze(run_dir, "test_unwrap:make_other", write=False, progress=False)
    report = validate_run(run_dir, objective="test_unwrap:make_other")
    assert not report.ok
    assert validate_run(run_dir, objective=OBJECTIVE).ok


@pytest.mark.parametrize(("recorded", "model", "expected"), [
    (["a.w", "b.w"], ["a.w", "b.w"], ""),                                     # plain already
    (["_orig_mod.a.w", "_orig_mod.b.w"], ["a.w", "b.w"], "_orig_mod."),
    (["module.a.w"], ["a.w"], "module."),
    (["module._orig_mod.a.w"], ["a.w"], "module._orig_mod."),
    (["_orig_mod.module._orig_mod.a.w"], ["a.w"], "_orig_mod.module._orig_mod."),
    (["_orig_mod.module.w"], ["module.w"], "_orig_mod."),                     # the model's own `module`
    (["_orig_mod.a.w", "b.w"], ["a.w", "b.w"], ""),                           # not uniform
    (["_orig_mod.a.w", "module.b.w"], ["a.w", "b.w"], ""),                    # not uniform
    (["_orig_mod.a.w", "_orig_mod.c.w"], ["a.w", "b.w"], ""),                 # c.w: another model
    (["other.a.w"], ["a.w"], ""),                                             # not a wrapper
    ([], ["a.w"], ""),
])
def test_wrapper_prefix(recorded: list[str], model: list[str], expected: str) -> None:
    assert wrapper_prefix(recorded, set(model)) == expected
