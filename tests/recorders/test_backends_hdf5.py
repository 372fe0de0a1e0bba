"""The HDF5 storage as the recorder writes it (trajscope.recorders.backends.hdf5, hdf5_io) and as it is read
back: layout, exact low-precision dtypes, reading while training, direct (O_DIRECT) writes.

Conversion between the formats: tests/tools/test_convert.py; a full disk: tests/system/test_hdf5_disk_full.py."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from support.recorder_objectives import (
    batches,
    dataset,
    make_mlp,
    mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    train_sgd,
    xent,
)
from support.recording import record
from support.rundirs import assert_same_stored_steps
from trajscope import runformat as fmt
from trajscope.errors import RunFormatError
from trajscope.recorders import Recorder
from trajscope.store import open_run, read_snapshot


def _train_lowp(run_dir: Path, dtype: torch.dtype, format: str) -> None:
    model = mlp().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    record(run_dir, model, opt, xent, [(x[idx].to(dtype), y[idx]) for idx in batches(3)], format=format)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_stored_exactly_as_uint16_with_a_dtype_attribute(tmp_path: Path,
                                                                          dtype: torch.dtype) -> None:
    _train_lowp(tmp_path / "h5", dtype, "hdf5")
    _train_lowp(tmp_path / "st", dtype, "safetensors")
    assert_same_stored_steps(tmp_path / "h5", tmp_path / "st")
    name = str(dtype).removeprefix("torch.")
    with h5py.File(tmp_path / "h5" / fmt.HDF5_FILE, "r", swmr=True) as f:
        d = f["param/0.weight"]
        assert d.dtype == np.uint16 and d.attrs["dtype"] == name
        assert d.shape == (4, 16, 8) and d.chunks == (1, 16, 8)
        assert list(f["index/step"][:]) == [0, 1, 2, 3]
        # a plain h5py user gets the exact bits back through the uint16 view
        bits = torch.from_numpy(d[1].view(np.int16)).view(dtype)
    snap = open_run(tmp_path / "st").snapshot(1)
    assert torch.equal(bits, snap.params["0.weight"]) and bits.dtype == dtype


def test_hdf5_layout_is_readable_with_plain_h5py(tmp_path: Path) -> None:
    train_sgd(tmp_path / "run", steps=4, recorder_kwargs={"format": "hdf5", "every": 3})
    run = open_run(tmp_path / "run")
    assert run.storage.kind == "hdf5" and run.steps == [0, 1, 3, 4]
    assert not (tmp_path / "run" / "steps").exists()
    with h5py.File(tmp_path / "run" / fmt.HDF5_FILE, "r", swmr=True) as f:
        steps = list(f["index/step"][:])
        assert steps == [0, 1, 3, 4]
        row = steps.index(3)
        m0, ml = f["index/meta"][row]
        meta = json.loads(bytes(f["meta"][m0 : m0 + ml]))
        assert meta["step"] == 3 and meta["kind"] == "step"
        assert sorted(meta["hdf5"]["rows"]) == sorted(
            [f"param/{n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias")]
            + [f"grad/{n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias")])
        # the minibatch is in the blob, located by the row's table of contents
        dtype, shape, off, n = meta["hdf5"]["blob"]["batch/0"]
        b0, _ = f["index/blob"][row]
        x = np.frombuffer(bytes(f["blob"][b0 + off : b0 + off + n]), dtype=np.float32).reshape(shape)
        assert dtype == "float32" and shape == [32, 8]
        np.testing.assert_array_equal(x, run.snapshot(3).batch[0].numpy())
        np.testing.assert_array_equal(f["param/2.bias"][row], run.snapshot(3).params["2.bias"].numpy())
    assert read_snapshot(run.step_path(3)).step == 3
    assert str(run.step_path(3)).endswith("trajectory.h5/step_00000003")
    with pytest.raises(RunFormatError, match="step 2 is not stored in this file"):
        read_snapshot(tmp_path / "run" / fmt.HDF5_FILE / fmt.step_name(2))


def test_hdf5_run_can_be_read_while_training_writes_it(tmp_path: Path) -> None:
    obj = make_mlp()
    model = obj.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    seen = []
    with Recorder(tmp_path / "run", model, opt, format="hdf5", async_write=False) as rec:
        for idx in batches(4):
            opt.zero_grad()
            loss = xent(model, (x[idx], y[idx]))
            loss.backward()
            rec.batch((x[idx], y[idx]), loss=loss)
            opt.step()
            run = open_run(tmp_path / "run")  # SWMR: a second reader while the file is open
            seen.append(run.steps)
            assert run.status == "recording"
            run.snapshot(run.steps[-1])
    assert seen == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert open_run(tmp_path / "run").steps == [0, 1, 2, 3, 4]


def test_scalar_parameter_and_buffers_round_trip(tmp_path: Path) -> None:
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.temperature = torch.nn.Parameter(torch.tensor(2.0))
            self.bn = torch.nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.lin(x)) / self.temperature

    for fmt_name in ("hdf5", "safetensors"):
        torch.manual_seed(0)
        model = Scaled()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Recorder(tmp_path / fmt_name, model, opt, format=fmt_name) as rec:
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(4, 3)).pow(2).mean().backward()
                rec.batch(torch.zeros(1))
                opt.step()
    assert_same_stored_steps(tmp_path / "hdf5", tmp_path / "safetensors")
    snap = open_run(tmp_path / "hdf5").snapshot(1)
    assert snap.params["temperature"].shape == () and snap.grads["temperature"].shape == ()
    assert snap.buffers["bn.num_batches_tracked"].dtype == torch.int64
    with h5py.File(tmp_path / "hdf5" / fmt.HDF5_FILE, "r", swmr=True) as f:
        assert f["param/temperature"].shape == (3,)
        assert f["buffer/bn.running_mean"].shape == (3, 2)


def test_a_row_referenced_before_the_live_recording_appended_more_still_resolves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Process pools give pair tasks file references made earlier by the driver. An HDF5
    container grows while a run is recorded; rows already written never change, so a reference
    to one stays valid (a safetensors step file that changes is refused: test_parallel)."""
    import trajscope.analysis.loading as snapshots

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    refs = {}
    with Recorder(tmp_path / "run", model, opt, format="hdf5", async_write=False) as rec:
        for i, idx in enumerate(batches(5)):
            opt.zero_grad()
            loss = xent(model, (x[idx], y[idx]))
            loss.backward()
            rec.batch((x[idx], y[idx]), loss=loss)
            opt.step()
            if i == 2:
                run = open_run(tmp_path / "run")
                refs = {s: snapshots.SnapshotRef.of(run.storage, s) for s in (0, 1)}
                want = {s: run.snapshot(s) for s in (0, 1)}
    assert (tmp_path / "run" / fmt.HDF5_FILE).stat().st_size > refs[1].stat[1]  # it grew
    monkeypatch.setattr(snapshots, "_recent", type(snapshots._recent)())
    for s, ref in refs.items():
        got = snapshots.resolved(ref)
        assert got.step == s
        assert all(torch.equal(got.params[k], want[s].params[k]) for k in want[s].params)


