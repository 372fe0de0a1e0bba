"""Persisted pairs are tied to the bytes they were computed from (trajscope.analysis.persist):
each records the identity of the recording and of every snapshot it read
(:meth:`trajscope.store.run.Run.identities`), and one whose inputs differ from the run's current ones is
recomputed, never reused.

A run recorded anew in its directory, a step file replaced or rewritten, a replaced final state:
each recomputes exactly the pairs that read the changed snapshots, and the Dataset equals an
analysis from scratch. A run that only grew (a live recording, safetensors or HDF5, whose manifest
and HDF5 file are rewritten as it goes) keeps every pair.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import trajscope
from support.problems import classification_data, classifier_run, make_mlp
from support.recording import minibatches, train_steps
from support.rundirs import step_file
from trajscope.analysis.persist import pair_path, reference_path
from trajscope.recorders import Recorder
from trajscope.runformat import read_safetensors_header

STEPS = 8  # pairs 0..7; the final state x_8 is the default reference point x*
KW = {"progress": False}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classifier_run(tmp_path_factory.mktemp("identity") / "run", steps=STEPS)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model and schedule trained at another learning rate: step files that fit the run."""
    return classifier_run(tmp_path_factory.mktemp("identity") / "other", steps=STEPS, lr=0.3)


@pytest.fixture
def run(recorded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "run"))


def from_scratch(run: Path) -> xr.Dataset:
    """The run analyzed as it stands, nothing persisted reused (a step file from another run
    fails the replay check: that warning is not this test's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trajscope.analyze(run, make_mlp, write=False, **KW)


def assert_same(ds: xr.Dataset, want: xr.Dataset) -> None:
    """Every variable identical (the attrs that name the time and the place aside)."""
    xr.testing.assert_identical(ds.drop_attrs(), want.drop_attrs())


def scale_params_in_place(path: Path, factor: float) -> None:
    """Multiply every float32 parameter of a step file by ``factor``, writing over its bytes."""
    header = read_safetensors_header(path)
    start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with path.open("r+b") as fh:
        for key, entry in header.items():
            if key.startswith("param/") and entry["dtype"] == "F32":
                a, b = entry["data_offsets"]
                fh.seek(start + a)
                values = np.frombuffer(fh.read(b - a), dtype="<f4") * np.float32(factor)
                fh.seek(start + a)
                fh.write(values.astype("<f4").tobytes())


def analyze_noting(run: Path, **kw: object) -> tuple[xr.Dataset, list[str]]:
    """Analyze ``run``: the Dataset, and the warnings that counted pairs recomputed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = trajscope.analyze(run, make_mlp, **KW, **kw)  # type: ignore[arg-type]
    return ds, [str(w.message) for w in caught if "persisted pair(s) were computed from" in str(w.message)]


def one_line_counting(notes: list[str], changed: int) -> None:
    assert notes == [f"{changed} persisted pair(s) were computed from snapshot files that changed since "
                     "(replaced, rewritten or recorded anew); recomputing them"]


@pytest.mark.parametrize("storage", ["safetensors", "hdf5"])
def test_a_run_recorded_anew_in_its_directory_gets_none_of_the_old_pairs(
        tmp_path: Path, calls: dict[str, list[int]], storage: str) -> None:
    # Recorder(overwrite=True) removes RUN/analysis: the pairs are kept in an analysis directory
    # of the user's, by an analysis interrupted before it wrote its Dataset.
    run, out = tmp_path / "run", tmp_path / "analysis"
    classifier_run(run, steps=STEPS, format=storage)
    first = trajscope.analyze(run, make_mlp, out=out, **KW)
    (out / "metrics.nc").unlink()
    classifier_run(run, steps=STEPS, format=storage, lr=0.3, overwrite=True)  # same schedule, same model
    calls["probe"].clear()
    ds, notes = analyze_noting(run, out=out)
    np.testing.assert_allclose(ds.lr.values, 0.3)
    assert sorted(calls["probe"]) == list(range(STEPS))
    assert not np.allclose(ds.loss_change.values[1:], first.loss_change.values[1:])
    assert_same(ds, from_scratch(run))
    one_line_counting(notes, STEPS)


@pytest.mark.parametrize("how", ["copy", "copy2", "rewrite"])
def test_a_replaced_step_file_recomputes_the_three_pairs_that_read_it(
        run: Path, other: Path, calls: dict[str, list[int]], how: str) -> None:
    first = trajscope.analyze(run, make_mlp, **KW)
    target = step_file(run, 4)
    if how == "copy":  # written in place: same inode, same size, a new mtime
        shutil.copyfile(step_file(other, 4), target)
    elif how == "copy2":  # the other file's mtime
        shutil.copy2(step_file(other, 4), target)
    else:  # rewritten in place: same inode, size and header; the parameters' bytes and mtime differ
        scale_params_in_place(target, 1.5)
    calls["probe"].clear()
    ds, notes = analyze_noting(run)
    probed, referenced = sorted(calls["probe"]), calls["reference"][:]
    assert_same(ds, from_scratch(run))
    assert not np.allclose(ds.loss_change.sel(step=[3, 4]), first.loss_change.sel(step=[3, 4]))
    assert probed == [3, 4, 5]  # x_4 ends pair 3, starts pair 4, precedes pair 5
    assert referenced == []  # x* unchanged: the reference parts of the others are reused
    one_line_counting(notes, 3)
    calls["probe"].clear()
    _, notes = analyze_noting(run)
    assert calls["probe"] == [] and notes == []  # persisted again, from the current snapshots


