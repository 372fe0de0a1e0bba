"""Golden bytes: the storage encoders write exactly the committed fixtures (``tests/fixtures/``).

A change of the on-disk encoding must be deliberate: regenerate the fixtures with
``python -m tests.fixtures.make`` and say why in the commit. The run is described in
:mod:`fixtures.make`; the CUDA RNG states are the only recorded field left out (machine-dependent).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from fixtures.make import (
    HDF5_JSON,
    SAFETENSORS_DIR,
    describe_hdf5,
    hdf5_versions,
    record,
    safetensors_files,
)
from trajscope import runformat as fmt
from trajscope.recorders import storage as storage_mod
from trajscope.recorders.backends import HDF5Writer, SafetensorsWriter
from trajscope.store.run import open_run


def _golden_safetensors() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(SAFETENSORS_DIR.iterdir())}


def _golden_hdf5() -> dict[str, Any]:
    content = json.loads(HDF5_JSON.read_text())
    content.pop("file")  # the raw-file pin, checked separately
    return content


def _safetensors_mismatch(run_dir: Path) -> list[str]:
    got, want = safetensors_files(run_dir), _golden_safetensors()
    if got.keys() != want.keys():
        return [f"files {sorted(got)} != {sorted(want)}"]
    return [name for name in want if got[name] != want[name]]


def _hdf5_mismatch(run_dir: Path) -> list[str]:
    got, want = describe_hdf5(run_dir / fmt.HDF5_FILE), _golden_hdf5()
    if got["attrs"] != want["attrs"]:
        return ["attrs"]
    if got["datasets"].keys() != want["datasets"].keys():
        return [f"datasets {sorted(got['datasets'])} != {sorted(want['datasets'])}"]
    return [k for k in want["datasets"] if got["datasets"][k] != want["datasets"][k]]


def test_safetensors_snapshots_are_the_golden_bytes(tmp_path: Path) -> None:
    run = record(tmp_path / "run", fmt.STORAGE_SAFETENSORS)
    assert _safetensors_mismatch(run) == []


def test_hdf5_datasets_and_attributes_are_the_golden_content(tmp_path: Path) -> None:
    run = record(tmp_path / "run", fmt.STORAGE_HDF5)
    assert _hdf5_mismatch(run) == []


def test_hdf5_file_bytes_are_pinned_for_the_library_versions_that_wrote_them(tmp_path: Path) -> None:
    """HDF5 writes the same bytes for the same content (no timestamps: h5py leaves dataset times
    off), but where its own metadata goes is up to the library version: the raw file is compared
    only under the h5py/HDF5 versions recorded with the fixture."""
    pin = json.loads(HDF5_JSON.read_text())["file"]
    versions = hdf5_versions()
    if {k: pin[k] for k in versions} != versions:
        pytest.skip(f"fixture written with {pin['h5py']}/{pin['hdf5']}, running {versions}")
    h5 = record(tmp_path / "run", fmt.STORAGE_HDF5) / fmt.HDF5_FILE
    assert hashlib.sha256(h5.read_bytes()).hexdigest() == pin["sha256"]


def test_the_golden_runs_read_back_as_recorded(tmp_path: Path) -> None:
    """The fixtures hold what the docstring of fixtures.make says (exact dyadic arithmetic)."""
    for storage in fmt.STORAGES:
        run = open_run(record(tmp_path / storage, storage))
        assert run.steps == [0, 1, 2] and run.final_step == 2
        s0, s1 = run.snapshot(0), run.snapshot(1)
        assert (s0.loss, s1.loss) == (1.5, -16.5)
        assert torch.equal(s0.grads["bias"], torch.tensor([2.0, 2.0]))
        assert list(s0.rng) == ["cpu"] and s1.rng == {}
        assert [t.dtype for t in s1.batch] == [torch.float32, torch.bool, torch.bfloat16, torch.int64,
                                               torch.float16]


def _flip_one_byte(writer: type[Any], at: Callable[[storage_mod.StepImage], int],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``writer`` write every image with one byte changed (a stand-in for an encoder bug)."""
    real = writer.write

    def write(self: Any, image: storage_mod.StepImage) -> Path:
        image.slot.array[at(image)] ^= 0x01
        return real(self, image)

    monkeypatch.setattr(writer, "write", write)


