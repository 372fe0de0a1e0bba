"""What `trajscope analyze` imports: start-up is measured by ``benchmarks/startup.py``; this test
pins the part of it that is a property of the code, not of the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.problems import train_quadratic

TESTS = Path(__file__).parents[1]  # on a child interpreter's PYTHONPATH: the helpers in support/

PROBE = """
import json, sys
from trajscope.cli import main
code = None
try:
    main(["analyze", sys.argv[1], "--force", "-q", *sys.argv[2:]])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                                                   ("distributed", "tornado", "dask")),
                  "jvp_setup": "torch._decomp.decompositions_for_jvp" in sys.modules}))
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` in a fresh interpreter that imports the tests' helpers."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=TESTS, env=env, capture_output=True,
                          text=True, timeout=300)


def _analyze_fresh(run: Path, *args: str) -> dict[str, Any]:
    """``trajscope analyze RUN --force -q ARGS`` in a fresh interpreter: what it imported."""
    out = _python(PROBE, str(run), *args)
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None), out.stderr[-2000:]
    assert (run / "analysis" / "metrics.nc").is_file()
    return result


def test_a_local_analysis_never_imports_distributed(tmp_path: Path) -> None:
    # `distributed` (with tornado) is a large import that only a cluster needs; writing the
    # Dataset must not pull it in through dask's scheduler lookup.
    run = tmp_path / "run"
    train_quadratic(run, steps=3)
    result = _analyze_fresh(run)
    assert "dask" in result["modules"]  # the local scheduler is dask's
    assert not [m for m in result["modules"] if m.split(".")[0] in ("distributed", "tornado")]


def test_a_tiny_analysis_skips_forward_mode_set_up(tmp_path: Path) -> None:
    # Two pairs of a quadratic at 3 α points: reverse mode's whole line work (2 x 3 x 3
    # evaluations of f) is far below what torch's first jvp costs to set up, so `auto` takes
    # reverse mode and never imports the jvp decompositions. It would take one evaluation slower
    # than 15 ms for the estimate to reach the set-up (trajscope.probe.trials.FORWARD_AD_SETUP_S).
    run = tmp_path / "run"
    train_quadratic(run, steps=2)
    assert _analyze_fresh(run, "--points", "3", "--margin", "0")["jvp_setup"] is False


ENTRY = """
import atexit, gc, sys
from trajscope.cli import entry
atexit.register(lambda: print("frozen objects at exit:", gc.get_freeze_count() > 0,
                              "collecting:", gc.isenabled(), flush=True))
sys.argv = ["trajscope", *sys.argv[1:]]
entry()
"""


def test_the_console_script_exits_without_a_final_collection_and_keeps_its_exit_code(tmp_path: Path) -> None:
    # `trajscope` freezes the heap as it ends, so the interpreter's final garbage collections skip
    # what torch, pandas and xarray allocated; the exit code and the atexit handlers stay.
    ok = _python(ENTRY, "metrics")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "convexity_ratio" in ok.stdout and "frozen objects at exit: True" in ok.stdout
    bad = _python(ENTRY, "info", str(tmp_path / "missing"))
    assert bad.returncode == 1 and bad.stderr.startswith("trajscope: error:"), bad.stderr[-2000:]
    assert "frozen objects at exit: True" in bad.stdout


def test_the_console_script_collects_garbage_while_it_analyzes(tmp_path: Path) -> None:
    # Collection is paused only while the command imports its libraries; the analysis itself,
    # which may run for hours, collects as usual.
    run = tmp_path / "run"
    train_quadratic(run, steps=2)
    out = _python(ENTRY, "analyze", str(run), "-q")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "frozen objects at exit: True collecting: True" in out.stdout
    assert (run / "analysis" / "metrics.nc").is_file()
