"""What trajscope writes stays inside the run directory (trajscope.confine).

A symlink planted at any path that a command creates, replaces or removes (pointing at a file, a
directory, nothing, or the same path in another run) must not make the command change anything
outside the run: the command either replaces the link itself (an atomic rename over it, or the
removal of a leftover temporary name) or fails with one line naming the path. This holds for
``analyze``, ``convert`` (both directions), ``report`` and the recorder (planted before recording,
over a run it overwrites, and while it records); ``summary`` and ``validate`` write nothing at
all, wherever links are planted. A FIFO or a hard link at the lock file, and a run still marked
``recording``, are refused the same way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import trajscope
from support.recording import train_steps
from support.rundirs import cli, copy_run, edit_manifest, fingerprint, no_hang, quad_run
from trajscope import runformat as fmt
from trajscope.errors import RunFormatError, TrajscopeError
from trajscope.report import page as report_mod
from trajscope.report.figures import FIGURES
from trajscope.runformat import RECORDING_LOCK, recorder_alive
from trajscope.tools.convert import convert_run

TARGETS = ("file", "dir", "dangling", "other_run")


def tmp_name(rel: str) -> str:
    """The temporary sibling a file is written to before it is renamed to ``rel`` (by this process)."""
    p = Path(rel)
    return str(p.with_name(f".{p.name}.tmp-{os.getpid()}"))


ANALYZE_PATHS = ("analysis", "analysis/.lock", "analysis/pairs", "analysis/metrics.nc",
                 "analysis/pairs/pair_00000000.safetensors", tmp_name("analysis/metrics.nc"),
                 tmp_name("analysis/pairs/pair_00000000.safetensors"))
CONVERT_PATHS = {
    "safetensors": ("trajectory.h5", ".trajectory.h5.converting", "steps", "trajscope.json",
                    tmp_name("trajscope.json")),
    "hdf5": ("steps", ".steps.converting", "trajectory.h5", "trajscope.json", tmp_name("trajscope.json")),
}
FIGURE = f"report/{FIGURES[0].name}.png"
REPORT_PATHS = ("report", "report/index.html", FIGURE, tmp_name("report/index.html"), tmp_name(FIGURE))
STEP_FILE = "steps/step_00000001.safetensors"
RECORDER_PATHS = ("trajscope.json", "scalars.jsonl", "steps", STEP_FILE, tmp_name(STEP_FILE),
                  "trajectory.h5", RECORDING_LOCK, tmp_name("trajscope.json"))
OVERWRITE_PATHS = (*RECORDER_PATHS, "analysis", "report")  # overwrite=True removes these too
REPLACED = {"trajscope.json", STEP_FILE}  # written by a rename over whatever is there
"""Of the recorder's paths, those where a planted link is replaced rather than refused (temporary
names aside: a link there is removed)."""


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


def _area(tmp_path: Path, base: Path, run: Path | None = None) -> tuple[Path, Path]:
    """``outside/`` (a file, a directory) and ``runs/other`` (a victim run, a copy of ``base``) next
    to ``runs/run``: a copy of ``base`` too, unless ``run`` is given (left to the caller)."""
    (tmp_path / "outside" / "dir").mkdir(parents=True)
    (tmp_path / "outside" / "victim.txt").write_text("precious")
    (tmp_path / "outside" / "dir" / "f.txt").write_text("precious too")
    (tmp_path / "runs").mkdir()
    copy_run(base, tmp_path / "runs" / "other")
    return tmp_path, run if run is not None else copy_run(base, tmp_path / "runs" / "run")


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
    else:  # the link itself was replaced by a regular file or directory, or removed
        assert not planted.is_symlink()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rel", ANALYZE_PATHS)
def test_analyze_writes_only_inside_the_run(analyzed: Path, tmp_path: Path, rel: str, target: str,
                                            capsys) -> None:
    area, run = _area(tmp_path, analyzed)
    _plant(area, run / rel, target)
    before = fingerprint(area, exclude=run)
    # one pair and one metric: every file is written all the same (pair file, Dataset, lock)
    code, _, err = cli(["analyze", str(run), "-q", "--dtype", "float64", "--force", "--steps", "0:1",
                        "--metrics", "grad_norm"], capsys)
    _check(area, run, run / rel, before, code, err)
    if rel in ("analysis", "analysis/.lock", "analysis/pairs"):
        assert code == 1 and "is a symlink" in err
    else:
        assert code == 0, err


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
    if rel == tmp_name("trajscope.json"):  # removed when the manifest is written
        assert code == 0, err
    elif rel == "trajscope.json":  # read through the link (the other run's reads), then replaced
        assert code == (0 if target == "other_run" else 1), err
    else:  # the storage it writes is refused; the one it reads and removes may fail to read first
        assert code == 1
        if rel == CONVERT_PATHS[storage][0] or rel.endswith(".converting"):
            assert "is a symlink" in err


@pytest.fixture(scope="module")
def loaded(analyzed: Path) -> dict:
    return report_mod.load_runs(analyzed)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rel", REPORT_PATHS)
def test_report_writes_only_inside_the_run(analyzed: Path, loaded: dict, tmp_path: Path, rel: str,
                                           target: str, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    # What is written is the point here: the Datasets are read once, and one figure (the one
    # planted at) is drawn.
    monkeypatch.setattr(report_mod, "load_runs", lambda runs, analysis=None: loaded)
    monkeypatch.setattr(report_mod, "FIGURES", FIGURES[:1])
    area, run = _area(tmp_path, analyzed)
    _plant(area, run / rel, target)
    before = fingerprint(area, exclude=run)
    code, _, err = cli(["report", str(run)], capsys)
    _check(area, run, run / rel, before, code, err)
    if rel == "report":
        assert code == 1 and "is a symlink" in err
    else:
        assert code == 0, err
        assert (run / "report" / "index.html").is_file() and (run / FIGURE).is_file()


# --- commands that only read --------------------------------------------------------------------------

_DIRS = ("analysis", "analysis/pairs", "report", "steps", ".steps.converting")
_ALL = sorted({*ANALYZE_PATHS, *REPORT_PATHS, *RECORDER_PATHS, "analysis", "report",
               *(r for rels in CONVERT_PATHS.values() for r in rels)})
_INPUTS = ("analysis/metrics.nc", "trajscope.json", "scalars.jsonl", STEP_FILE)
READ_ONLY_GROUPS = {
    # every file any command writes, but the inputs: the command reads the run as usual
    "files": tuple(r for r in _ALL if r not in _DIRS and r not in _INPUTS),
    "inputs": _INPUTS,  # what summary and validate read, read through the links
    # a link at analysis/ puts every path written under it (analysis/pairs/ included) behind it
    "dirs": ("analysis", "report", "steps", ".steps.converting"),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("group", READ_ONLY_GROUPS)
@pytest.mark.parametrize("command", ["summary", "validate"])
def test_summary_and_validate_write_nothing(analyzed: Path, tmp_path: Path, command: str, group: str,
                                            target: str, capsys) -> None:
    area, run = _area(tmp_path, analyzed)
    planted = [run / rel for rel in READ_ONLY_GROUPS[group]]
    for at in planted:
        _plant(area, at, target)
    before = fingerprint(area)  # the run itself included
    code, out, err = cli([command, str(run)], capsys)
    assert fingerprint(area) == before, f"{command} changed something"
    assert code in (0, 1) and "Traceback" not in err, err
    if code and err:  # validate reports problems on stdout, a refusal is one line on stderr
        assert len(err.strip().splitlines()) == 1 and any(f"{p}" in err for p in planted), err
    if group == "files":
        assert code == 0, out + err  # links where it does not read change nothing for it


# --- the recorder --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run recorded by :func:`_record`, with an HDF5 file next to its ``steps/``: every path the
    recorder writes exists in it (the "other run" a link may point into)."""
    run = tmp_path_factory.mktemp("recorded") / "run"
    assert _record(run, "safetensors") is None
    h5 = tmp_path_factory.mktemp("recorded_h5") / "run"
    assert _record(h5, "hdf5") is None
    shutil.copy(h5 / fmt.HDF5_FILE, run / fmt.HDF5_FILE)
    return run


