"""Hostile HDF5 runs: a FIFO at ``trajectory.h5``, objects inside it that lead out of the file
(external and soft links, external storage, virtual datasets, some of them pointing at a FIFO),
datasets and byte regions that declare far more than the file holds, and leftover temporary
files. trajscope must never block, never read anything outside the file, never allocate what a
declaration asks for before checking it, and say what is wrong in one line naming the object."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import trajscope
from support.problems import make_quadratic
from support.rundirs import cli, copy_run, edit_manifest, memory_cap, no_hang, quad_run
from trajscope import runformat as fmt
from trajscope.errors import RunFormatError
from trajscope.store import open_run, read_snapshot
from trajscope.tools.validate import validate_run

ROWS = 4  # 3 recorded steps and the final state
H5_FAKE = 42.0  # the value of every tensor kept outside the run


@pytest.fixture(scope="module")
def h5_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quad_run(tmp_path_factory.mktemp("h5base") / "run", steps=3, format="hdf5")


@pytest.fixture(scope="module")
def st_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quad_run(tmp_path_factory.mktemp("stbase") / "run", steps=3)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the run: an HDF5 file whose ``/x`` holds :data:`H5_FAKE`, and a FIFO."""
    d = tmp_path / "outside"
    d.mkdir()
    with h5py.File(d / "outside.h5", "w") as f:
        f.create_dataset("x", data=np.full((ROWS, 6), H5_FAKE))
        f["x"].attrs["dtype"] = "float64"
        f.create_dataset("raw", data=np.full((ROWS, 6), H5_FAKE))  # the bytes external storage reads
    os.mkfifo(d / "fifo")
    return d


@pytest.fixture
def run_dir(h5_base: Path, tmp_path: Path) -> Path:
    return copy_run(h5_base, tmp_path / "runs" / "run")


def edit_h5(run_dir: Path, fn: Callable[[Any], None]) -> None:
    """Open the run's ``trajectory.h5`` for writing and let ``fn`` change it."""
    with h5py.File(run_dir / fmt.HDF5_FILE, "r+", libver="latest") as f:
        fn(f)


def replace(f: Any, key: str, make: Callable[[], Any]) -> None:
    """Put ``make()`` (a link, or a function creating the object itself) at ``key``."""
    del f[key]
    obj = make()
    if obj is not None:
        f[key] = obj


