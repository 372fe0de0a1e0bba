"""The command line (trajscope.cli): its commands end to end, one-line errors, exit codes.

Each command's own behaviour is tested with its module (analyze: tests/analysis, report: tests/report/test_page.py,
validate and convert: tests/tools); every failure's message through the CLI in tests/system/test_error_messages.py."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from support.problems import classifier_run
from trajscope.cli import cli, main


def test_cli_analyze_info_metrics(tmp_path, monkeypatch) -> None:
    classifier_run(tmp_path / "run", steps=5)
    runner = CliRunner()
    res = runner.invoke(cli, ["info", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "status     complete" in res.output and "5 analyzable" in res.output
    res = runner.invoke(cli, ["analyze", str(tmp_path / "run"), "--points", "3"])
    assert res.exit_code == 0, res.output
    assert "pairs analyzed" in res.output and (tmp_path / "run/analysis/metrics.nc").exists()
    res = runner.invoke(cli, ["metrics"])
    assert res.exit_code == 0
    assert any(line.startswith("inst_gap ") and "<= 0" in line for line in res.output.splitlines())


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path / "nope")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert err.startswith("trajscope: error: ") and "nope: no such directory" in err
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path), "--points", "1"])
    assert exc.value.code == 2
