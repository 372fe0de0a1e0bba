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
