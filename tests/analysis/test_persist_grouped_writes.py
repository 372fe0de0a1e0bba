"""Grouped writes of persisted pairs (trajscope.analysis.persist).

Pairs finished within PERSIST_EVERY_S of the last write are written together: none is lost
when the analysis returns or fails, and a failed write fails the analysis naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import trajscope
import trajscope.analysis.persist as persist
import trajscope.analysis.tasks as tasks
from support.problems import classifier_run, make_mlp
from trajscope import cli

STEPS = 8


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classifier_run(tmp_path_factory.mktemp("writes") / "run", steps=STEPS)


@pytest.fixture
def run(recorded: Path, tmp_path: Path) -> Path:
    shutil.copytree(recorded, tmp_path / "run")
    return tmp_path / "run"


def persisted(run: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run / "analysis" / "pairs").glob("pair_*.safetensors"))


def on_disk_at_each_probe(run: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None
                          ) -> dict[int, list[int]]:
    """The pairs persisted when each pair's probe starts; the probe of ``fail_at`` is interrupted."""
    seen: dict[int, list[int]] = {}
    real = tasks.probe_pair

    def watching(objective, snap, nxt, settings, **kw):
        seen[snap.step] = persisted(run)
        if snap.step == fail_at:
            raise KeyboardInterrupt
        return real(objective, snap, nxt, settings, **kw)

    monkeypatch.setattr(tasks, "probe_pair", watching)
    return seen


@pytest.mark.parametrize("every", [0.0, 3600.0])
def test_pairs_are_written_within_the_interval_and_all_by_the_end(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 every: float) -> None:
    monkeypatch.setattr(persist, "PERSIST_EVERY_S", every)
    seen = on_disk_at_each_probe(run, monkeypatch)
    trajscope.analyze(run, make_mlp, progress=False)
    if every == 0.0:  # each pair is on disk before the next is probed
        assert all(seen[t] == list(range(t)) for t in range(STEPS))
    else:  # all held back until the analysis ends
        assert all(seen[t] == [] for t in range(STEPS))
    assert persisted(run) == list(range(STEPS))
    assert (run / "analysis" / "metrics.nc").is_file()


def test_pairs_finished_before_an_interrupt_are_written(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persist, "PERSIST_EVERY_S", 3600.0)
    seen = on_disk_at_each_probe(run, monkeypatch, fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        trajscope.analyze(run, make_mlp, progress=False)
    assert seen[5] == [] and persisted(run) == [0, 1, 2, 3, 4]
    assert not (run / "analysis" / "metrics.nc").exists()
    assert not list((run / "analysis" / "pairs").glob(".*.tmp-*"))


def test_without_a_group_for_the_directory_a_write_is_immediate(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a worker process, which has no group: what it finished is on disk when it returns."""
    monkeypatch.setattr(persist, "PERSIST_EVERY_S", 3600.0)
    written: list[str] = []
    with persist.grouped_writes(tmp_path / "other"):  # another analysis's group, not this directory's
        persist.later(tmp_path / "pairs", lambda: written.append("now"))
        assert written == ["now"]
        persist.later(tmp_path / "other", lambda: written.append("grouped"))
        assert written == ["now"]
    assert written == ["now", "grouped"]


@pytest.mark.parametrize("every", [0.0, 3600.0])
def test_a_failed_write_fails_the_analysis_naming_the_file(run: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], every: float) -> None:
    monkeypatch.setattr(persist, "PERSIST_EVERY_S", every)
    real = tasks.save_pair
    full = persist.pair_path(run / "analysis" / "pairs", 3)

    def disk_full(path, stats, digest):
        if Path(path) == full:
            raise OSError(28, "No space left on device", str(path))
        real(path, stats, digest)

    monkeypatch.setattr(tasks, "save_pair", disk_full)
    with pytest.raises(OSError, match="No space left on device") as e:
        trajscope.analyze(run, make_mlp, progress=False)
    assert e.value.filename == str(full)
    assert not (run / "analysis" / "metrics.nc").exists()
    assert 3 not in persisted(run) and {0, 1, 2} <= set(persisted(run))

    with pytest.raises(SystemExit) as exit_:
        cli.main(["analyze", str(run), "--objective", "support.problems:make_mlp", "--force"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == f"trajscope: error: {full}: No space left on device"
