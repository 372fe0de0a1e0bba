"""Shared pieces of the benchmarks: the reference workloads, run recording, timing helpers.

The reference CPU workload is a ~100k-parameter MLP (128 → 256 → 256 → 10, tanh, cross-entropy)
trained with SGD+momentum on synthetic data; every step is recorded. Its objective is importable
by name (``benchmarks.common:make_mlp``) so that worker processes can rebuild it.

Timing rules (docs/performance.md): ratios are measured in one process with interleaved repeats
(A, B, A, B, …) and reported as medians, because the machines this runs on are shared.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` as well as `python -m benchmarks.x`
    sys.path.insert(0, str(ROOT))

import torch
import torch.nn as nn
import torch.nn.functional as F

from trajscope import Objective, Recorder

D_IN, HIDDEN, D_OUT = 128, 256, 10
OBJECTIVE = "benchmarks.common:make_mlp"


class MLP(nn.Module):
    def __init__(self, d_in: int = D_IN, hidden: int = HIDDEN, d_out: int = D_OUT, depth: int = 2) -> None:
        super().__init__()
        dims = [d_in] + [hidden] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = torch.tanh(layer(x))
        return self.out(x)


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_mlp() -> Objective:
    """The reference model: 101,386 parameters."""
    return Objective(model=MLP(), loss=ce_loss)


def make_wide_mlp() -> Objective:
    """A ~1.2M-parameter MLP (128 → 768 → 768 → 10), for the memory and GPU benchmarks."""
    return Objective(model=MLP(hidden=768), loss=ce_loss)


FACTORIES: dict[str, Callable[[], Objective]] = {"mlp": make_mlp, "wide": make_wide_mlp}


def record_run(run_dir: Path, steps: int, *, batch_size: int = 64, model: str = "mlp",
               seed: int = 0) -> Path:
    """Train ``model`` for ``steps`` SGD steps recording every step; reuse an existing run."""
    run_dir = Path(run_dir)
    if (run_dir / "trajscope.json").exists():
        import trajscope

        r = trajscope.open_run(run_dir)
        if r.status == "complete" and len(r.pairs) >= steps and r.manifest.get("metadata", {}).get(
                "batch_size") == batch_size:
            return run_dir
    torch.manual_seed(seed)
    obj = FACTORIES[model]()
    net = obj.model
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(D_IN, D_OUT, generator=gen)
    with Recorder(run_dir, net, opt, objective=f"benchmarks.common:{FACTORIES[model].__name__}",
                  metadata={"batch_size": batch_size}, overwrite=True) as rec:
        for _ in range(steps):
            x = torch.randn(batch_size, D_IN, generator=gen)
            y = (x @ w + 0.5 * torch.randn(batch_size, D_OUT, generator=gen)).argmax(1)
            opt.zero_grad()
            loss = obj.loss(net, (x, y))
            loss.backward()
            rec.batch((x, y), loss=loss)
            opt.step()
    return run_dir


CLOCK = "wall"
"""``wall`` (time.perf_counter) or ``cpu`` (time.process_time: this process' CPU time, all its
threads; robust to other jobs preempting us on a shared machine, blind to waiting on children)."""


def set_clock(name: str) -> None:
    global CLOCK
    if name not in ("wall", "cpu"):
        raise SystemExit(f"--clock={name!r}: expected wall or cpu")
    CLOCK = name


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    clock = time.process_time if CLOCK == "cpu" else time.perf_counter
    t = clock()
    fn()
    return clock() - t


Case = Callable[[], Any] | tuple[Callable[[], Any], Callable[[], Any]]


def interleaved(cases: dict[str, Case], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every case ``repeats`` times, interleaved (A B C A B C …) so drifting load hits all.

    A case is a function, or ``(setup, function)`` where only the function is timed.
    """
    def parts(case: Case) -> tuple[Callable[[], Any], Callable[[], Any]]:
        return case if isinstance(case, tuple) else ((lambda: None), case)

    for _ in range(warmup):
        for case in cases.values():
            setup, fn = parts(case)
            setup()
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(repeats):
        order = list(cases.items())
        if i % 2:  # alternate the order too, so no case always runs right after another
            order.reverse()
        for name, case in order:
            setup, fn = parts(case)
            setup()
            times[name].append(timed(fn))
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def ratio_line(name: str, num: Sequence[float], den: Sequence[float], target: str = "") -> str:
    """'name: median(num)/median(den) = R (per-repeat ratios min..max)'."""
    r = median(num) / median(den)
    per = sorted(a / b for a, b in zip(num, den))
    return (f"{name}: {median(num) * 1e3:.1f} ms / {median(den) * 1e3:.1f} ms = {r:.3f}"
            f"  (paired ratios {per[0]:.3f}..{per[-1]:.3f}, median {median(per):.3f}){target}")


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, load {load:.2f}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads; GPU {gpu}; clock {CLOCK}")


def sync(device: str) -> None:
    """Wait for ``device`` (CUDA) to finish its queued work; nothing on a CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _status_bytes(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process in bytes (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Peaks:
    """Peak memory of this process: :meth:`rss` is the resident-set peak of the whole process (what
    ``ru_maxrss`` reports); :meth:`device` the peak on the device (CPU: resident set; CUDA:
    allocated) since :meth:`mark`. The analyzer leaves these marks alone in a caller's process
    (``trajscope.probe.memory``), so they are read as they are."""

    def __init__(self, device: str) -> None:
        self.dev, self.cuda = device, device.startswith("cuda")
        self._rss = 0

    def _mark(self) -> int:
        return torch.cuda.max_memory_allocated(self.dev) if self.cuda else _status_bytes("VmHWM")

    def __enter__(self) -> Peaks:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def mark(self) -> int:
        """Measure :meth:`device` from now on; returns the memory held now (the baseline)."""
        sync(self.dev)
        self._rss = max(self._rss, _status_bytes("VmHWM"))  # the process' peak so far, kept
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return torch.cuda.memory_allocated(self.dev) if self.cuda else _status_bytes("VmRSS")

    def rss(self) -> int:
        return max(self._rss, _status_bytes("VmHWM"))

    def device(self) -> int:
        return self._mark()
