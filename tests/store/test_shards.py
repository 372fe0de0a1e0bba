"""Sharded runs (trajscope.store.shards, format version 3): a snapshot written in parts by the ranks of
an FSDP run reads back whole, bit for bit, and analyzes as the run recorded in one process; a part
that is missing, of another step or rank, or whose pieces leave a gap, overlap, lie outside their
tensor or change dtype makes only its step damaged, with one line naming the file and the key.

The sharded runs are made by hand from an ordinary recording (support.sharded): every param/,
grad/ and optim/ tensor split by offset along dim 0 (FSDP2) or as flat slices (FSDP1)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import trajscope
from support.problems import classifier_run
from support.rundirs import assert_same_stored_steps, copy_run, load_raw, rewrite_snapshot, step_file
from support.sharded import part_file, shard_run
from trajscope import runformat as fmt
from trajscope.errors import DamagedRunWarning, RunFormatError
from trajscope.store import open_run, read_raw, read_snapshot
from trajscope.store.shards import part_files
from trajscope.tools.validate import validate_run

VARIANTS = {"fsdp2 by offset": {"ranks": 2}, "fsdp1 flat slices": {"ranks": 2, "flat": True},
            "5 ranks, empty pieces": {"ranks": 5}}


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AdamW with its state recorded: optim/ tensors are sharded too, and the 0-d ``step`` of each."""
    return classifier_run(tmp_path_factory.mktemp("original") / "run", steps=6, opt="adamw", lr=0.01,
                          optimizer_state=True)


# The same kernels for every analysis, so that float32 results compare bit for bit: the synchronous
# scheduler (threads change torch's intra-op split) and the α points by vmap (left to itself, the
# line plan may go point by point when its timing says so, which rounds differently).
SETTLED: dict[str, Any] = {"scheduler": "synchronous", "batched": True}


@pytest.fixture(scope="module")
def original_ds(original: Path) -> Any:
    return trajscope.analyze(original, write=False, progress=False, **SETTLED)