def _train_large(run_dir: Path, steps: int = 3) -> None:
    """Rows large enough for the O_DIRECT path: a 128 KiB weight (one aligned chunk per row), a
    400-byte weight and odd-sized biases (through HDF5), a 300 KiB minibatch (a blob region of
    more than one blob chunk)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Tanh(), torch.nn.Linear(256, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    draws = ((torch.randn(600, 128, generator=g), torch.randint(0, 3, (600,), generator=g)) for _ in range(steps))
    record(run_dir, model, opt, xent, draws, format="hdf5")


def test_large_rows_written_directly_equal_rows_written_through_hdf5(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _train_large(tmp_path / "direct")
    with h5py.File(tmp_path / "direct" / fmt.HDF5_FILE, "r", swmr=True) as f:
        d = f["param/0.weight"]
        assert d.shape[0] == 4
        for r in range(4):  # the rows this writer wrote with O_DIRECT (where the filesystem allows)
            assert d.id.get_chunk_info_by_coord((r, 0, 0)).byte_offset % 4096 == 0
        b0s = [int(b0) for b0, n in f["index/blob"][:] if n >= 1 << 18]
        assert len(b0s) == 3 and all(b0 % (1 << 18) == 0 for b0 in b0s)  # blob chunk boundaries
    with monkeypatch.context() as m:
        m.delattr(os, "O_DIRECT", raising=False)  # no O_DIRECT: every write goes through HDF5
        _train_large(tmp_path / "buffered")
    assert_same_stored_steps(tmp_path / "direct", tmp_path / "buffered")


def test_a_filesystem_refusing_the_direct_write_falls_back_to_hdf5(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _train_large(tmp_path / "want")
    real, calls = os.pwrite, []

    def refuse(fd: int, data: object, offset: int) -> int:
        calls.append(offset)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", refuse)
    _train_large(tmp_path / "got")
    monkeypatch.setattr(os, "pwrite", real)
    assert len(calls) <= 1  # refused once, then never tried again
    assert_same_stored_steps(tmp_path / "want", tmp_path / "got")


def test_an_aligned_slot_places_every_large_tensor_at_a_multiple_of_the_alignment() -> None:
    from trajscope.recorders.storage import SlotPool, build_image

    pool = SlotPool(1)
    pool.align_tensors(4096)
    tensors = [("param/w", torch.arange(3000, dtype=torch.float32)), ("param/b", torch.ones(3)),
               ("batch/0", torch.arange(1500, dtype=torch.int64)), ("x", torch.zeros(5, dtype=torch.bool)),
               ("param/v", torch.arange(1024, dtype=torch.float16))]
    image = build_image(pool.acquire(), 2, fmt.KIND_STEP, {"step": 2}, tensors)
    assert image.header_len == 0 and image.slot.array.ctypes.data % 4096 == 0
    for e in image.entries:
        if e.end - e.begin >= 4096:
            assert e.begin % 4096 == 0, e.key
        assert torch.equal(image.tensor(e), dict(tensors)[e.key]), e.key
    spans = sorted((e.begin, e.end) for e in image.entries)
    assert all(a[1] <= b[0] for a, b in zip(spans[:-1], spans[1:], strict=True)) and image.size == spans[-1][1]