_POSITIONS: dict[str, Callable[[storage_mod.StepImage], int]] = {
    "header": lambda image: image.header_len - 1,  # the header's last padding byte
    "first data byte": lambda image: image.header_len,
    "last data byte": lambda image: image.size - 1,
}


@pytest.mark.parametrize("where", list(_POSITIONS))
def test_a_one_byte_change_of_the_safetensors_encoding_is_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    _flip_one_byte(SafetensorsWriter, _POSITIONS[where], monkeypatch)
    run = record(tmp_path / "run", fmt.STORAGE_SAFETENSORS)
    assert _safetensors_mismatch(run) == sorted(_golden_safetensors())


@pytest.mark.parametrize("where", ["first data byte", "last data byte"])
def test_a_one_byte_change_of_the_hdf5_encoding_is_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    # The HDF5 writer takes tensor bytes from the image (its header is rewritten as row metadata).
    _flip_one_byte(HDF5Writer, _POSITIONS[where], monkeypatch)
    run = record(tmp_path / "run", fmt.STORAGE_HDF5)
    assert _hdf5_mismatch(run) != []


# --- build_image against safetensors' own serializer -------------------------------------------------


def _parts(data: bytes) -> tuple[int, dict[str, Any], dict[str, tuple[str, list[int], bytes]], int]:
    """Everything the safetensors format defines in a file: header length, metadata, each tensor's
    dtype, shape and bytes, and the data section's length (no holes: it is the sum of the tensors)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    tensors = {k: (v["dtype"], v["shape"], body[v["data_offsets"][0] : v["data_offsets"][1]])
               for k, v in header.items() if k != "__metadata__"}
    return n, header.get("__metadata__"), tensors, len(body)


def _both(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[bytes, bytes]:
    image = storage_mod.build_image(storage_mod.Slot(), 3, fmt.KIND_STEP, meta, list(tensors.items()))
    ours = image.view().tobytes()
    theirs = safetensors.torch.save(
        tensors, metadata={"trajscope": json.dumps(meta, allow_nan=True, separators=(",", ":"))})
    return ours, theirs


_META = {"step": 3, "kind": "step", "lr": [0.1], "loss": float("nan"), "note": "é\u2028\"\\"}


def test_build_image_is_byte_identical_to_safetensors_save() -> None:
    """One dtype per element size (a float32 model and its batch): the same bytes, header padding
    included."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "param/w": torch.randn(4, 3, generator=g), "param/b": torch.randn(4, generator=g),
        "grad/w": torch.randn(4, 3, generator=g), "batch/0": torch.arange(5),
        "batch/1": torch.ones(2, 2, dtype=torch.bfloat16), "batch/2": torch.tensor([True, False, True]),
        "buffer/empty": torch.zeros(0), "buffer/scalar": torch.tensor(2.5),
    }
    ours, theirs = _both(tensors, _META)
    assert ours == theirs


def test_build_image_differs_from_safetensors_save_only_in_the_order_of_same_size_dtypes() -> None:
    """safetensors orders tensors by its dtype enum (descending), then name; trajscope by element
    size (descending), then key (``fmt.safetensors_layout``). Both are valid files (the format
    fixes no order); with two dtypes of one size the data sections are permutations of each other,
    and everything the format defines is equal."""
    tensors = {
        "a": torch.arange(3, dtype=torch.float64), "b": torch.arange(2, dtype=torch.int64),
        "c": torch.arange(4, dtype=torch.uint8), "d": torch.tensor([True, False]),
        "e": torch.ones(3, dtype=torch.float16), "f": torch.ones(1, dtype=torch.bfloat16),
        "g": torch.zeros(1, dtype=torch.float8_e5m2),
    }
    ours, theirs = _both(tensors, _META)
    assert ours != theirs
    assert _parts(ours) == _parts(theirs)
    for n, *_ in (_parts(ours), _parts(theirs)):
        assert (8 + n) % fmt.HEADER_ALIGN == 0
    order = [k for k in json.loads(ours[8 : 8 + _parts(ours)[0]]) if k != "__metadata__"]
    assert order == ["a", "b", "e", "f", "c", "d", "g"]
