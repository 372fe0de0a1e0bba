"""``trajscope convert`` (trajscope.tools.convert): a run rewritten in the other storage format holds the same
bytes, in place or into a new directory, and analyzes the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import trajscope
from support.recorder_objectives import (
    make_mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    train_sgd,
)
from support.rundirs import assert_same_stored_steps
from trajscope import runformat as fmt
from trajscope.cli import main
from trajscope.errors import RunFormatError
from trajscope.store.run import open_run
from trajscope.tools.convert import convert_run


def test_convert_round_trip_is_bit_exact_and_analyzes_the_same(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    train_sgd(tmp_path / "st", steps=4)
    main(["convert", str(tmp_path / "st"), "--to", "hdf5", "--out", str(tmp_path / "h5")])
    assert "stored as hdf5" in capsys.readouterr().out
    assert open_run(tmp_path / "h5").storage.kind == "hdf5"
    assert sorted(p.name for p in (tmp_path / "h5").iterdir()) == [
        "scalars.jsonl", "trajectory.h5", "trajscope.json"]
    assert_same_stored_steps(tmp_path / "st", tmp_path / "h5")
    # in place, back to safetensors: the files are byte-identical to the recorder's
    convert_run(tmp_path / "h5", "safetensors")
    assert open_run(tmp_path / "h5").storage.kind == "safetensors"
    assert not (tmp_path / "h5" / fmt.HDF5_FILE).exists()
    for s in range(5):
        name = fmt.step_filename(s)
        assert (tmp_path / "h5" / "steps" / name).read_bytes() == (tmp_path / "st" / "steps" / name).read_bytes()
    convert_run(tmp_path / "h5", "hdf5", keep=True)
    assert (tmp_path / "h5" / "steps").is_dir() and (tmp_path / "h5" / fmt.HDF5_FILE).exists()
    a = trajscope.analyze(tmp_path / "st", make_mlp, progress=False, points=3, margin=0.0)
    b = trajscope.analyze(tmp_path / "h5", make_mlp, progress=False, points=3, margin=0.0)
    for name in ("loss_line", "grad_norm", "update_norm", "inst_gap", "grad_replay_error"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path / "st"), "--to", "hdf5", "--out", str(tmp_path / "h5")])
    assert exc.value.code == 1
    assert "already exists and is not an empty directory" in capsys.readouterr().err


def test_a_sharded_run_converts_to_a_whole_one(tmp_path: Path) -> None:
    """Either format, in place or to a copy: the snapshots come out whole, as the recorder wrote them
    in one process (the safetensors files byte for byte), the manifest says format version 2 and keeps
    how the run was trained (``distributed``), and no shards/ remains."""
    import json

    from support.rundirs import copy_run
    from support.sharded import shard_run

    original = tmp_path / "original"
    train_sgd(original, steps=4)
    sharded = shard_run(copy_run(original, tmp_path / "sharded"))
    distributed = json.loads((sharded / fmt.MANIFEST).read_text())["distributed"]

    def assert_whole(run: Path, storage: str) -> None:
        manifest = json.loads((run / fmt.MANIFEST).read_text())
        assert manifest["storage"] == storage and manifest["format_version"] == fmt.FORMAT_VERSION
        assert manifest["distributed"] == distributed
        assert not (run / fmt.SHARDS_DIR).exists()
        assert_same_stored_steps(original, run)

    for to in ("safetensors", "hdf5"):
        assert_whole(convert_run(sharded, to, out=tmp_path / f"copy-{to}"), to)
    assert (sharded / fmt.SHARDS_DIR).is_dir()  # a copy leaves the run as it is
    with pytest.raises(RunFormatError, match=r"--keep: a sharded run converted to safetensors in place is "
                       r"rewritten in steps/ itself, so its old storage cannot be kept; convert a copy with --out"):
        convert_run(sharded, "safetensors", keep=True)
    in_place = copy_run(sharded, tmp_path / "in-place")
    assert_whole(convert_run(sharded, "safetensors"), "safetensors")
    for s in range(5):
        name = fmt.step_filename(s)
        assert (sharded / "steps" / name).read_bytes() == (original / "steps" / name).read_bytes()
    assert_whole(convert_run(in_place, "hdf5"), "hdf5")
    assert not (in_place / fmt.STEPS_DIR).exists()
    assert "snapshots stored whole (converted)" in open_run(in_place).describe()
