"""What trajscope writes stays inside the run directory.

A symlink planted at any path that ``analyze``, ``convert`` or ``report`` creates, replaces or
removes (pointing at a file, a directory, nothing, or another run) must not make the command
change anything outside the run: the command either replaces the link itself (an atomic rename
over it) or fails with one line naming the path. A FIFO or a hard link at the lock file, and a
run still marked ``recording``, are refused the same way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from runkit import cli, copy_run, edit_manifest, fingerprint, no_hang, quad_run

import trajscope
from trajscope import format as fmt
from trajscope.convert import convert_run
from trajscope.errors import RunFormatError
from trajscope.figures import FIGURES
from trajscope.recorders.rundir import RECORDING_LOCK, recorder_alive

TARGETS = ("file", "dir", "dangling", "other_run")


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = quad_run(tmp_path_factory.mktemp("base") / "run", steps=3)
    trajscope.analyze(run, dtype="float64", progress=False)
    return run


@pytest.fixture(scope="module")
def analyzed_h5(analyzed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("h5") / "run"
    convert_run(analyzed, "hdf5", out=out)
    return out


def _area(tmp_path: Path, base: Path) -> tuple[Path, Path]:
    """``outside/`` (a file, a directory) and ``runs/other`` (a victim run) next to ``runs/run``."""
    (tmp_path / "outside" / "dir").mkdir(parents=True)
    (tmp_path / "outside" / "victim.txt").write_text("precious")
    (tmp_path / "outside" / "dir" / "f.txt").write_text("precious too")
    (tmp_path / "runs").mkdir()
    copy_run(base, tmp_path / "runs" / "other")
    return tmp_path, copy_run(base, tmp_path / "runs" / "run")


def _plant(area: Path, at: Path, target: str) -> None:
    """A symlink at ``at`` to a file, a directory, nothing, or the same path in the other run."""
    at.parent.mkdir(parents=True, exist_ok=True)
    if at.is_dir() and not at.is_symlink():
        shutil.rmtree(at)
    else:
        at.unlink(missing_ok=True)
    other = area / "runs" / "other" / at.relative_to(area / "runs" / "run")
    dest = {"file": area / "outside" / "victim.txt", "dir": area / "outside" / "dir",
            "dangling": area / "outside" / "nothing", "other_run": other}[target]
    at.symlink_to(dest)


def _check(area: Path, run: Path, planted: Path, before: dict, code: int, err: str) -> None:
    assert fingerprint(area, exclude=run) == before, f"{planted}: something outside the run changed"
    assert not (area / "outside" / "nothing").exists()
    if code != 0:
        assert code == 1 and f"{planted}" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    else:  # the link itself was replaced by a regular file or directory
        assert not planted.is_symlink()


ANALYZE_PATHS = ("analysis", "analysis/.lock", "analysis/pairs", "analysis/metrics.nc",
                 "analysis/pairs/pair_00000000.safetensors")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rel", ANALYZE_PATHS)
def test_analyze_writes_only_inside_the_run(analyzed: Path, tmp_path: Path, rel: str, target: str,
                                            capsys) -> None:
    area, run = _area(tmp_path, analyzed)
    _plant(area, run / rel, target)
    before = fingerprint(area, exclude=run)
    code, _, err = cli(["analyze", str(run), "-q", "--dtype", "float64", "--force"], capsys)
    _check(area, run, run / rel, before, code, err)
    if rel in ("analysis", "analysis/.lock", "analysis/pairs"):
        assert code == 1 and "is a symlink" in err


CONVERT_PATHS = {
    "safetensors": ("trajectory.h5", ".trajectory.h5.converting", "steps", "trajscope.json"),
    "hdf5": ("steps", ".steps.converting", "trajectory.h5", "trajscope.json"),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("storage", "rel"), [(s, r) for s, rels in CONVERT_PATHS.items() for r in rels])
def test_convert_writes_only_inside_the_run(analyzed: Path, analyzed_h5: Path, tmp_path: Path,
                                            storage: str, rel: str, target: str, capsys) -> None:
    area, run = _area(tmp_path, analyzed if storage == "safetensors" else analyzed_h5)
    _plant(area, run / rel, target)
    before = fingerprint(area, exclude=run)
    to = "hdf5" if storage == "safetensors" else "safetensors"
    code, _, err = cli(["convert", str(run), "--to", to], capsys)
    _check(area, run, run / rel, before, code, err)
    if rel != "trajscope.json":  # the manifest is read through a link, and replaced
        assert code == 1
    if rel == CONVERT_PATHS[storage][0] or rel.endswith(".converting"):  # what convert writes
        assert "is a symlink" in err


REPORT_PATHS = ("report", "report/index.html", f"report/{FIGURES[0].name}.png")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rel", REPORT_PATHS)
def test_report_writes_only_inside_the_run(analyzed: Path, tmp_path: Path, rel: str, target: str,
                                           capsys) -> None:
    area, run = _area(tmp_path, analyzed)
    _plant(area, run / rel, target)
    before = fingerprint(area, exclude=run)
    code, _, err = cli(["report", str(run)], capsys)
    _check(area, run, run / rel, before, code, err)
    if rel == "report":
        assert code == 1 and "is a symlink" in err
    else:
        assert code == 0 and (run / rel).is_file()


# --- the lock file ----------------------------------------------------------------------------------


def test_fifo_lock_is_named_not_sought(analyzed: Path, tmp_path: Path, capsys) -> None:
    _, run = _area(tmp_path, analyzed)
    (run / "analysis" / ".lock").unlink(missing_ok=True)
    os.mkfifo(run / "analysis" / ".lock")
    with no_hang(20):
        code, _, err = cli(["analyze", str(run), "-q", "--dtype", "float64"], capsys)
    assert code == 1 and f"{run / 'analysis' / '.lock'}: expected a regular file" in err


def test_hard_linked_lock_is_refused_and_its_target_kept(analyzed: Path, tmp_path: Path) -> None:
    area, run = _area(tmp_path, analyzed)
    lock = run / "analysis" / ".lock"
    lock.unlink(missing_ok=True)
    os.link(area / "outside" / "victim.txt", lock)
    with pytest.raises(RunFormatError, match=r"\.lock: has 2 hard links"):
        trajscope.analyze(run, dtype="float64", progress=False)
    assert (area / "outside" / "victim.txt").read_text() == "precious"


def test_lock_is_released_and_reused(analyzed: Path, tmp_path: Path) -> None:
    _, run = _area(tmp_path, analyzed)
    for _ in range(2):
        trajscope.analyze(run, dtype="float64", progress=False, force=True)
    assert (run / "analysis" / ".lock").is_file()


# --- a run that is still being recorded --------------------------------------------------------------


def test_convert_refuses_a_recording_run_unless_forced(analyzed: Path, tmp_path: Path, capsys) -> None:
    """A run marked ``recording`` with no recording lock to test (recorded without one)."""
    _, run = _area(tmp_path, analyzed)
    edit_manifest(run, lambda m: m.update(status=fmt.STATUS_RECORDING, final_step=None))
    (run / RECORDING_LOCK).unlink(missing_ok=True)
    steps = sorted(p.name for p in (run / "steps").iterdir())
    code, _, err = cli(["convert", str(run), "--to", "hdf5"], capsys)
    assert code == 1 and "trajscope.json: status is 'recording'" in err and "--force" in err
    assert sorted(p.name for p in (run / "steps").iterdir()) == steps  # untouched
    assert not (run / "trajectory.h5").exists()
    code, _, err = cli(["convert", str(run), "--to", "hdf5", "--force"], capsys)
    assert code == 0, err
    assert trajscope.open_run(run).storage.kind == "hdf5"


def test_convert_copy_of_a_recording_run_is_allowed(analyzed: Path, tmp_path: Path) -> None:
    _, run = _area(tmp_path, analyzed)
    edit_manifest(run, lambda m: m.update(status=fmt.STATUS_RECORDING, final_step=None))
    out = convert_run(run, "hdf5", out=tmp_path / "copy")
    assert trajscope.open_run(out).steps == trajscope.open_run(run).steps
    assert (run / "steps").is_dir()


def test_convert_refuses_a_run_whose_recorder_is_alive_even_forced(tmp_path: Path, capsys) -> None:
    import torch

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = trajscope.Recorder(tmp_path / "run", model, opt).start()
    for _ in range(2):
        x = torch.randn(4, 2)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        rec.batch(x, loss=loss)
        opt.step()
    rec.flush()
    assert recorder_alive(tmp_path / "run") is True
    for force in ([], ["--force"]):
        code, _, err = cli(["convert", str(tmp_path / "run"), "--to", "hdf5", *force], capsys)
        assert code == 1 and ".recording.lock: the run is being recorded" in err, err
    assert (tmp_path / "run" / "steps").is_dir()
    rec.close()
    assert recorder_alive(tmp_path / "run") is False
    assert trajscope.open_run(tmp_path / "run").status == fmt.STATUS_COMPLETE
    code, _, err = cli(["convert", str(tmp_path / "run"), "--to", "hdf5"], capsys)
    assert code == 0, err


def test_convert_takes_a_run_whose_recorder_died(analyzed: Path, tmp_path: Path, capsys) -> None:
    """Marked ``recording`` but nobody holds its lock (the recorder was killed): no --force needed."""
    _, run = _area(tmp_path, analyzed)
    edit_manifest(run, lambda m: m.update(status=fmt.STATUS_RECORDING, final_step=None))
    assert recorder_alive(run) is False
    code, _, err = cli(["convert", str(run), "--to", "hdf5"], capsys)
    assert code == 0, err
    assert trajscope.open_run(run).storage.kind == "hdf5"
