"""What an analysis will compute, decided before any work (trajscope.analysis.plan): the pairs and metrics
selected, and the evaluation dtype.

The evaluation dtype follows the run: float64 runs evaluate in float64 unless told otherwise.

A float64 model whose loss holds a float64 constant (a fixed projection of the logits) cannot be
evaluated in float32 at all ("mat1 and mat2 must have the same dtype"); analyzed with no dtype,
it evaluates in float64 and replays near exactly. A float32 run still evaluates in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trajscope
from support import recording
from support.problems import classifier_run
from support.rundirs import cli
from trajscope.analysis.plan import eval_dtype
from trajscope.errors import AnalysisError
from trajscope.store.run import open_run

N_IN, N_HID, N_OUT = 6, 12, 5
PROJECTION = torch.linspace(-1.0, 1.0, N_OUT * 3, dtype=torch.float64).reshape(N_OUT, 3)
"""A fixed float64 constant of the loss: the logits are projected to three classes."""

# float64 replays the recorded loss and gradient to rounding: these bounds leave a wide margin
LOSS_BOUND_F64 = 1e-12
GRAD_BOUND_F64 = 1e-10


def net(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_IN, N_HID), nn.Tanh(), nn.Linear(N_HID, N_OUT)).to(dtype)


def projected_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x) @ PROJECTION, y)


def make_projected() -> trajscope.Objective:
    return trajscope.Objective(model=net(), loss=projected_loss)


def plain_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_plain32() -> trajscope.Objective:
    return trajscope.Objective(model=net(torch.float32), loss=plain_loss)


def record(run_dir: Path, objective: Any, dtype: torch.dtype, steps: int = 5) -> Path:
    obj = objective()
    opt = torch.optim.SGD(obj.model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    classes = 3 if objective is make_projected else N_OUT
    batches = ((torch.randn(16, N_IN, generator=g, dtype=dtype), torch.randint(0, classes, (16,), generator=g))
               for _ in range(steps))
    return recording.record(run_dir, obj.model, opt, obj.loss, batches, objective=objective)


def test_float64_run_with_float64_constant_analyzes_in_float64_by_default(tmp_path: Path, capsys: Any) -> None:
    run_dir = record(tmp_path / "run", make_projected, torch.float64)
    code, _, err = cli(["analyze", str(run_dir), "-q"], capsys)
    assert code == 0, err
    ds = trajscope.open_metrics(run_dir)
    assert ds.attrs["eval_dtype"] == "float64"
    loss_err = np.asarray(ds.loss_replay_error)
    grad_err = np.asarray(ds.grad_replay_error)
    assert loss_err.size == 5 and np.all(np.isfinite(loss_err)) and np.all(np.isfinite(grad_err))
    assert np.all(loss_err <= LOSS_BOUND_F64), loss_err
    assert np.all(grad_err <= GRAD_BOUND_F64), grad_err


def test_explicit_float32_overrides_and_fails_on_the_float64_constant(tmp_path: Path, capsys: Any) -> None:
    run_dir = record(tmp_path / "run", make_projected, torch.float64, steps=3)
    code, _, err = cli(["analyze", str(run_dir), "-q", "--dtype", "float32"], capsys)
    assert code != 0 and "dtype" in err


def test_float32_run_evaluates_in_float32(tmp_path: Path) -> None:
    run_dir = record(tmp_path / "run", make_plain32, torch.float32, steps=3)
    ds = trajscope.analyze(run_dir, write=False, progress=False)
    assert ds.attrs["eval_dtype"] == "float32"
    ds64 = trajscope.analyze(run_dir, dtype="float64", write=False, progress=False)
    assert ds64.attrs["eval_dtype"] == "float64"


@pytest.mark.parametrize(("dtypes", "expected"), [
    (["float64", "float64"], "float64"),
    (["float64", "int64"], "float64"),
    (["float64", "float32"], "float32"),
    (["bfloat16", "bfloat16"], "float32"),
    (["float16"], "float32"),
    (["float32"], "float32"),
    (["float64", None], "float32"),  # a dtype the manifest does not give: not known to be float64
])
def test_auto_dtype_from_the_recorded_parameters(tmp_path: Path, dtypes: list[str | None], expected: str) -> None:
    run_dir = record(tmp_path / "run", make_plain32, torch.float32, steps=2)
    r = open_run(run_dir)
    r.manifest["params"] = [{"name": f"p{i}", "shape": [1], **({"dtype": d} if d else {})}
                            for i, d in enumerate(dtypes)]
    assert eval_dtype(r, None) == expected
    assert eval_dtype(r, "auto") == expected
    assert eval_dtype(r, "float32") == "float32" and eval_dtype(r, "float64") == "float64"


def test_the_resolved_dtype_tags_persisted_pairs(tmp_path: Path) -> None:
    """Auto resolves before the settings digest: an auto analysis of a float64 run reuses the
    pairs of an explicit float64 one, and an explicit float32 one recomputes them."""
    run_dir = record(tmp_path / "run", make_plain64, torch.float64, steps=3)
    trajscope.analyze(run_dir, dtype="float64", progress=False)
    pairs = sorted((run_dir / "analysis" / "pairs").iterdir())
    stamps = [p.stat().st_mtime_ns for p in pairs]
    trajscope.analyze(run_dir, progress=False)
    assert [p.stat().st_mtime_ns for p in pairs] == stamps
    ds = trajscope.analyze(run_dir, dtype="float32", progress=False)
    assert ds.attrs["eval_dtype"] == "float32"


def make_plain64() -> trajscope.Objective:
    return trajscope.Objective(model=net(), loss=plain_loss)


def test_bad_dtype_is_refused(tmp_path: Path) -> None:
    run_dir = record(tmp_path / "run", make_plain32, torch.float32, steps=2)
    with pytest.raises(AnalysisError, match="dtype"):
        trajscope.analyze(run_dir, dtype="float16", write=False, progress=False)


def test_steps_and_metrics_selection(tmp_path) -> None:
    classifier_run(tmp_path / "run", steps=10)
    ds = trajscope.analyze(tmp_path / "run", steps="2:9:3", metrics=["convexity_ratio"],
                           points=3, write=False, progress=False)
    assert list(ds.step.values) == [2, 5, 8]
    # a series metric pulls in what it requires, and nothing else
    assert set(ds.data_vars) == {"convexity_num", "convexity_den", "convexity_ratio"}
