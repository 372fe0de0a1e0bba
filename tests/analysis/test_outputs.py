"""Where an analysis is written and read (trajscope.analysis.outputs).

A run directory that cannot be written (a shared dataset, a mounted snapshot) is analyzed with
``--out DIR``: the numbers are those of an analysis inside a writable copy, the run is left
byte for byte as it was, and every reader (``open_metrics``, ``summary``, ``report``) takes the
same DIR. Without ``--out`` such a run fails at once with one line that suggests it.

The run is made read-only with a real ``chmod``. Root writes through a mode of 0o555 anyway, so
as root ``os.access`` (what trajscope asks before writing) is replaced by one that reads the mode
bits as they would bind any other user; the fingerprints then still show that nothing was written.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import xarray as xr

import trajscope
from support.rundirs import cli, copy_run, fingerprint, quad_run
from trajscope.analysis import outputs
from trajscope.errors import AnalysisError, RunFormatError

ANALYZE = ["-q", "--dtype", "float64", "--points", "5", "--margin", "0.25"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quad_run(tmp_path_factory.mktemp("rec") / "run", steps=4)


@pytest.fixture(scope="module")
def reference(recorded: Path, tmp_path_factory: pytest.TempPathFactory) -> xr.Dataset:
    """The analysis of a writable copy, written where it always is (RUN/analysis)."""
    run = copy_run(recorded, tmp_path_factory.mktemp("ref") / "run")
    trajscope.analyze(run, dtype="float64", points=5, margin=0.25, progress=False)
    return trajscope.open_metrics(run)


def _chmod_tree(root: Path, writable: bool) -> None:
    for dirpath, _, filenames in os.walk(root):
        for p in [Path(dirpath), *(Path(dirpath) / f for f in filenames)]:
            mode = p.stat().st_mode
            p.chmod(mode | stat.S_IWUSR if writable else mode & ~0o222)


@pytest.fixture
def readonly(recorded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the recorded run with an earlier analysis in it, every entry without write bits."""
    run = copy_run(recorded, tmp_path / "shared" / "run")
    trajscope.analyze(run, dtype="float64", points=3, margin=0.0, progress=False)
    _chmod_tree(run, writable=False)
    if os.geteuid() == 0:
        def access(path: str | os.PathLike[str], mode: int) -> bool:
            return not mode & os.W_OK or bool(os.stat(path).st_mode & 0o222)

        monkeypatch.setattr(outputs.os, "access", access)
    yield run
    _chmod_tree(run, writable=True)  # so that pytest can remove it


def _same_numbers(ds: xr.Dataset, ref: xr.Dataset) -> None:
    assert sorted(ds.data_vars) == sorted(ref.data_vars)
    xr.testing.assert_equal(ds, ref)  # values, coords and dims exactly; attrs hold paths and times


def test_readonly_run_is_analyzed_into_out(readonly: Path, reference: xr.Dataset, tmp_path: Path,
                                          capsys) -> None:
    out = tmp_path / "mine" / "run-analysis"  # parents are created
    before = fingerprint(readonly)
    code, stdout, err = cli(["analyze", str(readonly), "--out", str(out), *ANALYZE], capsys)
    assert code == 0 and err == "", err
    assert fingerprint(readonly) == before
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.nc", "pairs"]
    _same_numbers(trajscope.open_metrics(readonly, analysis=out), reference)
    expected = json.dumps(trajscope.summarize(reference), sort_keys=True)
    assert json.dumps(trajscope.summarize(readonly, analysis=out), sort_keys=True) == expected
    code, text, err = cli(["summary", str(readonly), "--json", "--analysis", str(out)], capsys)
    assert code == 0 and err == "" and json.dumps(json.loads(text), sort_keys=True) == expected, err
    code, text, err = cli(["report", str(readonly), "--analysis", str(out), "--out", str(tmp_path / "rep")],
                          capsys)
    assert code == 0 and (tmp_path / "rep" / "index.html").is_file(), err
    assert fingerprint(readonly) == before


