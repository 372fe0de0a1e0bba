"""The objective contract (trajscope.objective): factories that take the run, where the model is built
from the configuration the run
recorded (``Recorder(..., metadata={"config": ...})``), in the driver and in every worker."""

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
from trajscope.analysis.persist import settings_digest
from trajscope.analysis.plan import objective_id
from trajscope.errors import ObjectiveError
from trajscope.objective import resolve_objective, takes_run
from trajscope.store.run import Run, open_run
from trajscope.tools.validate import validate_run

N_IN, N_OUT = 5, 3
SEEN: list[Any] = []
"""What make_from_config was called with, in this process."""


class Net(nn.Module):
    def __init__(self, hidden: int, depth: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(N_IN, hidden), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.Tanh()]
        self.body = nn.Sequential(*layers, nn.Linear(hidden, N_OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def xent(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_from_config(run: Run) -> trajscope.Objective:
    """The nanoGPT pattern: the model as the run's recorded configuration describes it."""
    SEEN.append(run)
    cfg = run.metadata["config"]
    return trajscope.Objective(model=Net(**cfg), loss=xent)


def make_default_run(run: Any = None) -> trajscope.Objective:
    cfg = run.metadata["config"] if run is not None else {"hidden": 4}
    return trajscope.Objective(model=Net(**cfg), loss=xent)


def record(run_dir: Path, config: dict[str, int], objective: str = "test_objective:make_from_config",
           steps: int = 4) -> Path:
    torch.manual_seed(0)
    model = Net(**config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = ((torch.randn(8, N_IN, generator=g), torch.randint(0, N_OUT, (8,), generator=g)) for _ in range(steps))
    return recording.record(run_dir, model, opt, xent, batches, objective=objective, metadata={"config": config})


def test_run_metadata_is_the_recorders_metadata(tmp_path: Path) -> None:
    r = open_run(record(tmp_path / "run", {"hidden": 6, "depth": 2}))
    assert r.metadata == {"config": {"hidden": 6, "depth": 2}}
    r.manifest.pop("metadata")
    assert r.metadata == {}


def test_factory_taking_the_run_builds_the_recorded_model(tmp_path: Path) -> None:
    run_dir = record(tmp_path / "run", {"hidden": 6, "depth": 2})
    SEEN.clear()
    ds = trajscope.analyze(run_dir, progress=False)
    assert ds.sizes["step"] == 4
    assert np.all(np.asarray(ds.loss_replay_error) <= 1e-5)
    assert SEEN and all(isinstance(r, Run) and r.path == run_dir for r in SEEN)


def test_two_runs_with_different_configurations_in_one_process(tmp_path: Path) -> None:
    """The factory is called once per run: a cached model of another run's configuration would
    fail the parameter check."""
    a = record(tmp_path / "a", {"hidden": 6})
    b = record(tmp_path / "b", {"hidden": 9, "depth": 2})
    for run_dir in (a, b, a):
        ds = trajscope.analyze(run_dir, write=False, progress=False)
        assert ds.sizes["step"] == 4


def test_workers_reopen_the_run(tmp_path: Path) -> None:
    run_dir = record(tmp_path / "run", {"hidden": 6, "depth": 2})
    ref = trajscope.analyze(run_dir, write=False, progress=False)
    ds = trajscope.analyze(run_dir, scheduler="processes", workers=2, progress=False)
    np.testing.assert_allclose(ds.loss_replay_error.values, ref.loss_replay_error.values, atol=1e-6)
    np.testing.assert_allclose(ds.inst_smoothness.values, ref.inst_smoothness.values, rtol=1e-4)


def test_persisted_pairs_are_reused_by_the_same_factory(tmp_path: Path) -> None:
    """The objective's name (and so the digest that tags persisted pairs) does not depend on the
    run object handed to the factory."""
    run_dir = record(tmp_path / "run", {"hidden": 6})
    trajscope.analyze(run_dir, progress=False)
    pairs = sorted((run_dir / "analysis" / "pairs").iterdir())
    stamps = [p.stat().st_mtime_ns for p in pairs]
    trajscope.analyze(run_dir, "test_objective:make_from_config", progress=False)
    assert [p.stat().st_mtime_ns for p in pairs] == stamps
    recorded = open_run(run_dir).objective
    assert objective_id(None, recorded) == objective_id("test_objective:make_from_config", None)
    assert objective_id(make_from_config, None) == "test_objective:make_from_config"


def test_cli_and_validate_pass_the_run(tmp_path: Path, capsys: Any) -> None:
    from support.rundirs import cli

    run_dir = record(tmp_path / "run", {"hidden": 6, "depth": 2})
    code, _, err = cli(["analyze", str(run_dir), "-q"], capsys)
    assert code == 0, err
    report = validate_run(run_dir, objective="test_objective:make_from_config")
    assert report.ok, report.problems


def test_zero_argument_and_defaulted_factories(tmp_path: Path) -> None:
    run_dir = record(tmp_path / "run", {"hidden": 4}, objective="test_objective:make_default_run")
    r = open_run(run_dir)
    # a parameter named ``run`` is given the run even with a default
    assert isinstance(resolve_objective(None, r.objective, r).model, Net)
    ds = trajscope.analyze(run_dir, write=False, progress=False)
    assert ds.sizes["step"] == 4

    def make_seeded(seed: int = 0) -> trajscope.Objective:
        torch.manual_seed(seed)
        return trajscope.Objective(model=Net(4), loss=xent)

    assert isinstance(resolve_objective(make_seeded, None, r).model, Net)


def test_takes_run() -> None:
    def f0() -> None: ...
    def f1(run: Any) -> None: ...
    def f2(run: Any = None) -> None: ...
    def f3(seed: int = 0) -> None: ...
    def f4(*args: Any) -> None: ...
    def f5(*, run: Any = None) -> None: ...
    def f6(cfg: Any) -> None: ...

    assert [takes_run(f) for f in (f0, f1, f2, f3, f4, f5, f6)] == [False, True, True, False, False, False, True]
    assert takes_run(lambda run: run) and not takes_run(lambda: None)
    assert not takes_run(print)  # a builtin whose signature cannot be read is called as it is


def test_factory_taking_the_run_needs_one() -> None:
    with pytest.raises(ObjectiveError, match="takes an argument"):
        resolve_objective(make_from_config, None)


def test_digest_is_deterministic(tmp_path: Path) -> None:
    from trajscope.analysis.plan import probe_settings

    r = open_run(record(tmp_path / "run", {"hidden": 4}, steps=2))
    kw: dict[str, Any] = dict(points=5, margin=0.5, device="cpu", dtype=None, chunk_size=None, batched=True,
                              sharpness=False, sharpness_max_iter=10, reference=None)
    name = objective_id(None, r.objective)
    assert settings_digest(probe_settings(r, **kw), name) == settings_digest(probe_settings(r, **kw), name)
