"""The reference part of a pair (trajscope.probe.reference_point): a new reference point x* recomputes only
the reference part of the persisted pairs.

Only f(x*; z_t) and ⟨G0, x_t − x*⟩ depend on x*; the rest of each pair is reused. Every test checks
which work ran (the full probe ``tasks.probe_pair`` against the reference part alone
``tasks.probe_reference``) and that the Dataset equals a from-scratch ``force=True`` analysis.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import trajscope
from support.problems import classifier_run, make_mlp_dropout
from support.replay_problems import make_cnn, train_cnn
from support.rundirs import edit_manifest, rewrite_snapshot, step_file
from trajscope.analysis.persist import PairTable, reference_path
from trajscope.errors import DamagedRunWarning
from trajscope.probe import ProbeSettings, probe_pair
from trajscope.probe.reference_point import merge, probe_reference, split
from trajscope.runformat import read_safetensors_header

STEPS = 12  # steps 0..11 recorded with their minibatch, the final state x_12
FINAL = STEPS
KW = {"dtype": "float64", "points": 5, "progress": False}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # dropout: the reference part must replay the step's RNG state as the full probe does
    return classifier_run(tmp_path_factory.mktemp("refsplit") / "run", make_mlp_dropout, steps=STEPS)


@pytest.fixture
def run(recorded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "run"))


def scratch(run: Path, tmp_path: Path, **kw: object) -> xr.Dataset:
    """A from-scratch ``force=True`` analysis of a copy of ``run`` as it is now."""
    copy = Path(shutil.copytree(run, tmp_path / f"scratch{len(list(tmp_path.iterdir()))}"))
    return trajscope.analyze(copy, force=True, **KW, **kw)  # type: ignore[arg-type]


def assert_same(ds: xr.Dataset, want: xr.Dataset) -> None:
    """Every variable equal to 1e-10 (relative to its largest value, or the loss's for a difference
    of losses), NaN where ``want`` is."""
    assert list(ds.step.values) == list(want.step.values)
    assert set(ds.data_vars) == set(want.data_vars)
    for name in want.data_vars:
        w = np.asarray(want[name].values, dtype=np.float64)
        scale = np.nanmax(np.abs(w)) if np.isfinite(w).any() else 1.0
        if name in ("line_integral_residual", "descent_lemma_gap", "convexity_ref_den"):
            # differences of O(loss) numbers: one ulp of the loss is their rounding, wherever computed
            scale = max(scale, float(np.nanmax(np.abs(want["loss_line"].values))))
        np.testing.assert_allclose(ds[name].values, w, rtol=1e-10, atol=1e-10 * scale, equal_nan=True,
                                   err_msg=name)
    assert json.loads(ds.attrs["probe"]) == json.loads(want.attrs["probe"])


def files(run: Path, prefix: str) -> dict[str, tuple[int, int]]:
    """Persisted files ``<prefix>_*.safetensors``: name → (inode, mtime_ns); a rewritten file gets
    a new inode (written to a temporary name and renamed)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (run / "analysis" / "pairs").glob(f"{prefix}_*.safetensors")}