def test_a_second_analysis_into_out_reuses_its_pairs(readonly: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli(["analyze", str(readonly), "--out", str(out), *ANALYZE], capsys)[0] == 0
    pairs = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "pairs").iterdir()}
    assert sum(name.startswith("pair_") for name in pairs) == 4  # and each pair's reference part
    assert cli(["analyze", str(readonly), "--out", str(out), *ANALYZE], capsys)[0] == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "pairs").iterdir()} == pairs


def test_readonly_run_without_out_fails_with_one_line(readonly: Path, capsys) -> None:
    before = fingerprint(readonly)
    code, _, err = cli(["analyze", str(readonly), *ANALYZE], capsys)
    analysis = readonly / "analysis"
    assert code == 1 and err == (
        f"trajscope: error: {analysis}: not writable, so the analysis cannot be written to {analysis}; "
        "pass --out DIR (analyze(..., out=DIR)) to write it elsewhere\n")
    code, _, err = cli(["report", str(readonly)], capsys)
    report = readonly / "report"
    assert code == 1 and err == (
        f"trajscope: error: {readonly}: not writable, so the report cannot be written to {report}; "
        "pass --out DIR (write_report(..., out=DIR))\n")
    # reading the analysis already inside the run needs no write
    code, text, err = cli(["summary", str(readonly), "--json"], capsys)
    assert code == 0 and err == "" and json.loads(text)["pairs"] == 4, err
    assert fingerprint(readonly) == before


def test_run_without_analysis_dir_names_the_run(recorded: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_run(recorded, tmp_path / "run")
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != run)
    with pytest.raises(AnalysisError) as e:
        trajscope.analyze(run, progress=False)
    assert str(e.value) == (f"{run}: not writable, so the analysis cannot be written to "
                            f"{run / 'analysis'}; pass --out DIR (analyze(..., out=DIR)) to write it elsewhere")
    assert not (run / "analysis").exists()


def test_two_runs_into_one_out_never_share_pairs(tmp_path: Path) -> None:
    """The same settings and objective, another run: the pairs already in DIR are not reused."""
    a = quad_run(tmp_path / "a", steps=4)
    b = quad_run(tmp_path / "b", steps=4, lr=0.05)
    b_own = trajscope.analyze(b, dtype="float64", write=False, progress=False)
    out = tmp_path / "shared-out"
    trajscope.analyze(a, dtype="float64", out=out, progress=False)
    (out / "metrics.nc").unlink()  # what a killed analysis leaves: a's pairs, no Dataset naming a
    into_out = trajscope.analyze(b, dtype="float64", out=out, progress=False)
    xr.testing.assert_equal(into_out, b_own)
    xr.testing.assert_equal(trajscope.open_metrics(b, analysis=out), b_own)


def test_out_is_confined(recorded: Path, tmp_path: Path, capsys) -> None:
    run = copy_run(recorded, tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "pairs").symlink_to(tmp_path / "elsewhere")
    code, _, err = cli(["analyze", str(run), "--out", str(out), *ANALYZE], capsys)
    assert code == 1 and err == (f"trajscope: error: {out / 'pairs'}: is a symlink; trajscope writes only "
                                 "inside the run (or analysis) directory and will not follow it (remove "
                                 "the link)\n")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_out_arguments_are_checked(recorded: Path, tmp_path: Path) -> None:
    run = copy_run(recorded, tmp_path / "run")
    with pytest.raises(AnalysisError) as e:
        trajscope.analyze(run, out=run, progress=False)
    assert str(e.value) == (f"out={str(run)!r}: is a run directory; name a directory of its own for "
                            "the analysis (it receives metrics.nc and pairs/)")
    with pytest.raises(AnalysisError) as e:
        trajscope.analyze(run, out=tmp_path / "o", write=False, progress=False)
    assert str(e.value) == f"out={str(tmp_path / 'o')!r}: given with write=False, which writes nothing"
    with pytest.raises(RunFormatError) as e:
        trajscope.open_metrics(run, analysis=tmp_path / "o")
    assert str(e.value) == (f"{tmp_path / 'o' / 'metrics.nc'}: no analysis found; run "
                            f"`trajscope analyze {run} --out {tmp_path / 'o'}` first")
    with pytest.raises(AnalysisError) as e:
        trajscope.open_metrics([run, run], analysis=tmp_path / "o")
    assert str(e.value) == "analysis: expected one directory per run (2 run(s), 1 directory)"
