"""Numbers that cannot silently be wrong: persisted pairs follow the objective, replay is a gate,
and a pair whose loss fails is skipped, not fatal."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from problems import QuadModel, quad_loss
from runkit import cli, quad_run

import trajscope
from trajscope import Objective
from trajscope.errors import TrajscopeWarning
from trajscope.summary import format_headline, format_summary, headline, summarize

# --- objectives importable by name ------------------------------------------------------------


def scaled_loss(model: QuadModel, b: torch.Tensor) -> torch.Tensor:
    return 1.1 * quad_loss(model, b)


def make_wrong_quadratic() -> Objective:
    """Not the objective training minimised: every replay error is large."""
    return Objective(model=QuadModel(), loss=scaled_loss)


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
    code, out, err = cli(["analyze", str(run), "--objective", "test_trust:make_wrong_quadratic"], capsys)
    assert code == 0
    assert [ln for ln in err.splitlines() if "replay failed" in ln][0].startswith("trajscope: warning: replay failed")
    assert len([ln for ln in err.splitlines() if "replay failed" in ln]) == 1
    assert "the findings below may not describe the training run" in out
    code, out, err = cli(["summary", str(run), "--json"], capsys)
    assert code == 0
    assert json.loads(out)["replay_ok"] is False


# --- a pair whose loss fails is skipped ---------------------------------------------------------


def _mlp_run(path: Path, steps: int = 6) -> Path:
    from problems import make_mlp, train_classifier

    train_classifier(path, make_mlp, steps=steps, objective="problems:make_mlp")
    return path


def _corrupt_labels(run: Path, step: int) -> None:
    from runkit import rewrite_snapshot, step_file

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
