"""What `trajscope analyze` imports: start-up is measured by ``benchmarks/startup.py``; this test
pins the part of it that is a property of the code, not of the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from problems import train_quadratic

TESTS = Path(__file__).parent

PROBE = """
import json, sys
from trajscope.cli import main
code = None
try:
    main(["analyze", sys.argv[1], "--force", "-q"])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                                                   ("distributed", "tornado", "dask"))}))
"""


def test_a_local_analysis_never_imports_distributed(tmp_path: Path) -> None:
    # `distributed` (with tornado) is a large import that only a cluster needs; writing the
    # Dataset must not pull it in through dask's scheduler lookup.
    run = tmp_path / "run"
    train_quadratic(run, steps=3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PROBE, str(run)], cwd=TESTS, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None), out.stderr[-2000:]
    assert (run / "analysis" / "metrics.nc").is_file()
    assert "dask" in result["modules"]  # the local scheduler is dask's
    assert not [m for m in result["modules"] if m.split(".")[0] in ("distributed", "tornado")]
