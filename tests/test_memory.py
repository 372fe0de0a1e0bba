"""Bounded memory: the snapshots alive at once do not grow with the number of pairs analyzed."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import pytest
from problems import make_mlp, train_classifier

import trajscope
import trajscope.analysis.driver as analysis
import trajscope.analysis.loading as snapshots


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("long") / "run"
    train_classifier(run_dir, make_mlp, steps=40, batch_size=8, objective="problems:make_mlp")
    return run_dir


def peak_live_snapshots(run_dir: Path, monkeypatch: pytest.MonkeyPatch, **kw) -> int:
    live: dict[int, weakref.ref] = {}  # snapshots are unhashable dataclasses: track by id
    peak = [0]
    lock = threading.Lock()
    real = snapshots.ship

    def tracked(snap):
        out = real(snap)
        with lock:
            live[id(out)] = weakref.ref(out, lambda _, k=id(out): live.pop(k, None))
            peak[0] = max(peak[0], len(live))
        return out

    monkeypatch.setattr(snapshots, "ship", tracked)
    monkeypatch.setattr(snapshots, "_recent", type(snapshots._recent)())
    trajscope.analyze(run_dir, make_mlp, points=3, write=False, progress=False, **kw)
    return peak[0]


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_snapshots_in_flight_do_not_grow_with_the_run(long_run: Path, monkeypatch: pytest.MonkeyPatch,
                                                     scheduler: str) -> None:
    kw = {"scheduler": scheduler, "workers": 2} if scheduler == "threads" else {}
    short = peak_live_snapshots(long_run, monkeypatch, steps="0:16", **kw)  # two windows
    full = peak_live_snapshots(long_run, monkeypatch, **kw)  # 40 pairs: five windows
    if scheduler == "synchronous":
        # deterministic, and the same peak however long the run or large the window: x_{t−1},
        # x_t, x_{t+1}, the x_0 and x* parameters and the small per-process cache
        assert full <= short + 1
        assert full <= 3 + 2 + snapshots._RECENT_SNAPSHOTS
    else:  # whatever the timing of threads: at most two windows of pairs in flight
        window = max(analysis.MIN_WINDOW, analysis.PAIRS_PER_WORKER * 2)
        assert full <= 2 * (window + 2) + 2 + snapshots._RECENT_SNAPSHOTS
