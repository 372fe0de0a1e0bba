"""The command line (trajscope.cli): its commands end to end, one-line errors, exit codes.

Each command's own behaviour is tested with its module (analyze: tests/analysis, report: tests/report/test_page.py,
validate and convert: tests/tools); every failure's message through the CLI in tests/system/test_error_messages.py."""

from __future__ import annotations

import io
import warnings
from typing import Any

import pytest
from click.testing import CliRunner

from support.problems import classifier_run
from trajscope.cli import _cli_warnings, _show_warning, cli, main
from trajscope.errors import DamagedRunWarning, TrajscopeWarning


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


class PluginWarning(TrajscopeWarning):
    """A metric plugin's own warning: defined outside trajscope, derived from TrajscopeWarning."""


def test_cli_prints_trajscope_warnings_as_one_line_and_others_as_python_does(capsys, monkeypatch) -> None:
    from trajscope.recorders.recorder import RecorderWarning

    before: list[tuple[Any, ...]] = []
    monkeypatch.setattr(warnings, "showwarning", lambda *args: before.append(args))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with _cli_warnings():
            warnings.warn("skipped 1 of 4 pair(s)\nfirst: pair 2", DamagedRunWarning, stacklevel=1)
            warnings.warn("recording stopped", RecorderWarning, stacklevel=1)
            warnings.warn("a plugin's note", PluginWarning, stacklevel=1)
            warnings.warn("`foo` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("a library's note", UserWarning, stacklevel=1)
        warnings.warn("after the command", DamagedRunWarning, stacklevel=1)
    assert capsys.readouterr().err.splitlines() == [
        "trajscope: warning: skipped 1 of 4 pair(s)\\nfirst: pair 2",  # escaped: one line
        "trajscope: warning: recording stopped",
        "trajscope: warning: a plugin's note",
    ]
    # the others, and everything after the command, go to the showwarning that was in place
    assert [(str(a[0]), a[1], a[2]) for a in before] == [
        ("`foo` is deprecated", FutureWarning, __file__),
        ("a library's note", UserWarning, __file__),
        ("after the command", DamagedRunWarning, __file__),
    ]


def test_show_warning_prints_a_library_warning_as_python_does(capsys) -> None:
    out = io.StringIO()
    _show_warning(FutureWarning("`foo` is deprecated"), FutureWarning, "/lib/foo.py", 12, out, "foo()")
    assert out.getvalue() == "/lib/foo.py:12: FutureWarning: `foo` is deprecated\n  foo()\n"
    _show_warning(DamagedRunWarning("pair 2 skipped"), DamagedRunWarning, "/lib/health.py", 5, out)
    assert capsys.readouterr().err == "trajscope: warning: pair 2 skipped\n"
