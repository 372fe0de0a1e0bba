from __future__ import annotations

import os
from collections.abc import Iterator

# Tiny test models run fastest single-threaded (OpenMP spin-waits cost more than they save,
# badly so on a loaded 2-core CI machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

# The shared helpers (tests/support) assert too: rewrite their asserts as pytest does a test's,
# so a failing helper reports the values it compared.
pytest.register_assert_rewrite("support")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True, scope="session")
def _no_small_analysis_shortcut() -> Iterator[None]:
    """``derivatives="auto"`` sends an analysis too small to repay forward-mode AD's set-up to
    reverse mode, judged by timing one evaluation (:func:`trajscope.probe.trials.reverse_is_cheaper`).
    Tests pin it off, from before the first fixture's analysis, so that which path a test takes
    never depends on the machine's speed or on the tests that ran before it;
    tests/probe/test_trials.py turns it back on."""
    import trajscope.probe.trials

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trajscope.probe.trials, "FORWARD_AD_SETUP_S", 0.0)
        yield


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The start steps of the full probes and of the reference parts computed alone (in-process
    schedulers): which pairs an analysis recomputed."""
    import trajscope.analysis.tasks as tasks

    seen: dict[str, list[int]] = {"probe": [], "reference": []}
    real_probe, real_ref = tasks.probe_pair, tasks.probe_reference

    def probe(objective, snap, nxt, settings, **kw):  # type: ignore[no-untyped-def]
        seen["probe"].append(snap.step)
        return real_probe(objective, snap, nxt, settings, **kw)

    def reference(objective, snap, ref, settings, **kw):  # type: ignore[no-untyped-def]
        seen["reference"].append(snap.step)
        return real_ref(objective, snap, ref, settings, **kw)

    monkeypatch.setattr(tasks, "probe_pair", probe)
    monkeypatch.setattr(tasks, "probe_reference", reference)
    return seen
