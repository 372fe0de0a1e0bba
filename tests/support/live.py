"""Training in a process of its own while a test watches the run: the script, and its environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

TRAIN = """
import sys, time, torch
from support.problems import ce_loss, classification_data, make_mlp, minibatches
from trajscope.recorders import Recorder
run, steps, pause, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = make_mlp().model
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
X, Y = classification_data()
batches = minibatches(X, Y, steps, 32, torch.Generator().manual_seed(1))
with Recorder(run, model, opt, objective="support.problems:make_mlp") as rec:
    if log:  # the recorder starts the follower
        print(rec.follow(log=log, poll=0.3).pid, flush=True)
    for i in range(steps):
        x, y = next(batches)
        opt.zero_grad()
        loss = ce_loss(model, (x, y))
        loss.backward()
        rec.batch((x, y), loss=loss)
        opt.step()
        time.sleep(pause)
"""
"""Records ``steps`` steps of :func:`support.problems.make_mlp` into ``run``, ``pause`` seconds apart;
with a ``log`` path, ``rec.follow(log=log)`` first, printing the follower's pid."""


def env() -> dict[str, str]:
    """This environment, with ``tests/`` importable (the objective ``support.problems:make_mlp``)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def train(run: Path, steps: int, pause: float, log: Path | None = None) -> subprocess.Popen[str]:
    """Start :data:`TRAIN` in a process of its own."""
    return subprocess.Popen([sys.executable, "-c", TRAIN, str(run), str(steps), str(pause), str(log or "")],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
