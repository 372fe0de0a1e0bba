"""Snapshot references, the per-process cache and the wire form of snapshots (trajscope.analysis.loading).

Bounded memory: the snapshots alive at once do not grow with the number of pairs analyzed. A snapshot
shipped between processes comes back exactly; a process pool passes references, not tensors.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import pytest

import trajscope
import trajscope.analysis.driver as analysis
import trajscope.analysis.loading as snapshots
from support.problems import classifier_run, make_mlp


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classifier_run(tmp_path_factory.mktemp("long") / "run", steps=40, batch_size=8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classifier_run(tmp_path_factory.mktemp("par") / "run", steps=8)


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


# --- the wire form ------------------------------------------------------------------------------


def test_snapshots_ship_as_arrays_and_back() -> None:
    import pickle

    import torch

    from trajscope.analysis.loading import ShippedSnapshot, ship
    from trajscope.store import Snapshot

    snap = Snapshot(step=3, kind="step", params={"w": torch.randn(3, 2), "h": torch.randn(4).bfloat16()},
                    grads={"w": torch.randn(3, 2)}, rng={"cpu": torch.get_rng_state()},
                    batch={"x": (torch.arange(4), [1, "a", None]), "y": torch.tensor(2.5)},
                    loss=0.5, lr=[0.1], training=True)
    back = pickle.loads(pickle.dumps(ship(snap)))
    assert isinstance(back, ShippedSnapshot)
    for a, b in [(snap.params, back.params), (snap.grads, back.grads), (snap.rng, back.rng)]:
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
    assert torch.equal(back.batch["x"][0], snap.batch["x"][0]) and back.batch["x"][1] == [1, "a", None]
    assert back.batch["y"].item() == 2.5 and back.batch["y"].dim() == 0
    assert (back.step, back.kind, back.loss, back.lr, back.training) == (3, "step", 0.5, [0.1], True)


def test_process_pools_pass_snapshots_by_path(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    import torch

    monkeypatch.setattr(snapshots, "_recent", type(snapshots._recent)())
    storage = trajscope.open_run(run_dir).storage
    snap_ref = snapshots.SnapshotRef.of(storage, 3)
    snap = snap_ref.resolve()
    blob = pickle.dumps(snap_ref)
    assert len(blob) < 1000  # a reference, not the tensors
    ref = pickle.loads(blob)
    assert isinstance(ref, snapshots.SnapshotRef)  # the driver never reads the file
    monkeypatch.setattr(snapshots, "_recent", type(snapshots._recent)())  # another process
    back = snapshots.resolved(ref)
    assert back.step == 3 and all(torch.equal(back.params[k], snap.params[k]) for k in snap.params)
    params = pickle.loads(pickle.dumps(snapshots.SnapshotRef.of(storage, 3, params_only=True))).resolve()
    assert set(params.params) == set(snap.params) and not params.grads and params.batch is None



@pytest.mark.parametrize("params_first", [True, False])
def test_one_copy_of_a_steps_parameters_whichever_is_read_first(run_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                params_first: bool) -> None:
    """x_0 is wanted twice (pair 0's start, and the parameters alone for the distance from
    initialisation): whichever reference resolves first, the cache ends up holding one copy of its
    parameter tensors, shared by both snapshots, with the values read from the file."""
    import torch

    monkeypatch.setattr(snapshots, "_recent", type(snapshots._recent)())
    r = trajscope.open_run(run_dir)
    whole_ref = snapshots.SnapshotRef.of(r.storage, 0)
    params_ref = snapshots.SnapshotRef.of(r.storage, 0, params_only=True)
    first, second = (params_ref, whole_ref) if params_first else (whole_ref, params_ref)
    a, b = first.resolve(), second.resolve()
    whole, alone = (b, a) if params_first else (a, b)
    assert isinstance(whole, trajscope.Snapshot) and isinstance(alone, trajscope.Snapshot)
    assert whole.grads and not alone.grads and alone.params.keys() == whole.params.keys()
    for n, t in alone.params.items():
        assert t.data_ptr() == whole.params[n].data_ptr()
        assert torch.equal(t, r.snapshot(0).params[n])
