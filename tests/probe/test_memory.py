"""Sizes and the chunk plan of the memory budget (trajscope.probe.memory)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch

from trajscope.errors import AnalysisError
from trajscope.probe import memory
from trajscope.probe.memory import SAFETY, parse_size, plan_chunk


def test_plan_and_sizes() -> None:
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size(1000) == 1000
    assert parse_size("1e6") == 10**6
    with pytest.raises(AnalysisError, match="expected bytes or a size"):
        parse_size("lots")
    assert plan_chunk(100 * 2**20, 10 * 2**20, 17) == int(100 / (SAFETY * 10))
    assert plan_chunk(10**12, 10, 17) == 17


def _vm(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_an_analysis_leaves_the_callers_peak_marks_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a caller's process the meter never resets the resident-set high-water mark (what
    ``ru_maxrss`` and a user's own peak measurements read): a peak this process reached before the
    analysis is still reported after it, while the analysis still plans its line."""
    import numpy as np

    import trajscope
    from support.problems import ce_loss, train_classifier
    from trajscope.objective import Objective

    def small() -> Objective:
        torch.manual_seed(0)
        return Objective(model=torch.nn.Linear(10, 4), loss=ce_loss)

    train_classifier(tmp_path / "run", small, steps=3, batch_size=8)
    block = np.ones(512 * 2**20 // 8)  # a 512 MiB peak above anything the small analysis reaches
    block[::512] = 2.0
    del block
    peak_before = _vm("VmHWM")  # read after the unmap, which is when the kernel records the mark
    monkeypatch.setattr(memory, "_OWNED", False)  # a caller's process (an in-process CLI test may have claimed it)
    ds = trajscope.analyze(tmp_path / "run", small, write=False, progress=False, batched=None,
                           derivatives="forward")  # the forward-mode line is what plans by measuring
    assert ds.attrs["line_mode"] in ("batched", "pointwise")
    assert _vm("VmHWM") >= peak_before
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 >= peak_before


def test_meter_reports_a_bound_where_it_may_not_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block below an earlier peak, in a process whose marks are not the meter's to reset,
    measures the earlier peak's height (an upper bound, ``exact`` False), which a plan may size
    with but never refuses on; in an owned process it is measured exactly."""
    monkeypatch.setattr(memory, "_OWNED", False)
    block = torch.ones(32 * 2**20 // 4)  # raise the mark 32 MiB above what the block will hold
    del block
    with memory.PeakMeter("cpu") as m:
        torch.ones(1024).sum()
    assert not m.exact and m.peak >= 16 * 2**20
    assert plan_chunk(1024, m.peak, 17, exact=False) == 1  # sized, not refused
    with pytest.raises(AnalysisError, match="one α point of the line needs"):
        plan_chunk(1024, m.peak, 17, exact=True)