def _mean_square(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


def _record(run: Path, storage: str, *, overwrite: bool = False,
            during: Callable[[], None] | None = None) -> str | None:
    """Record 3 steps of a tiny model into ``run`` (``during`` is called once the first step is
    written); the message of the trajscope error it raised, or None."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with trajscope.Recorder(run, model, opt, format=storage, overwrite=overwrite, async_write=False) as rec:
            train_steps(rec, model, opt, _mean_square, [torch.randn(4, 2)])
            if during is not None:
                during()
            train_steps(rec, model, opt, _mean_square, (torch.randn(4, 2) for _ in range(2)))
    except TrajscopeError as exc:
        return str(exc)
    return None


def _storage(rel: str) -> str:
    return "hdf5" if rel == fmt.HDF5_FILE else "safetensors"


def _check_recorder(area: Path, run: Path, planted: Path, before: dict, error: str | None,
                    *, refused: bool) -> None:
    assert fingerprint(area, exclude=run) == before, f"{planted}: something outside the run changed"
    assert not (area / "outside" / "nothing").exists()
    if refused:
        assert error is not None and str(planted) in error and "is a symlink" in error, error
    if error is not None:
        assert str(planted) in error and "\n" not in error, error


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rel", RECORDER_PATHS)
def test_recorder_into_a_directory_with_planted_links(recorded: Path, tmp_path: Path, rel: str,
                                                      target: str) -> None:
    run = tmp_path / "runs" / "run"
    area, _ = _area(tmp_path, recorded, run)
    run.mkdir()
    _plant(area, run / rel, target)
    before = fingerprint(area, exclude=run)
    error = _record(run, _storage(rel))
    refused = rel in ("trajscope.json", "scalars.jsonl", "steps", "trajectory.h5", RECORDING_LOCK)
    _check_recorder(area, run, run / rel, before, error, refused=refused)
    if not refused:  # replaced by the rename, or removed (a temporary name)
        assert error is None and not (run / rel).is_symlink()
        assert trajscope.open_run(run).status == fmt.STATUS_COMPLETE


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rel", OVERWRITE_PATHS)
def test_recorder_overwriting_a_run_with_planted_links(recorded: Path, tmp_path: Path, rel: str,
                                                       target: str) -> None:
    area, run = _area(tmp_path, recorded)
    _plant(area, run / rel, target)
    before = fingerprint(area, exclude=run)
    error = _record(run, _storage(rel), overwrite=True)
    # the old steps/ (and the links in it) are removed; a link at the manifest's temporary name
    # is removed when the manifest is written
    refused = rel not in (STEP_FILE, tmp_name(STEP_FILE), tmp_name("trajscope.json"))
    _check_recorder(area, run, run / rel, before, error, refused=refused)
    if not refused:
        assert error is None and not (run / rel).is_symlink()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rel", RECORDER_PATHS)
def test_recorder_with_links_planted_while_it_records(recorded: Path, tmp_path: Path, rel: str,
                                                      target: str) -> None:
    run = tmp_path / "runs" / "run"
    area, _ = _area(tmp_path, recorded, run)
    before: dict = {}

    def plant() -> None:
        _plant(area, run / rel, target)
        before.update(fingerprint(area, exclude=run))

    error = _record(run, _storage(rel), during=plant)
    _check_recorder(area, run, run / rel, before, error, refused=False)
    # files it holds open are written through their descriptors, the manifest and step files are
    # renamed over the links; only a vanished steps/ stops it (its next step file cannot be made)
    assert (error is not None) == (rel == "steps"), error
    if rel in REPLACED or ".tmp-" in rel:
        assert not (run / rel).is_symlink()


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
    train_steps(rec, model, opt, _mean_square, (torch.randn(4, 2) for _ in range(2)))
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
