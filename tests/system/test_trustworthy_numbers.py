"""Numbers that cannot silently be wrong: persisted pairs follow the objective, replay is a gate,
and a pair whose loss fails is skipped, not fatal."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import trajscope
from support.problems import QuadModel, classifier_run, quad_loss
from support.rundirs import cli, quad_run
from trajscope import Objective
from trajscope.errors import TrajscopeWarning
from trajscope.report.summary import format_headline, format_summary, headline, summarize

# --- objectives importable by name ------------------------------------------------------------


def scaled_loss(model: QuadModel, b: torch.Tensor) -> torch.Tensor:
    return 1.1 * quad_loss(model, b)


def make_wrong_quadratic() -> Objective:
    """Not the objective training minimised: every replay error is large."""
    return Objective(model=QuadModel(), loss=scaled_loss)


SCALE = 1.0


def global_scaled_loss(model: QuadModel, b: torch.Tensor) -> torch.Tensor:
    return SCALE * quad_loss(model, b)


# --- persisted pairs follow what the objective computes ----------------------------------------


def _quiet_analyze(*args: object, **kw: object) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trajscope.analyze(*args, **kw)  # type: ignore[arg-type]


def test_a_second_objective_with_another_loss_is_not_given_the_first_ones_pairs(tmp_path: Path) -> None:
    run = quad_run(tmp_path / "run")
    first = _quiet_analyze(run, Objective(model=QuadModel(), loss=quad_loss))
    assert float(first["loss_replay_error"].max()) < 1e-8
    second = _quiet_analyze(run, Objective(model=QuadModel(), loss=scaled_loss))
    assert float(second["loss_replay_error"].min()) > 0.05


def test_a_changed_global_is_caught_by_the_replay_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = quad_run(tmp_path / "run")
    objective = Objective(model=QuadModel(), loss=global_scaled_loss)
    _quiet_analyze(run, objective)
    monkeypatch.setattr(f"{__name__}.SCALE", 1.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = trajscope.analyze(run, objective)
    changed = [str(w.message) for w in caught if "objective changed since the persisted pairs" in str(w.message)]
    assert len(changed) == 1 and changed[0].endswith("; recomputing")
    assert float(ds["loss_replay_error"].min()) > 0.05


def test_an_unchanged_objective_reuses_its_pairs_quietly(tmp_path: Path) -> None:
    run = quad_run(tmp_path / "run")
    _quiet_analyze(run)
    pairs = sorted((run / "analysis" / "pairs").iterdir())
    stamps = [p.stat().st_mtime_ns for p in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrajscopeWarning)
        trajscope.analyze(run)
    assert [p.stat().st_mtime_ns for p in pairs] == stamps


def _mlp(activation: torch.nn.Module) -> Objective:
    from support.problems import ce_loss

    model = torch.nn.Sequential(torch.nn.Linear(10, 8), activation, torch.nn.Linear(8, 4))
    return Objective(model=model, loss=ce_loss)


def test_the_objective_digest_sees_activations_and_loss_code_and_is_stable() -> None:
    import subprocess
    import sys

    from trajscope.objective import objective_digest

    tanh = objective_digest(_mlp(torch.nn.Tanh()))
    assert tanh != objective_digest(_mlp(torch.nn.ReLU()))
    assert tanh != objective_digest(_mlp(torch.nn.LeakyReLU(0.1)))
    assert objective_digest(_mlp(torch.nn.LeakyReLU(0.1))) != objective_digest(_mlp(torch.nn.LeakyReLU(0.2)))
    assert objective_digest(make_wrong_quadratic()) != objective_digest(Objective(QuadModel(), quad_loss))
    # a fresh interpreter (another hash seed) imports this module by name: tests/ for its helpers
    code = ("import sys; sys.path[:0] = ['tests', 'tests/system']; import torch; "
            "from test_trustworthy_numbers import _mlp; "
            "from trajscope.objective import objective_digest; print(objective_digest(_mlp(torch.nn.Tanh())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2], env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == tanh


# --- replay is a gate ---------------------------------------------------------------------------


def test_replay_failure_warns_and_marks_the_headline(tmp_path: Path) -> None:
    run = quad_run(tmp_path / "run")
    with pytest.warns(TrajscopeWarning, match=r"replay failed on 6 of 6 pairs.*zero_grad"):
        ds = trajscope.analyze(run, make_wrong_quadratic(), write=False)
    h = headline(ds)
    assert h["pairs_replay_failed"] == 6
    assert format_headline(h).startswith("replay failed on 6 of 6 pairs: the findings below may not")
    s = summarize(ds)
    assert s["replay_ok"] is False
    assert format_summary(s).startswith("replay failed on 6 of 6 pairs")


def test_faithful_replay_stays_quiet(tmp_path: Path) -> None:
    run = quad_run(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrajscopeWarning)
        ds = trajscope.analyze(run, write=False)
    assert "pairs_replay_failed" not in headline(ds)
    assert summarize(ds)["replay_ok"] is True
    assert "replay failed" not in format_headline(headline(ds))


def test_cli_prints_one_replay_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = quad_run(tmp_path / "run")
    code, out, err = cli(["analyze", str(run), "--objective", "test_trustworthy_numbers:make_wrong_quadratic"], capsys)
    assert code == 0
    assert [ln for ln in err.splitlines() if "replay failed" in ln][0].startswith("trajscope: warning: replay failed")
    assert len([ln for ln in err.splitlines() if "replay failed" in ln]) == 1
    assert "the findings below may not describe the training run" in out
    code, out, err = cli(["summary", str(run), "--json"], capsys)
    assert code == 0
    assert json.loads(out)["replay_ok"] is False


# --- a pair whose loss fails is skipped ---------------------------------------------------------


def _mlp_run(path: Path, steps: int = 6) -> Path:
    return classifier_run(path, steps=steps)


def _corrupt_labels(run: Path, step: int) -> None:
    from support.rundirs import rewrite_snapshot, step_file

    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> None:
        tensors["batch/1"] = tensors["batch/1"].clone()
        tensors["batch/1"][0] = 16711681

    rewrite_snapshot(step_file(run, step), edit)


def test_a_pair_whose_loss_fails_is_skipped(tmp_path: Path) -> None:
    run = _mlp_run(tmp_path / "run")
    _corrupt_labels(run, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = trajscope.analyze(run)
    assert list(ds["step"].values) == [0, 1, 2, 4, 5]
    skipped = json.loads(ds.attrs["skipped_pairs"])
    assert len(skipped) == 1 and "step 3" in str(skipped) and "out of bounds" in str(skipped)


def test_a_loss_failing_on_the_first_pair_stops_the_analysis(tmp_path: Path) -> None:
    from trajscope.errors import ObjectiveError

    run = _mlp_run(tmp_path / "run")
    _corrupt_labels(run, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ObjectiveError, match="step 0: evaluating the objective's loss failed"):
            trajscope.analyze(run, write=False)


def _replay_ds(loss: list[float], grad: list[float], flags: list[int], **attrs: object) -> object:
    import numpy as np
    import xarray as xr

    n = len(loss)
    return xr.Dataset({"loss_replay_error": ("step", np.array(loss)), "grad_replay_error": ("step", np.array(grad)),
                       "pair_flags": ("step", np.array(flags, dtype=np.int64))},
                      coords={"step": np.arange(n)}, attrs=attrs)


def test_the_replay_gate_counts_pairs_over_their_bounds() -> None:
    from trajscope.analysis.health import replay_failures

    # one of twenty over the bound: within the 10% the gate tolerates
    assert replay_failures(_replay_ds([1e-3] + [0.0] * 19, [0.0] * 20, [0] * 20)).ok
    assert not replay_failures(_replay_ds([1e-3] * 3 + [0.0] * 17, [0.0] * 20, [0] * 20)).ok
    # a non-uniformly clipped pair's grad_replay_error is expected, and said so
    check = replay_failures(_replay_ds([0.0] * 4, [0.5] * 4, [512] * 4))
    assert check.ok and check.nonuniform == 4 and check.failed == 0
    # a bfloat16 run replays to its rounding only
    bf16 = _replay_ds([4e-3] * 4, [2e-2] * 4, [0] * 4, training_rounding=2.0**-8)
    assert replay_failures(bf16).ok
    assert not replay_failures(_replay_ds([4e-3] * 4, [2e-2] * 4, [0] * 4)).ok