def set_row_meta(f: Any, row: int, fn: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite row ``row``'s JSON metadata (appended to ``meta``, ``index/meta`` pointed at it)."""
    m0, ml = (int(v) for v in f["index/meta"][row])
    meta = json.loads(bytes(f["meta"][m0 : m0 + ml]))
    fn(meta)
    raw = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    end = f["meta"].shape[0]
    f["meta"].resize((end + len(raw),))
    f["meta"][end:] = raw
    f["index/meta"][row] = (end, len(raw))


def analysis_refuses(run_dir: Path, key: str) -> None:
    """Analyzing ``run_dir`` fails within 30 s, every pair skipped because of the object ``key``:
    nothing kept outside the run is read."""
    with no_hang(30), pytest.raises(RunFormatError, match=rf"all 3 pair\(s\) were skipped .*'{key}'"):
        trajscope.analyze(run_dir, make_quadratic, dtype="float64", write=False, progress=False)


# --- non-regular files and objects that lead out of the file --------------------------------------


def test_fifo_at_trajectory_h5_fails_fast(run_dir: Path, capsys) -> None:
    h5 = run_dir / fmt.HDF5_FILE
    h5.unlink()
    os.mkfifo(h5)
    expected = rf"{h5}: expected a regular file \(HDF5 file\), found a FIFO"
    with no_hang(10):
        with pytest.raises(RunFormatError, match=expected):
            open_run(run_dir)
        with pytest.raises(RunFormatError, match=expected):
            read_snapshot(h5 / "step_00000000")
        report = validate_run(run_dir)
        assert not report.ok and any("found a FIFO" in p for p in report.problems)
        for command in (["info"], ["validate"], ["analyze", "--dtype", "float64"]):
            code, out, err = cli([*command, str(run_dir)], capsys)
            assert code != 0, command
            assert "found a FIFO" in out + err, command
        assert cli(["analyze", str(run_dir)], capsys)[2].strip().count("\n") == 0  # one line


def test_directory_at_trajectory_h5_is_refused(run_dir: Path) -> None:
    h5 = run_dir / fmt.HDF5_FILE
    h5.unlink()
    h5.mkdir()
    with pytest.raises(RunFormatError, match=r"trajectory.h5: expected a regular file .* found a directory"):
        open_run(run_dir)


LINKS = {
    "external link to a FIFO": lambda out: h5py.ExternalLink(str(out / "fifo"), "/x"),
    "external link to a file outside the run": lambda out: h5py.ExternalLink(str(out / "outside.h5"), "/x"),
    "relative external link": lambda out: h5py.ExternalLink("../../outside/outside.h5", "/x"),
    "soft link": lambda out: h5py.SoftLink("/grad/x"),
}


@pytest.mark.parametrize("how", list(LINKS))
@pytest.mark.parametrize("key", ["param/x", "param"])
def test_link_in_a_row_path_is_refused_before_reading(run_dir: Path, outside: Path, how: str,
                                                      key: str) -> None:
    edit_h5(run_dir, lambda f: replace(f, key, lambda: LINKS[how](outside)))
    kind = "soft" if how == "soft link" else "external"
    expected = rf"trajectory.h5/step_00000000: '{key}' is an? {kind} link"
    with no_hang(10):
        run = open_run(run_dir)  # the index is intact: the run opens
        with pytest.raises(RunFormatError, match=expected):
            run.snapshot(0)
        with pytest.raises(RunFormatError, match=expected):
            read_snapshot(run.step_path(0))
        report = validate_run(run_dir)
    assert not report.ok
    assert sum(f"'{key}' is a" in p for p in report.problems) == ROWS


@pytest.mark.parametrize("key", ["index/step", "index", "meta", "blob"])
def test_link_at_the_index_or_a_byte_dataset_is_refused(run_dir: Path, outside: Path, key: str) -> None:
    edit_h5(run_dir, lambda f: replace(f, key, lambda: h5py.ExternalLink(str(outside / "fifo"), "/x")))
    with no_hang(10):
        if key.startswith("index"):
            with pytest.raises(RunFormatError, match=rf"trajectory.h5: '{key}' is an external link"):
                open_run(run_dir)
        else:
            with pytest.raises(RunFormatError, match=rf"'{key}' is an external link"):
                open_run(run_dir).snapshot(0)
        assert not validate_run(run_dir).ok


def test_external_link_to_outside_values_is_a_problem_and_never_read(run_dir: Path, outside: Path,
                                                                      capsys) -> None:
    edit_h5(run_dir, lambda f: replace(f, "param/x", lambda: LINKS["external link to a file outside "
                                                                 "the run"](outside)))
    report = validate_run(run_dir)
    assert not report.ok
    assert any("'param/x' is an external link" in p and "outside.h5" in p for p in report.problems)
    code, out, _ = cli(["validate", str(run_dir)], capsys)
    assert code == 1 and "problem: " in out
    analysis_refuses(run_dir, "param/x")


def external_storage(f: Any, target: Path, offset: int = 0) -> None:
    """``param/x`` as a dataset whose bytes lie in ``target`` (HDF5 external storage)."""
    d = f.create_dataset("param/x", shape=(ROWS, 6), dtype="<f8",
                         external=[(str(target), offset, h5py.h5f.UNLIMITED)])
    d.attrs["dtype"] = "float64"


def virtual(f: Any, source: Path) -> None:
    """``param/x`` as a virtual dataset mapping ``source``'s ``/x``."""
    layout = h5py.VirtualLayout(shape=(ROWS, 6), dtype="<f8")
    layout[:] = h5py.VirtualSource(str(source), "x", shape=(ROWS, 6))
    f.create_virtual_dataset("param/x", layout, fillvalue=H5_FAKE)
    f["param/x"].attrs["dtype"] = "float64"


def outside_raw_offset(outside: Path) -> int:
    with h5py.File(outside / "outside.h5", "r") as g:
        return int(g["raw"].id.get_offset())


@pytest.mark.parametrize("how", ["external storage in a FIFO", "external storage in a file outside",
                                 "virtual dataset of a FIFO", "virtual dataset of a file outside"])
def test_dataset_stored_outside_the_file_is_refused(run_dir: Path, outside: Path, how: str) -> None:
    target = outside / ("fifo" if "FIFO" in how else "outside.h5")
    if how.startswith("external"):
        offset = 0 if "FIFO" in how else outside_raw_offset(outside)
        edit_h5(run_dir, lambda f: replace(f, "param/x", lambda: external_storage(f, target, offset)))
        expected = r"'param/x' keeps its data in another file \(external storage: .*\)"
    else:
        edit_h5(run_dir, lambda f: replace(f, "param/x", lambda: virtual(f, target)))
        expected = r"'param/x' is a virtual dataset"
    with no_hang(10):
        run = open_run(run_dir)
        with pytest.raises(RunFormatError, match=expected):
            run.snapshot(1)
        report = validate_run(run_dir)
    assert sum("'param/x'" in p for p in report.problems) == ROWS
    if "outside" in how:
        analysis_refuses(run_dir, "param/x")


# --- declarations bounded before anything is allocated --------------------------------------------

HUGE_ROW = 3_600_000_000  # float64 elements: a 28.8 GB row


def huge_param(f: Any, key: str = "param/x") -> None:
    """``key`` declaring 28.8 GB rows, none written: the file stays small."""
    d = f.create_dataset(key, shape=(ROWS, HUGE_ROW), maxshape=(None, HUGE_ROW), dtype="<f8",
                         chunks=(1, 1 << 20))
    d.attrs["dtype"] = "float64"


def test_dataset_shape_is_checked_against_the_manifest_before_reading(run_dir: Path) -> None:
    edit_h5(run_dir, lambda f: replace(f, "param/x", lambda: huge_param(f)))
    with no_hang(20), memory_cap():
        with pytest.raises(RunFormatError, match=r"step_00000000: dataset 'param/x' has rows of shape "
                                                 rf"\[{HUGE_ROW}\], the manifest declares \[6\]"):
            open_run(run_dir).snapshot(0)
        assert not validate_run(run_dir).ok


def test_row_larger_than_the_file_is_refused(run_dir: Path) -> None:
    def plant(f: Any) -> None:
        for key in ("param/x", "grad/x"):
            replace(f, key, lambda: huge_param(f, key))  # called at once: key is this iteration's

    edit_h5(run_dir, plant)
    edit_manifest(run_dir, lambda m: m["params"][0].update(shape=[HUGE_ROW]))
    with no_hang(20), memory_cap():
        with pytest.raises(RunFormatError, match=r"dataset '(param|grad)/x': a row is 28800000000 bytes, "
                                                 r"more than the file holds \(\d+ bytes\)"):
            open_run(run_dir).snapshot(0)


def _lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` with seed 0: HDF5's metadata checksum."""
    mask = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    def word(i: int) -> int:
        return int.from_bytes(data[i : i + 4].ljust(4, b"\0"), "little")

    a = b = c = (0xDEADBEEF + len(data)) & mask
    i, n = 0, len(data)
    while n > 12:
        a, b, c = (a + word(i)) & mask, (b + word(i + 4)) & mask, (c + word(i + 8)) & mask
        for x, y, k, z in ((0, 2, 4, 1), (1, 0, 6, 2), (2, 1, 8, 0), (0, 2, 16, 1), (1, 0, 19, 2), (2, 1, 4, 0)):
            v = [a, b, c]
            v[x] = ((v[x] - v[y]) & mask) ^ rot(v[y], k)
            v[y] = (v[y] + v[z]) & mask
            a, b, c = v
        i, n = i + 12, n - 12
    if n == 0:
        return c
    a, b, c = (a + word(i)) & mask, (b + word(i + 4)) & mask, (c + word(i + 8)) & mask
    for x, y, k in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24)):
        v = [a, b, c]
        v[x] = (v[x] ^ v[y]) - rot(v[y], k) & mask
        a, b, c = v
    return c


def claim_end_of_file(path: Path, eof: int) -> None:
    """Make the superblock (version 2 or 3, at offset 0) of the HDF5 file ``path`` claim that the
    file ends at ``eof``, its checksum recomputed: SWMR readers open it without checking."""
    with open(path, "r+b") as fh:
        head = bytearray(fh.read(48))
        assert head[:8] == b"\x89HDF\r\n\x1a\n" and head[8] in (2, 3) and head[9] == 8
        assert _lookup3(bytes(head[:44])) == int.from_bytes(head[44:48], "little")
        head[28:36] = eof.to_bytes(8, "little")
        head[44:48] = _lookup3(bytes(head[:44])).to_bytes(4, "little")
        fh.seek(0)
        fh.write(head)


def test_rows_are_bounded_by_the_size_on_disk_not_the_size_claimed(run_dir: Path) -> None:
    def plant(f: Any) -> None:
        for key in ("param/x", "grad/x"):
            replace(f, key, lambda: huge_param(f, key))  # called at once: key is this iteration's

    edit_h5(run_dir, plant)
    edit_manifest(run_dir, lambda m: m["params"][0].update(shape=[HUGE_ROW]))
    claim_end_of_file(run_dir / fmt.HDF5_FILE, 1 << 40)
    with h5py.File(run_dir / fmt.HDF5_FILE, "r", libver="latest", swmr=True) as f:
        assert f.id.get_filesize() == 1 << 40
    size = (run_dir / fmt.HDF5_FILE).stat().st_size
    with no_hang(20), memory_cap():
        with pytest.raises(RunFormatError, match=rf"a row is 28800000000 bytes, more than the file holds "
                                                 rf"\({size} bytes\)"):
            open_run(run_dir).snapshot(0)


def test_undeclared_dataset_named_by_a_row_is_refused(run_dir: Path) -> None:
    def plant(f: Any) -> None:
        f.create_dataset("param/y", data=np.zeros((ROWS, 6)))
        f["param/y"].attrs["dtype"] = "float64"
        set_row_meta(f, 0, lambda m: m["hdf5"]["rows"].append("param/y"))

    edit_h5(run_dir, plant)
    with pytest.raises(RunFormatError, match=r"dataset 'param/y' is not a parameter, gradient or buffer "
                                             r"the manifest declares"):
        open_run(run_dir).snapshot(0)


def test_dataset_dtype_must_match_its_dtype_attribute(run_dir: Path) -> None:
    def plant(f: Any) -> None:
        f.create_dataset("param/x2", data=np.zeros((ROWS, 6), dtype=">f8"))
        del f["param/x"]
        f.move("param/x2", "param/x")
        f["param/x"].attrs["dtype"] = "float64"

    edit_h5(run_dir, plant)
    with pytest.raises(RunFormatError, match=r"dataset 'param/x' stores >f8, expected <f8 for float64"):
        open_run(run_dir).snapshot(0)


def test_compressed_chunks_larger_than_the_file_are_refused(run_dir: Path) -> None:
    """HDF5 decompresses a whole chunk for any read of it: a 96 MiB chunk of zeros compresses to
    a few hundred KiB, and reading one 48-byte row would allocate all of it."""
    def plant(f: Any) -> None:
        data = np.asarray(f["param/x"][:])
        del f["param/x"]
        f.create_dataset("param/x", data=data, maxshape=(None, 6), chunks=(1 << 21, 6), compression="gzip")
        f["param/x"].attrs["dtype"] = "float64"

    edit_h5(run_dir, plant)
    assert (run_dir / fmt.HDF5_FILE).stat().st_size < 1 << 22
    with pytest.raises(RunFormatError, match=r"step_00000000: dataset 'param/x' is compressed in chunks of "
                                             r"100663296 bytes, more than the file holds"):
        open_run(run_dir).snapshot(0)


def test_blob_region_larger_than_the_file_is_refused(run_dir: Path) -> None:
    def plant(f: Any) -> None:
        data = np.asarray(f["blob"][:])  # a blob allocated late: resizing it writes nothing
        del f["blob"]
        f.create_dataset("blob", data=data, maxshape=(None,), chunks=(1 << 18,))
        f["blob"].resize((64 << 30,))
        f["index/blob"][0] = (0, 64 << 30)

    edit_h5(run_dir, plant)
    with no_hang(20), memory_cap():
        with pytest.raises(RunFormatError, match=r"step_00000000: the row's blob region \(68719476736 bytes "
                                                 r"at 0\) is larger than the file \(\d+ bytes\)"):
            open_run(run_dir).snapshot(0)


def test_blob_region_outside_the_blob_is_refused(run_dir: Path) -> None:
    edit_h5(run_dir, lambda f: f["index/blob"].__setitem__(1, (10**6, 16)))
    with pytest.raises(RunFormatError, match=r"step_00000001: the row's blob region \(16 bytes at 1000000\) "
                                             r"lies outside 'blob'"):
        open_run(run_dir).snapshot(1)


def test_blob_entry_shape_is_checked_before_allocating(run_dir: Path) -> None:
    def plant(f: Any) -> None:
        set_row_meta(f, 0, lambda m: m["hdf5"]["blob"].update({"batch/0": ["float64", [10**5, 10**5], 0, 0]}))

    edit_h5(run_dir, plant)
    with no_hang(20), memory_cap():
        with pytest.raises(RunFormatError, match=r"blob entry 'batch/0' is malformed \(shape \[100000, 100000\] "
                                                 r"of float64 is 80000000000 bytes, the entry says 0\)"):
            open_run(run_dir).snapshot(0)


def test_index_declaring_more_rows_than_the_file_holds_is_refused(run_dir: Path) -> None:
    def plant(f: Any) -> None:
        for key in ("index/step", "index/meta", "index/blob"):
            f[key].resize(10**10, axis=0)

    edit_h5(run_dir, plant)
    with no_hang(20), memory_cap():
        with pytest.raises(RunFormatError, match=r"trajectory.h5: 'index/step' declares 10000000000 rows "
                                                 r"\(80000000000 bytes\), more than the file holds"):
            open_run(run_dir)
        assert not validate_run(run_dir).ok


def test_metadata_region_larger_than_the_file_is_refused(run_dir: Path) -> None:
    def plant(f: Any) -> None:
        f["meta"].resize((1 << 36,))
        f["index/meta"][2] = (0, 1 << 36)

    edit_h5(run_dir, plant)
    with no_hang(20), memory_cap():
        with pytest.raises(RunFormatError, match=r"step_00000002: the row's metadata region \(68719476736 "
                                                 r"bytes at 0\) is larger than the file"):
            open_run(run_dir).snapshot(2)


def test_index_of_the_wrong_shape_is_refused(run_dir: Path) -> None:
    def plant(f: Any) -> None:
        del f["index/meta"]
        f.create_dataset("index/meta", shape=(ROWS, 10**9), dtype="<i8", chunks=(1, 1 << 16))

    edit_h5(run_dir, plant)
    with no_hang(20), memory_cap():
        with pytest.raises(RunFormatError, match=r"trajectory.h5: 'index/meta' has shape \(4, 1000000000\) of <i8, "
                                                 r"expected \(rows, 2\) integers"):
            open_run(run_dir)


@pytest.mark.parametrize("name", ["a/b", "a/b/c", "λ/数据 x"])
def test_parameter_names_holding_slashes_still_read(tmp_path: Path, name: str) -> None:
    """Datasets are looked up one link at a time, as HDF5 resolves a path: a parameter whose name
    holds ``/`` (its dataset sits in nested groups) reads back as it was recorded."""
    import torch

    from support.recording import record

    model = torch.nn.Module()
    model.register_parameter(name, torch.nn.Parameter(torch.arange(3.0)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(m: torch.nn.Module, b: torch.Tensor) -> torch.Tensor:
        return (getattr(m, name) * b).sum()

    record(tmp_path / "run", model, opt, loss, iter([torch.ones(3)] * 2), format="hdf5")
    assert validate_run(tmp_path / "run").ok
    assert open_run(tmp_path / "run").snapshot(0).params[name].tolist() == [0.0, 1.0, 2.0]


# --- leftover temporary files ---------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["safetensors", "hdf5"])
def test_leftover_temporary_files_are_listed_without_failing(st_base: Path, h5_base: Path, tmp_path: Path,
                                                              storage: str, capsys) -> None:
    run_dir = copy_run(h5_base if storage == "hdf5" else st_base, tmp_path / "run")
    leftovers = [run_dir / ".trajscope.json.tmp-4242", run_dir / f".{fmt.HDF5_FILE}.converting"]
    if storage == "safetensors":
        leftovers.append(run_dir / "steps" / ".step_00000001.safetensors.tmp-4242")
    for p in leftovers:
        p.write_bytes(b"partial")
    report = validate_run(run_dir)
    assert report.ok, report.problems
    for p in leftovers:
        assert sum(str(p) in w and "may be deleted" in w for w in report.warnings) == 1, (p, report.warnings)
    code, out, _ = cli(["validate", str(run_dir)], capsys)
    assert code == 0 and out.splitlines()[-1] == f"ok: no damage, {len(leftovers)} warnings"


def test_leftover_manifest_temporary_is_listed_when_the_run_does_not_open(st_base: Path,
                                                                          tmp_path: Path) -> None:
    run_dir = copy_run(st_base, tmp_path / "run")
    (run_dir / fmt.MANIFEST).write_text("{")
    (run_dir / ".trajscope.json.tmp-77").write_text("{}")
    report = validate_run(run_dir)
    assert not report.ok
    assert any(".trajscope.json.tmp-77" in w and "may be deleted" in w for w in report.warnings)


@pytest.mark.parametrize("key", ["param/x", "param", "meta", "blob", "index/step"])
def test_snapshot_identities_follow_no_link(run_dir: Path, outside: Path, key: str) -> None:
    """The cheap identities that tie persisted pairs to their inputs read the file through the same
    checked helpers as the reader: an external link to a FIFO neither blocks nor is followed, and
    a step whose row cannot be identified has no identity, as a damaged one has none."""
    intact = open_run(run_dir).identities(range(ROWS))
    assert all(v is not None for v in intact.values())
    edit_h5(run_dir, lambda f: replace(f, key, lambda: h5py.ExternalLink(str(outside / "fifo"), "/x")))
    t0 = time.monotonic()
    with no_hang(10):  # a blocked open would be interrupted here, and its error swallowed: timed too
        try:
            got = open_run(run_dir).identities(range(ROWS))
        except RunFormatError:  # an index that leads outside: the run does not even open
            assert key.startswith("index")
            return
    assert time.monotonic() - t0 < 5
    assert all(v is None for v in got.values())