def test_a_replaced_final_state_recomputes_the_last_pair_and_the_reference_parts(
        run: Path, other: Path, calls: dict[str, list[int]]) -> None:
    first = trajscope.analyze(run, make_mlp, **KW)
    shutil.copy2(step_file(other, STEPS), step_file(run, STEPS))
    calls["probe"].clear()
    ds, notes = analyze_noting(run)
    probed, referenced = calls["probe"][:], sorted(calls["reference"])
    want = from_scratch(run)
    last = {"step": STEPS - 1}
    assert float(ds.update_norm.sel(last)) == float(want.update_norm.sel(last))
    assert float(ds.update_norm.sel(last)) != pytest.approx(float(first.update_norm.sel(last)), rel=1e-3)
    assert_same(ds, want)
    assert probed == [STEPS - 1]  # the pair (7, 8) reads x_8
    assert referenced == list(range(STEPS - 1))  # x* = x_8: only f(x*), ⟨G0, x_t − x*⟩
    one_line_counting(notes, 1)


def test_a_persisted_pair_records_what_it_read(run: Path) -> None:
    trajscope.analyze(run, make_mlp, **KW)
    r = trajscope.open_run(run)
    ids = r.identities(range(STEPS + 1))
    pairs = run / "analysis" / "pairs"
    meta = read_safetensors_header(pair_path(pairs, 3))["__metadata__"]
    assert json.loads(meta["inputs"]) == {"run": r.identity, "x_t": ids[3], "x_next": ids[4],
                                          "x_prev": ids[2], "x_0": ids[0]}
    meta = read_safetensors_header(pair_path(pairs, 0))["__metadata__"]
    assert json.loads(meta["inputs"]) == {"run": r.identity, "x_t": ids[0], "x_next": ids[1], "x_0": ids[0]}
    meta = read_safetensors_header(reference_path(pairs, 3))["__metadata__"]
    assert json.loads(meta["inputs"]) == {"run": r.identity, "x_t": ids[3]}
    assert all(isinstance(i, str) for i in ids.values()) and len(set(ids.values())) == STEPS + 1


def test_inputs_compare_by_role_and_an_unreadable_snapshot_is_not_held_against_a_result() -> None:
    from trajscope.analysis.persist import same_inputs

    then = json.dumps({"run": "r", "x_t": "a", "x_next": "b"})
    assert same_inputs(then, {"run": "r", "x_t": "a", "x_next": "b"})
    assert not same_inputs(then, {"run": "r", "x_t": "a", "x_next": "c"})  # replaced
    assert not same_inputs(then, {"run": "s", "x_t": "a", "x_next": "b"})  # recorded anew
    assert not same_inputs(then, {"run": "r", "x_t": "a", "x_next": "b", "x_prev": "p"})  # another role
    assert same_inputs(then, {"run": "r", "x_t": "a", "x_next": None})  # damaged since: kept
    assert not same_inputs(None, {"run": "r"})  # written without inputs (an older trajscope)
    assert not same_inputs("{torn", {"run": "r"})


@pytest.mark.parametrize("storage", ["safetensors", "hdf5"])
def test_a_live_recording_analyzed_as_it_grows_keeps_every_pair(
        tmp_path: Path, calls: dict[str, list[int]], storage: str) -> None:
    # An HDF5 file grows (new mtime and size) with every row; the manifest is rewritten at close
    # (status, step counts, created, the scheduled lr): none of that changes a recorded step.
    torch.manual_seed(0)
    obj = make_mlp()
    opt = torch.optim.SGD(obj.model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    X, Y = classification_data()
    batches = minibatches(X, Y, STEPS, 32, torch.Generator().manual_seed(1))
    run = tmp_path / "run"
    with Recorder(run, obj.model, opt, format=storage, async_write=False,
                  objective="support.problems:make_mlp") as rec:
        for i, batch in enumerate(batches):
            train_steps(rec, obj.model, opt, obj.loss, [batch])
            sched.step()
            if i == 4:  # x_0..x_4 on disk: pairs 0..3
                _, notes = analyze_noting(run)
                assert sorted(calls["probe"]) == [0, 1, 2, 3] and notes == []
    calls["probe"].clear()
    ds, notes = analyze_noting(run)
    assert sorted(calls["probe"]) == [4, 5, 6, 7] and notes == []
    assert_same(ds, from_scratch(run))


def test_a_run_copied_with_its_mtimes_keeps_every_pair(run: Path, tmp_path: Path,
                                                       calls: dict[str, list[int]]) -> None:
    # shutil.copytree (like cp -a, rsync -a) keeps each file's bytes and mtime; its inodes are new
    trajscope.analyze(run, make_mlp, **KW)
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    calls["probe"].clear()
    ds, notes = analyze_noting(copy)
    assert calls == {"probe": [], "reference": []} and notes == []
    assert_same(ds, from_scratch(copy))
