"""What recording costs the training loop: :class:`RecorderStats` (``Recorder.stats``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RecorderStats"]


@dataclass
class RecorderStats:
    """What recording has cost so far (``Recorder.stats``), for tuning ``every``/``max_pending``.

    Attributes:
        snapshots: snapshots copied (recorded steps, plus the final state once closed).
        bytes: bytes of those snapshots (file sizes in the safetensors format).
        copy_seconds: training-thread time spent copying snapshots (the unavoidable part).
        wait_seconds: training-thread time spent waiting for a free buffer because the disk was
            behind (back-pressure); grows when ``every`` is too small for the disk.
        write_seconds: time the writer spent writing (on the background thread when async).
        hook_seconds, hook_cpu_seconds: wall and CPU time of the training thread inside the
            recorder (every hook and ``batch`` call, copies included): all recording adds to the
            training thread.
        write_cpu_seconds: CPU time of the writer (what it can take from training on a machine
            with no idle core).
    """

    snapshots: int = 0
    bytes: int = 0
    copy_seconds: float = 0.0
    wait_seconds: float = 0.0
    write_seconds: float = 0.0
    hook_seconds: float = 0.0
    hook_cpu_seconds: float = 0.0
    write_cpu_seconds: float = 0.0
