"""Start-up: ``trajscope analyze`` of a one-pair run against ``python -c "import torch"``.

Records a one-pair run of a small linear model into a temporary directory, then runs, alternately
and ``--repeats`` times each, a fresh ``python -c "import torch"`` and a fresh
``trajscope analyze RUN --force -q`` (the pair is recomputed every time, the Dataset written), and
prints the median wall time of each and their difference: what trajscope adds to the import of
torch that any analysis pays. The two commands alternate so machine noise hits both alike.

Then, in one more fresh process, where the added time goes (:data:`BREAKDOWN`): each import in
the order the analysis needs it, the analysis itself (one pair, the Dataset written), of that the
writing of ``metrics.nc``, and whether the analysis paid forward-mode AD's one-time set-up.

Run: ``python -m benchmarks.startup [--repeats 7]``. Numbers: ``docs/performance.md``, section
"Start-up".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OBJECTIVE = '''
import torch
import trajscope


def loss(model, batch):
    return model(batch).pow(2).mean()


def make():
    torch.manual_seed(0)
    return trajscope.Objective(model=torch.nn.Linear(8, 4), loss=loss)
'''


def record(where: Path) -> Path:
    """A one-pair run (steps 0 and 1, and the final state) of objective ``startup_obj:make``."""
    import torch

    from trajscope.recorders import Recorder

    (where / "startup_obj.py").write_text(OBJECTIVE)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(where / "run", model, opt, objective="startup_obj:make") as rec:
        for _ in range(2):
            x = torch.randn(16, 8)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            rec.batch(x, loss=loss)
            opt.step()
    return where / "run"


BREAKDOWN = '''
import gc, json, sys, time
gc.disable()  # as the console script does from its start (trajscope.cli.entry)
phases = {}
t = time.perf_counter()
def mark(name):
    global t
    now = time.perf_counter()
    phases[name] = now - t
    t = now
import torch
mark("import torch")
import trajscope.analysis.driver, trajscope.cli
mark("import trajscope (with dask)")
from trajscope.analysis.dataset import import_dataset_libraries
import_dataset_libraries()
mark("import the Dataset's libraries")
import trajscope.analysis.driver as a
real, written = a._write_dataset, []
def write(*args, **kw):
    t0 = time.perf_counter()
    real(*args, **kw)
    written.append(time.perf_counter() - t0)
a._write_dataset = write
import trajscope.cli as cli
sys.argv = ["trajscope", "analyze", sys.argv[1], "--force", "-q"]
try:
    cli.entry()
except SystemExit:
    pass
mark("the analysis (one pair, Dataset written)")
phases["  of which writing metrics.nc"] = sum(written)
print(json.dumps({"phases": phases, "jvp_setup": "torch._decomp.decompositions_for_jvp" in sys.modules}))
'''
"""A fresh process that times each phase of a one-pair ``trajscope analyze`` separately."""


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    trajscope_cli = [sys.executable, "-m", "trajscope.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        run = record(where)
        timed([*trajscope_cli, "analyze", str(run), "-q"], where)  # warm the page cache and .pyc files
        torch_s, analyze_s = [], []
        for _ in range(args.repeats):
            torch_s.append(timed([sys.executable, "-c", "import torch"], where))
            analyze_s.append(timed([*trajscope_cli, "analyze", str(run), "--force", "-q"], where))
        out = subprocess.run([sys.executable, "-c", BREAKDOWN, str(run)], cwd=where, check=True,
                             capture_output=True, text=True)
        breakdown = json.loads(out.stdout.strip().splitlines()[-1])
    t, a = statistics.median(torch_s), statistics.median(analyze_s)
    print(f"import torch:                    median {t:.2f} s  (min {min(torch_s):.2f})")
    print(f"trajscope analyze (one pair):    median {a:.2f} s  (min {min(analyze_s):.2f})")
    print(f"added by trajscope:              median {a - t:.2f} s  (target <= 1.0 s), "
          f"paired median {statistics.median(x - y for x, y in zip(analyze_s, torch_s)):.2f} s")
    print("where the time goes, in one more process:")
    for name, seconds in breakdown["phases"].items():
        print(f"  {name:<42} {seconds:.2f} s")
    print("  forward-mode AD's set-up (torch's jvp decompositions): "
          + ("paid" if breakdown["jvp_setup"] else "not paid (derivatives=auto chose reverse mode)"))


if __name__ == "__main__":
    main()