@pytest.fixture(scope="module", params=list(VARIANTS))
def sharded(original: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shard_run(copy_run(original, tmp_path_factory.mktemp("sharded") / "run"), **VARIANTS[request.param])


@pytest.fixture(scope="module")
def two_ranks(original: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shard_run(copy_run(original, tmp_path_factory.mktemp("two") / "run"))


@pytest.fixture
def damaged(two_ranks: Path, tmp_path: Path) -> Path:
    return copy_run(two_ranks, tmp_path / "run")


def test_the_runs_are_sharded(sharded: Path, original: Path) -> None:
    tensors, meta = load_raw(step_file(sharded, 3))
    whole, _ = load_raw(step_file(original, 3))
    assert meta["shards"] and meta["shard"]["rank"] == 0 and "param/fc1.weight" in meta["shard"]["boxes"]
    assert tensors["param/fc1.weight"].numel() < whole["param/fc1.weight"].numel()
    assert torch.equal(tensors["batch/0"], whole["batch/0"])  # unsharded: in the step file, whole
    assert len(part_files(sharded, [3])) == len(meta["shards"])


def test_every_snapshot_reads_back_bit_identical(sharded: Path, original: Path) -> None:
    assert_same_stored_steps(original, sharded)  # metadata (without shards, shard) and tensor bits
    run, plain = open_run(sharded), open_run(original)
    for s in run.steps:
        a, b = read_snapshot(step_file(sharded, s)), plain.snapshot(s)
        assert a.params.keys() == b.params.keys() and a.grads.keys() == b.grads.keys()
        for name in b.params:
            assert torch.equal(a.params[name], b.params[name])
            assert torch.equal(run.storage.read_params(s).params[name], b.params[name])
        for name, state in b.optimizer_state.items():
            for key, t in state.items():
                assert torch.equal(a.optimizer_state[name][key], t), (name, key)


def test_the_analysis_equals_the_unsharded_runs(sharded: Path, original_ds: Any) -> None:
    ds = trajscope.analyze(sharded, write=False, progress=False, **SETTLED)
    assert list(ds.data_vars) == list(original_ds.data_vars)
    for name in original_ds.data_vars:
        np.testing.assert_array_equal(ds[name].values, original_ds[name].values, err_msg=name)


def test_a_sharded_run_validates(sharded: Path) -> None:
    for quick in (False, True):
        report = validate_run(sharded, quick=quick)
        assert report.problems == [] and report.warnings == []


def test_identity_covers_the_parts_and_disk_bytes_count_them(two_ranks: Path, tmp_path: Path) -> None:
    run_dir = copy_run(two_ranks, tmp_path / "run")
    run = open_run(run_dir)
    before = run.identities(run.steps)
    assert all(before.values())
    files = [f for d in (fmt.STEPS_DIR, fmt.SHARDS_DIR) for f in (run_dir / d).iterdir()]
    assert run.storage.disk_bytes() == sum(f.stat().st_size for f in files)
    part = part_file(run_dir, 3, 1)
    os.utime(part, ns=(1, 1))  # the same bytes, rewritten: the step's identity changes
    after = run.identities(run.steps)
    assert after[3] != before[3] and {s: v for s, v in after.items() if s != 3} == {
        s: v for s, v in before.items() if s != 3}
    part.write_bytes(part.read_bytes()[:-4])
    assert run.identities([3]) == {3: None}
    part.unlink()
    assert run.identities([3]) == {3: None}


def _edit_part(run: Path, rank: int, fn: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> None:
    """Edit step 3's part of ``rank`` (0: the step file): its tensors and its metadata."""
    rewrite_snapshot(step_file(run, 3) if rank == 0 else part_file(run, 3, rank), fn)


def _box(run: Path, rank: int, key: str, **box: Any) -> None:
    _edit_part(run, rank, lambda t, m: m["shard"]["boxes"][key].update(box))


W = "param/fc1.weight"  # 24 x 10: rows 0-11 in rank 0's part, 12-23 in rank 1's

# Each damage of step 3, and the one line that reports it: (file named, expected message after it).
DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "gap": (lambda r: _edit_part(r, 1, lambda t, m: t.update({W: t[W][:10].clone()})), "step",
            f"{W}: elements 220..239 of 240 are in no part (parts of ranks 0, 1)"),
    "two gaps": (lambda r: [_edit_part(r, rank, lambda t, m: t.update({W: t[W][:10].clone()})) for rank in (0, 1)],
                 "step", f"{W}: elements 100..119 of 240 are in no part, and 20 more after them (parts of ranks 0, 1)"),
    "overlap": (lambda r: _box(r, 1, W, offset=[11, 0]), "part",
                f"{W}: element 110 of 240 is in the parts of ranks 0 and 1; expected every element in "
                "exactly one part"),
    "box outside its tensor": (lambda r: _box(r, 1, W, offset=[13, 0]), "part",
                               f"{W}: box at offset [13, 0] of extent [12, 10] lies outside the tensor's "
                               "shape [24, 10]"),
    "flat box of a 2-d piece": (lambda r: _box(r, 1, W, offset=None, flat=120), "part",
                                f"{W}: a flat box holds a 1-d piece, this one has shape [12, 10]"),
    "flat slice outside its tensor": (lambda r: _edit_part(r, 1, lambda t, m: (
        t.update({W: t[W].reshape(-1).clone()}), m["shard"]["boxes"][W].update(offset=None, flat=121))), "part",
        f"{W}: elements 121..240 of a tensor of 240 (shape [24, 10]): the box lies outside the tensor"),
    "another global shape": (lambda r: _box(r, 1, W, shape=[25, 10]), "part",
                             f"{W}: box of the tensor's shape [25, 10], expected [24, 10] (the part of rank 0)"),
    "dtype": (lambda r: _edit_part(r, 1, lambda t, m: t.update({W: t[W].double()})), "part",
              f"{W}: dtype float64, expected float32 (the part of rank 0)"),
    "missing part": (lambda r: part_file(r, 3, 1).unlink(), "part",
                     "missing (No such file or directory): the part of rank 1 of step 3, which {step} lists "
                     "in 'shards'"),
    "part of another step": (lambda r: shutil.copyfile(part_file(r, 4, 1), part_file(r, 3, 1)), "part",
                             "holds a part of step 4, expected step 3 (its name's); refusing to mix up steps"),
    "part of another rank": (lambda r: _edit_part(r, 1, lambda t, m: m["shard"].update(rank=2)), "part",
                             "'shard' names rank 2, expected rank 1 (its name's)"),
    "unboxed tensor in a part": (lambda r: _edit_part(r, 1, lambda t, m: t.update(extra=torch.zeros(2))), "part",
                                 "extra: a tensor that the part's 'shard' index does not box"),
    "boxed tensor the part lacks": (lambda r: _edit_part(r, 1, lambda t, m: t.pop(W)), "part",
                                    f"{W}: boxed in 'shard', but the file holds no such tensor"),
    "sharded and whole": (lambda r: _edit_part(r, 0, lambda t, m: m["shard"]["boxes"].pop(W)), "part",
                          f"{W}: boxed in the part of rank 1, but {{step}} holds it whole"),
    "truncated part": (lambda r: part_file(r, 3, 1).write_bytes(part_file(r, 3, 1).read_bytes()[:-8]), "part",
                       "tensor 'param/out.weight' needs bytes"),  # the last in the file
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_one_line_and_costs_only_its_step(damaged: Path, damage: str) -> None:
    make, culprit, message = DAMAGE[damage]
    make(damaged)
    step, part = step_file(damaged, 3), part_file(damaged, 3, 1)
    expected = f"{step if culprit == 'step' else part}: {message.format(step=step)}"
    with pytest.raises(RunFormatError) as exc:
        read_snapshot(step)
    assert str(exc.value).startswith(expected) and "\n" not in str(exc.value), str(exc.value)
    assert [p for p in validate_run(damaged).problems] == [str(exc.value)]
    with pytest.warns(DamagedRunWarning, match=r"skipped 2 of 6 pair\(s\)"):
        ds = trajscope.analyze(damaged, write=False, progress=False, **SETTLED)
    skipped = {d["step"]: d["reason"] for d in json.loads(ds.attrs["skipped_pairs"])}
    assert set(skipped) == {2, 3} and all(str(exc.value) in r for r in skipped.values()), skipped
    assert list(ds.step.values) == [0, 1, 4, 5]


def test_a_box_larger_than_the_files_is_refused_before_allocating(damaged: Path) -> None:
    _box(damaged, 0, W, shape=[10**9, 10])
    with pytest.raises(RunFormatError, match=r"step_00000003.safetensors: param/fc1.weight: a tensor of shape "
                       r"\[1000000000, 10\] \(40000000000 bytes\), larger than every file of the snapshot "
                       r"together \(\d+ bytes\): its parts cannot cover it$"):
        read_snapshot(step_file(damaged, 3))


def test_a_part_is_not_a_snapshot(two_ranks: Path) -> None:
    with pytest.raises(RunFormatError, match=r"step_00000003.rank_00001.safetensors: the part of rank 1 of a "
                       r"sharded snapshot, not a snapshot: read its step file, steps/step_00000003.safetensors$"):
        read_raw(part_file(two_ranks, 3, 1))


def test_malformed_shards_list_is_refused(damaged: Path) -> None:
    _edit_part(damaged, 0, lambda t, m: m.update(shards=[0, 1]))
    with pytest.raises(RunFormatError, match=r"snapshot 'shards' must be a list of distinct ranks >= 1 "
                       r"\(got \[0, 1\]\)$"):
        read_snapshot(step_file(damaged, 3))