def hide_final_state(run: Path, tmp_path: Path) -> Path:
    """The run as its recorder left it while training: status recording, no final state."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    step_file(run, FINAL).rename(hidden / step_file(run, FINAL).name)
    edit_manifest(run, lambda m: m.update(status="recording", final_step=None))
    return hidden / step_file(run, FINAL).name


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_a_run_gaining_its_final_state_recomputes_only_the_reference_part(
        run: Path, tmp_path: Path, calls: dict[str, list[int]], scheduler: str) -> None:
    final = hide_final_state(run, tmp_path)
    ds = trajscope.analyze(run, scheduler=scheduler, workers=2 if scheduler == "threads" else None, **KW)
    assert json.loads(ds.attrs["probe"])["reference_step"] is None
    assert np.isnan(ds.convexity_ratio_ref.values).all()  # no x* while recording
    assert sorted(calls["probe"]) == list(range(STEPS - 1)) and calls["reference"] == []
    before = files(run, "pair")
    assert len(before) == STEPS - 1 and files(run, "ref") == {}  # nothing to keep without x*

    # The run completes: its final state appears and becomes the default x*.
    final.rename(step_file(run, FINAL))
    edit_manifest(run, lambda m: m.update(status="complete", final_step=FINAL))
    calls["probe"].clear()
    ds = trajscope.analyze(run, scheduler=scheduler, workers=2 if scheduler == "threads" else None, **KW)
    assert calls["probe"] == [STEPS - 1]  # the one new pair, (11, 12)
    assert sorted(calls["reference"]) == list(range(STEPS - 1))  # the others: f(x*), ⟨G0, x_t − x*⟩
    assert all(files(run, "pair")[k] == v for k, v in before.items())  # untouched
    assert len(files(run, "ref")) == STEPS
    want = scratch(run, tmp_path)
    assert np.isfinite(want.convexity_ratio_ref.values).any()
    assert_same(ds, want)
    assert_same(trajscope.open_metrics(run), want)

    calls["probe"].clear()
    calls["reference"].clear()
    assert_same(trajscope.analyze(run, **KW), want)
    assert calls == {"probe": [], "reference": []}  # everything persisted, x* included


def test_a_new_final_state_recomputes_only_the_reference_part(
        run: Path, tmp_path: Path, calls: dict[str, list[int]]) -> None:
    # The run as it was when its final state was x_8: analyzed with that x* ...
    hidden = tmp_path / "later"
    hidden.mkdir()
    for t in range(9, FINAL + 1):
        step_file(run, t).rename(hidden / step_file(run, t).name)
    edit_manifest(run, lambda m: m.update(final_step=8))
    ds = trajscope.analyze(run, **KW)
    assert json.loads(ds.attrs["probe"])["reference_step"] == 8
    assert sorted(calls["probe"]) == list(range(8)) and calls["reference"] == []
    before = files(run, "pair")
    # ... then the run goes on to its final state x_12: a new x* for every pair.
    for f in hidden.iterdir():
        f.rename(run / "steps" / f.name)
    edit_manifest(run, lambda m: m.update(final_step=FINAL))
    calls["probe"].clear()
    ds = trajscope.analyze(run, **KW)
    assert sorted(calls["probe"]) == list(range(8, STEPS))
    assert sorted(calls["reference"]) == list(range(8))
    assert all(files(run, "pair")[k] == v for k, v in before.items())
    want = scratch(run, tmp_path)
    assert json.loads(want.attrs["probe"])["reference_step"] == FINAL
    assert_same(ds, want)


def test_another_reference_recomputes_only_the_reference_part(
        run: Path, tmp_path: Path, calls: dict[str, list[int]]) -> None:
    trajscope.analyze(run, **KW)
    before, refs = files(run, "pair"), files(run, "ref")
    assert len(before) == len(refs) == STEPS
    calls["probe"].clear()
    ds = trajscope.analyze(run, reference=5, **KW)
    assert calls["probe"] == [] and sorted(calls["reference"]) == list(range(STEPS))
    assert files(run, "pair") == before
    assert all(files(run, "ref")[k] != v for k, v in refs.items())  # every part rewritten
    assert json.loads(ds.attrs["probe"])["reference_step"] == 5
    assert_same(ds, scratch(run, tmp_path, reference=5))
    calls["probe"].clear()
    calls["reference"].clear()
    trajscope.analyze(run, reference=5, **KW)
    assert calls == {"probe": [], "reference": []}
    ds = trajscope.analyze(run, **KW)  # back to x_12: the parts again
    assert calls["probe"] == [] and sorted(calls["reference"]) == list(range(STEPS))
    assert_same(ds, scratch(run, tmp_path))


def test_a_replaced_reference_snapshot_recomputes_the_reference_part(
        run: Path, tmp_path: Path, calls: dict[str, list[int]]) -> None:
    # x* = x_9, outside the analyzed pairs 0..3: replacing its file changes only the reference part
    first = trajscope.analyze(run, steps="0:4", reference=9, **KW)
    meta = read_safetensors_header(reference_path(run / "analysis" / "pairs", 2))["__metadata__"]
    layers = trajscope.open_run(run).trainable
    assert (meta["step"], meta["reference"], json.loads(meta["layers"])) == ("2", "9", layers)
    calls["probe"].clear()
    trajscope.analyze(run, steps="0:4", reference=9, **KW)
    assert calls == {"probe": [], "reference": []}

    def perturb(tensors: dict, meta: dict) -> None:
        for k in tensors:
            if k.startswith("param/"):
                tensors[k] = tensors[k] * 1.01

    rewrite_snapshot(step_file(run, 9), perturb)
    ds = trajscope.analyze(run, steps="0:4", reference=9, **KW)
    assert calls["probe"] == [] and sorted(calls["reference"]) == [0, 1, 2, 3]
    assert_same(ds, scratch(run, tmp_path, steps="0:4", reference=9))
    assert not np.allclose(ds.convexity_ref_num.values, first.convexity_ref_num.values, rtol=1e-6)
    np.testing.assert_array_equal(ds.loss_change.values, first.loss_change.values)


def test_a_damaged_start_snapshot_skips_its_pair_in_a_reference_task(
        run: Path, calls: dict[str, list[int]]) -> None:
    trajscope.analyze(run, **KW)
    step_file(run, 3).write_bytes(step_file(run, 3).read_bytes()[:100])
    calls["probe"].clear()
    with pytest.warns(DamagedRunWarning, match="pair 3"):
        ds = trajscope.analyze(run, reference=5, **KW)
    assert calls["probe"] == [] and 3 not in calls["reference"]
    assert 3 not in ds.step.values and 2 in ds.step.values  # pair 2 is persisted: x_3 not read
    assert [d["step"] for d in json.loads(ds.attrs["skipped_pairs"])] == [3]
    assert np.isfinite(ds.convexity_ref_num.values).all()


@pytest.mark.slow
def test_the_process_pool_recomputes_only_the_reference_part(run: Path, tmp_path: Path) -> None:
    final = hide_final_state(run, tmp_path)
    trajscope.analyze(run, **KW)
    before = files(run, "pair")
    final.rename(step_file(run, FINAL))
    edit_manifest(run, lambda m: m.update(status="complete", final_step=FINAL))
    ds = trajscope.analyze(run, scheduler="processes", workers=2, **KW)
    after = files(run, "pair")
    assert all(after[k] == v for k, v in before.items()) and len(after) == STEPS
    assert len(files(run, "ref")) == STEPS  # written by the workers
    assert_same(ds, scratch(run, tmp_path))


def test_reference_part_equals_the_full_probe_with_batchnorm_and_dropout(tmp_path: Path) -> None:
    # train-mode BatchNorm and two dropouts: the part alone replays them as the full probe does
    run_dir = tmp_path / "cnn"
    train_cnn(run_dir, steps=3)
    r = trajscope.open_run(run_dir)
    settings = ProbeSettings(alphas=(0.0, 1.0), dtype="float64", reference_step=r.final_step)
    ref = r.snapshot(r.final_step)
    for t in (0, 1):
        snap, nxt = r.snapshot(t), r.snapshot(t + 1)
        full = probe_pair(make_cnn(), snap, nxt, settings, ref=ref, trainable=r.trainable)
        part = probe_reference(make_cnn(), snap, ref, settings, trainable=r.trainable)
        rest, want = split(full, r.final_step)
        assert want is not None and "loss_ref" not in rest.extras and "G0.x_ref" not in rest.terms
        assert np.isfinite(part.loss_ref) and part.layers == full.layers
        assert part.loss_ref == pytest.approx(want.loss_ref, rel=1e-12)
        np.testing.assert_allclose(part.x_ref, want.x_ref, rtol=1e-10, atol=1e-12)
        merged = merge(rest, part)
        assert list(merged.terms) == list(full.terms)  # TERMS order kept
        table = PairTable([t])
        table.put(merged)
        back = table.get(t)
        for k, v in full.to_tensors().items():
            np.testing.assert_allclose(back.to_tensors()[k], v, rtol=1e-10, atol=1e-12, err_msg=k)
        without = merge(rest, None)
        assert np.isnan(without.terms["G0.x_ref"]).all() and "loss_ref" not in without.extras
        table.discard(t)
        assert t not in table and len(table) == 0
    assert part.reference == r.final_step and part.step == 1
