"""Starting the live analysis from training, in one line: ``rec.follow(device="cuda:1")``.

The follower is ``trajscope analyze RUN --follow`` in a process of its own, never a thread of the
training process: it imports the objective, builds its own model and evaluates on the device it is
given, so training's device, memory and RNG streams are untouched. It runs at the lowest CPU priority
(Linux ``SCHED_IDLE``: only on CPU time training leaves idle; elsewhere ``nice``) with one torch
thread by default (``threads``), and stops by itself once the recorder
closes the run, or once the training process is gone (its recording lock is released with it).
It outlives the training script: the pairs still queued are analyzed after training ends. Its
one-line messages (errors, why it stopped early) go to training's stderr; ``log`` sends them, and a
line per analyzed round, to a file instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from trajscope.errors import RecorderError

__all__ = ["NICE", "follower_command", "start_follower"]

NICE = 10
"""Added to the follower's niceness (0: neither niceness nor ``SCHED_IDLE``, the follower competes
with training as an equal)."""


def follower_command(run_dir: Path, *, device: str = "cpu", poll: float = 2.0, objective: str | None = None,
                     to: str | None = None, target: str | Path | None = None, quiet: bool = True,
                     nice: int = NICE) -> list[str]:
    """The command line of the follower process (see :func:`start_follower`)."""
    # SCHED_IDLE (Linux): the follower runs only on CPU time nothing else wants; elsewhere, niceness.
    idle = "hasattr(os, 'SCHED_IDLE') and os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); "
    lower = f"import os; os.nice({int(nice)}); {idle}" if nice else ""
    boot = lower + "from trajscope.cli import main; main()"
    cmd = [sys.executable, "-c", boot, "analyze", str(run_dir), "--follow", "--poll", repr(float(poll)),
           "--device", device]
    if objective is not None:
        cmd += ["--objective", objective]
    if (to is None) != (target is None):
        raise RecorderError(f"follow(to={to!r}, target={target!r}): give both, e.g. to='tensorboard', "
                            "target='runs/tb'")
    if to is not None:
        cmd += ["--to", to, str(target)]
    return cmd + (["-q"] if quiet else [])


def start_follower(run_dir: Path, *, device: str = "cpu", poll: float = 2.0, objective: str | None = None,
                   to: str | None = None, target: str | Path | None = None, log: str | Path | None = None,
                   nice: int = NICE, threads: int | None = 1) -> subprocess.Popen[bytes]:
    """Start ``trajscope analyze run_dir --follow`` in its own process and return it (it stops by
    itself: see the module docstring).

    Args:
        device: where the follower evaluates (``cpu``, ``cuda:1``: a GPU training does not use).
        poll: seconds between its looks at the run.
        objective: ``module:function`` when the run records none the follower can import.
        to, target: a tracker and its target (``"tensorboard"``, a log directory), logged as pairs arrive.
        log: a file for the follower's output (default: training's stderr, errors only).
        nice: added to the follower's CPU niceness; with ``SCHED_IDLE`` where Linux has it (0: neither).
        threads: torch's intra-op threads in the follower (None: torch's default, every core): one
            leaves training's cores to training.
    """
    cmd = follower_command(run_dir, device=device, poll=poll, objective=objective, to=to, target=target,
                           quiet=log is None, nice=nice)
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if log is None:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    with open(log, "ab") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env)
