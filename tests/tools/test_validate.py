"""``trajscope validate`` (trajscope.tools.validate), and damage is local: validate lists every problem
(exit 1 when there is one), and a
damaged or missing snapshot costs the analysis only the pairs that need it, which are reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import trajscope
from support.problems import make_quadratic
from support.rundirs import cli, copy_run, edit_manifest, quad_run, rewrite_snapshot, step_file
from support.sharded import shard_run
from trajscope import runformat as fmt
from trajscope.errors import DamagedRunWarning
from trajscope.objective import Objective
from trajscope.tools.validate import validate_run


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quad_run(tmp_path_factory.mktemp("base") / "run", steps=10)


@pytest.fixture(scope="module")
def intact(base_run: Path):
    return trajscope.analyze(base_run, make_quadratic, dtype="float64", write=False, progress=False)


@pytest.fixture
def run_dir(base_run: Path, tmp_path: Path) -> Path:
    return copy_run(base_run, tmp_path / "run")


# --- validate ------------------------------------------------------------------------------------


def test_clean_run_validates(run_dir: Path, capsys) -> None:
    report = validate_run(run_dir)
    assert report.ok and report.problems == [] and report.warnings == []
    code, out, err = cli(["validate", str(run_dir)], capsys)
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"{run_dir}: status complete, 11 snapshot(s) (0-10), 10 analyzable pair(s)", "ok"]


def damage_everything(run_dir: Path) -> list[tuple[str, str]]:
    """Several independent kinds of damage; returns (culprit, expected text) of each problem."""
    f1, f3, f4, f5, f6, f7 = (step_file(run_dir, s) for s in (1, 3, 4, 5, 6, 7))
    f1.write_bytes(f1.read_bytes()[:-5])  # truncated data
    data = bytearray(f3.read_bytes())
    data[9:14] = b"#####"  # corrupt header JSON
    f3.write_bytes(bytes(data))
    f4.unlink()  # a recorded step that went missing
    rewrite_snapshot(f5, lambda t, m: m.update(step=8))  # holds another step
    rewrite_snapshot(f6, lambda t, m: t.update({"param/x": torch.zeros(3, dtype=torch.float64)}))
    rewrite_snapshot(f7, lambda t, m: m.pop("batch_tree"))
    scalars = run_dir / "scalars.jsonl"
    lines = scalars.read_text().splitlines()
    lines[2] = "{not json"
    scalars.write_text("\n".join(lines) + "\n")
    (run_dir / "steps" / ".step_00000009.safetensors.tmp-4242").write_bytes(b"partial")
    (run_dir / "steps" / "notes.txt").write_text("hi")
    return [
        (str(f1), "the file is truncated"),
        (str(f3), "safetensors header is not valid JSON"),
        ("step 4", f"{f4} is missing although the run recorded it"),  # found without scalars.jsonl
        (str(f5), "file is named for step 5 but holds step 8"),
        (str(f6), "parameter 'x' has shape [3], manifest says [6]"),
        (str(f6), "gradient 'x' has shape [6], parameter has [3]"),
        (str(f7), "training step without its minibatch"),
        (f"{scalars}:3", "invalid JSON"),
    ]


def test_validate_lists_every_problem(run_dir: Path, capsys) -> None:
    expected = damage_everything(run_dir)
    report = validate_run(run_dir)
    assert not report.ok
    assert len(report.problems) == len(expected), report.problems
    for culprit, text in expected:
        assert any(culprit in p and text in p for p in report.problems), (culprit, report.problems)
    assert any("leftover temporary file" in w for w in report.warnings)
    assert any("notes.txt: unexpected file" in w for w in report.warnings)

    code, out, err = cli(["validate", str(run_dir)], capsys)
    assert code == 1 and err == ""
    lines = out.splitlines()
    assert sum(line.startswith("problem: ") for line in lines) == len(expected)
    assert lines[-1] == f"{len(expected)} problems found"


def test_damaged_manifest_still_checks_steps(run_dir: Path) -> None:
    (run_dir / "trajscope.json").write_text("{")
    f = step_file(run_dir, 2)
    f.write_bytes(f.read_bytes()[:30])
    report = validate_run(run_dir)
    assert len(report.problems) == 2
    assert "trajscope.json: invalid JSON" in report.problems[0]
    assert str(f) in report.problems[1]


def test_validate_quick_reads_headers_only(run_dir: Path) -> None:
    f = step_file(run_dir, 2)
    f.write_bytes(f.read_bytes()[:-1])
    rewrite_snapshot(step_file(run_dir, 3), lambda t, m: m.pop("batch_tree"))
    report = validate_run(run_dir, quick=True)
    assert len(report.problems) == 1 and str(f) in report.problems[0]  # the batch is not read


def test_validate_missing_directory(tmp_path: Path, capsys) -> None:
    code, out, err = cli(["validate", str(tmp_path / "nope")], capsys)
    assert code == 1
    assert f"problem: {tmp_path / 'nope'}: no such directory" in out.splitlines()


def test_validate_with_objective(run_dir: Path) -> None:
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = nn.Parameter(torch.zeros(7, dtype=torch.float64))

    report = validate_run(run_dir, objective=Objective(model=Other(), loss=lambda m, b: m.x.sum()))
    assert report.problems == [
        "objective: parameter 'x': recorded shape (6,), objective's model has (7,)"]
    assert validate_run(run_dir, objective="support.problems:make_quadratic").ok


def test_incomplete_run_is_a_warning_not_a_problem(run_dir: Path) -> None:
    edit_manifest(run_dir, lambda m: m.update(status="crashed", final_step=None))
    step_file(run_dir, 10).unlink()
    report = validate_run(run_dir)
    assert report.ok
    assert report.warnings == [f"{run_dir / 'trajscope.json'}: run is incomplete: status crashed (the "
                               "training loop raised an exception), last recorded step 9, no final state"]


def test_nonfinite_values_are_warnings(run_dir: Path) -> None:
    rewrite_snapshot(step_file(run_dir, 2), lambda t, m: t["grad/x"].fill_(float("nan")))
    report = validate_run(run_dir)
    assert report.ok
    assert report.warnings == [
        f"{step_file(run_dir, 2)}: gradient 'x' holds 6 non-finite value(s) (NaN/Inf); the affected "
        "metrics of its pairs will be NaN and flagged"]


def test_final_state_mismatch(run_dir: Path) -> None:
    edit_manifest(run_dir, lambda m: m.update(final_step=9))
    report = validate_run(run_dir)
    assert any("holds a final state, but the manifest's final_step is 9" in p for p in report.problems)
    assert any("the manifest names step 9 final, but the file holds a training step" in p
               for p in report.problems)


# --- the analysis skips only what is damaged -------------------------------------------------------


def skipped(ds) -> dict[int, str]:
    return {d["step"]: d["reason"] for d in json.loads(ds.attrs["skipped_pairs"])}


# Only the synchronous scheduler: under "threads", concurrent torch.func.jvp calls intermittently
# fail ("no level exists" for forward AD, whose dual levels are process-global in torch); that is a
# scheduling matter of the analysis, not a property of damaged runs.
@pytest.mark.parametrize("scheduler", ["synchronous"])
def test_damaged_step_costs_only_its_pairs(run_dir: Path, intact, scheduler: str) -> None:
    f = step_file(run_dir, 3)
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.warns(DamagedRunWarning, match=r"skipped 2 of 10 pair\(s\).*first: pair 2: .*step_00000003"):
        ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", scheduler=scheduler,
                               workers=2, progress=False)
    assert list(ds.step.values) == [0, 1, 4, 5, 6, 7, 8, 9]
    assert set(skipped(ds)) == {2, 3}
    assert all(str(f) in r and "truncated" in r for r in skipped(ds).values())
    kept = intact.sel(step=ds.step.values)
    kinds = {n: spec.kind for n, spec in trajscope.get_metrics().items()}
    for name in ds.data_vars:
        if kinds.get(name.removesuffix("_by_layer")) != "pair":
            continue  # series are cumulative over the pairs analyzed: they sum over fewer
        got, want = ds[name].values, kept[name].values
        # bitwise for the synchronous scheduler; threads change torch's intra-op split (1e-15)
        tol = 0 if scheduler == "synchronous" else 1e-12
        far = ds.step.values != 4
        np.testing.assert_allclose(got[far], want[far], err_msg=name, rtol=tol, atol=tol)
        # pair 4 lost only its neighbour x_3: what needs x_3 (e.g. the previous-step cosines)
        # is NaN, everything else is as in the intact run
        near = ~far
        differ = ~np.isclose(got[near], want[near], rtol=tol, atol=tol, equal_nan=True)
        assert np.isnan(got[near][differ]).all(), name
    if "grad_cos_prev" in ds:
        assert np.isnan(ds.grad_cos_prev.sel(step=4)) and np.isfinite(ds.grad_cos_prev.sel(step=5))
    on_disk = trajscope.open_metrics(run_dir)
    assert skipped(on_disk) == skipped(ds)


def test_clean_analysis_lists_no_skipped_pairs(intact) -> None:
    assert skipped(intact) == {}


def test_missing_snapshot_is_reported(run_dir: Path, intact) -> None:
    step_file(run_dir, 6).unlink()
    with pytest.warns(DamagedRunWarning, match=r"skipped 2 of 10 pair\(s\)"):
        ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", write=False, progress=False)
    assert skipped(ds) == {5: f"step 6: {step_file(run_dir, 6)} is missing",
                           6: f"step 6: {step_file(run_dir, 6)} is missing"}
    assert list(ds.step.values) == [0, 1, 2, 3, 4, 7, 8, 9]


@pytest.mark.parametrize("damage,reason", [
    (lambda t, m: t.pop("param/x"), "step 4: snapshot lacks parameter 'x'"),
    (lambda t, m: m.update(step=2), "file is named for step 4 but holds step 2"),
    (lambda t, m: t.update({"param/x\x00": t["param/x"].clone()}), "contains character U+0000"),
    (lambda t, m: t.update({"param/x": t["param/x"][:3].clone()}),
     "step 4: parameter 'x' has shape (3,), the run's parameter has (6,)"),
    (lambda t, m: t.update({"param/y": t["param/x"].clone()}),
     "step 4: snapshot holds parameter 'y', which the run does not have"),
])
def test_incomplete_snapshot_costs_only_its_pairs(run_dir: Path, damage, reason: str) -> None:
    rewrite_snapshot(step_file(run_dir, 4), damage)
    with pytest.warns(DamagedRunWarning):
        ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", write=False, progress=False)
    got = skipped(ds)
    assert 4 in got and reason in got[4], got
    assert set(got) == {3, 4}  # the pairs (3, 4) and (4, 5); pair 5 only loses its x_{t-1} terms
    assert list(ds.step.values) == [0, 1, 2, 5, 6, 7, 8, 9]


def test_snapshot_without_minibatch_costs_only_its_own_pair(run_dir: Path) -> None:
    rewrite_snapshot(step_file(run_dir, 4), lambda t, m: m.pop("batch_tree"))
    with pytest.warns(DamagedRunWarning):
        ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", write=False, progress=False)
    assert skipped(ds) == {4: "step 4: snapshot holds no minibatch"}  # pair 3 needs only x_4


def test_unreadable_scalars_do_not_stop_the_analysis(run_dir: Path) -> None:
    (run_dir / "scalars.jsonl").write_text("{broken\n{}\n")
    ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", write=False, progress=False)
    assert ds.sizes["step"] == 10


def test_crashed_run_analyzes_up_to_last_snapshot(run_dir: Path) -> None:
    edit_manifest(run_dir, lambda m: m.update(status="crashed", final_step=None))
    for s in (8, 9, 10):
        step_file(run_dir, s).unlink()
    scalars = run_dir / "scalars.jsonl"
    scalars.write_text("".join(scalars.read_text().splitlines(keepends=True)[:8]) + '{"step": 8, "lo')
    ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", write=False, progress=False)
    assert list(ds.step.values) == list(range(7))
    assert skipped(ds) == {}
    shutil.rmtree(run_dir)


KILLED = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from support.problems import B_MEAN, DIM, QuadModel, quad_loss
from trajscope.recorders import Recorder
model = QuadModel()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
gen = torch.Generator().manual_seed(0)
with Recorder({run!r}, model, opt, objective="support.problems:make_quadratic") as rec:
    for t in range(100):
        b = B_MEAN + 0.3 * torch.randn(DIM, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        loss = quad_loss(model, b)
        loss.backward()
        rec.batch(b, loss=loss)
        opt.step()
        if t == 5:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkilled_recorder_leaves_a_readable_run(tmp_path: Path, capsys) -> None:
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    script = KILLED.format(tests=str(Path(__file__).parents[1]), run=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    # what a kill in the middle of a write would leave behind as well
    (run_dir / "steps" / ".step_00000006.safetensors.tmp-99999").write_bytes(b"\x10\x00")
    with open(run_dir / "scalars.jsonl", "ab") as fh:
        fh.write(b'{"step": 6, "lo')
    run = trajscope.open_run(run_dir)
    # Snapshots are written in order by a background writer: what was still queued at the kill
    # is not on disk, but what is on disk is a gap-free prefix.
    n = len(run.steps)
    assert run.status == "recording" and run.steps == list(range(n)) and run.final_step is None
    assert n >= 2
    assert [r["step"] for r in run.scalars] == [0, 1, 2, 3, 4, 5]
    report = validate_run(run_dir)
    assert report.ok, report.problems
    assert (f"{run_dir / 'trajscope.json'}: run is incomplete: status recording (the recorder is gone: "
            f"crashed or killed), last recorded step {n - 1}, no final state") in report.warnings
    assert any("leftover temporary file" in w for w in report.warnings)
    ds = trajscope.analyze(run_dir, make_quadratic, dtype="float64", write=False, progress=False)
    assert list(ds.step.values) == list(range(n - 1)) and skipped(ds) == {}


# --- sharded runs (format version 3) ----------------------------------------------------------------


def test_files_of_shards_that_no_snapshot_reads_are_warnings(run_dir: Path, capsys) -> None:
    """A part whose step file never came (a recording killed mid-step), a part its step file does not
    list, a temporary file and any other file: each one warning that says what it is; no problem."""
    shard_run(run_dir)
    shards = run_dir / fmt.SHARDS_DIR
    orphan = shards / fmt.shard_filename(11, 1)
    shutil.copyfile(shards / fmt.shard_filename(10, 1), orphan)
    unlisted = shards / fmt.shard_filename(4, 2)
    shutil.copyfile(shards / fmt.shard_filename(4, 1), unlisted)
    (shards / ".step_00000011.rank_00001.safetensors.tmp-99999").write_bytes(b"\x10")
    (shards / "notes.txt").write_text("mine")
    report = validate_run(run_dir)
    assert report.problems == []
    assert report.warnings == [
        f"{shards / '.step_00000011.rank_00001.safetensors.tmp-99999'}: leftover temporary file of an interrupted "
        "write (harmless; may be deleted)",
        f"{shards / 'notes.txt'}: unexpected file (ignored)",
        f"{unlisted}: part of rank 2, which {step_file(run_dir, 4)} does not list in 'shards' (ignored; may be "
        "deleted)",
        f"{orphan}: part of a snapshot that was never completed (rank 1, step 11): harmless, may be deleted"]
    code, out, _ = cli(["validate", str(run_dir)], capsys)
    assert code == 0 and out.splitlines()[-1] == "ok: no damage, 4 warnings"


def test_a_missing_part_is_a_problem_of_its_step_even_quick(run_dir: Path) -> None:
    shard_run(run_dir)
    part = run_dir / fmt.SHARDS_DIR / fmt.shard_filename(5, 1)
    part.unlink()
    full, quick = validate_run(run_dir), validate_run(run_dir, quick=True)
    assert full.problems == [f"{part}: missing (No such file or directory): the part of rank 1 of step 5, which "
                             f"{step_file(run_dir, 5)} lists in 'shards'"]
    assert len(quick.problems) == 1 and quick.problems[0].startswith(f"{part}: cannot read")
    assert full.warnings == quick.warnings == []
