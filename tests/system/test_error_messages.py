"""Every user-caused failure: its exception class, and a one-line message that names the culprit
(file, step, parameter or argument) and says what was expected. Then the same through the CLI:
exit 1 with one ``trajscope: error:`` line, a traceback only with ``--debug``, exit 2 for usage.

NaN/Inf and zero-length updates are in analysis/test_health.py, hostile input in
system/test_hostile_run_dirs.py, damage that costs only its pairs in tools/test_validate.py. Two analyses
at once and SIGKILL-then-resume are in analysis/test_persist.py.
"""

from __future__ import annotations

import json
import re
import struct
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import trajscope
from support.problems import make_quadratic, quad_loss
from support.rundirs import cli, copy_run, edit_manifest, quad_run, rewrite_snapshot, step_file
from trajscope.errors import (
    AnalysisError,
    ObjectiveError,
    RunFormatError,
    TrajscopeError,
)
from trajscope.objective import Objective, load_objective
from trajscope.store import open_run, read_snapshot


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quad_run(tmp_path_factory.mktemp("base") / "run", steps=4)


@pytest.fixture
def run_dir(base_run: Path, tmp_path: Path) -> Path:
    return copy_run(base_run, tmp_path / "run")


def one_line(msg: str) -> str:
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"
    return msg


def raises(cls: type[BaseException], *needles: str):
    """pytest.raises(cls) whose message must contain every needle (checked literally)."""
    return pytest.raises(cls, match=".*".join(re.escape(n) for n in needles))


# --- the run directory ---------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    p = tmp_path / "nope"
    with raises(RunFormatError, str(p), "no such directory") as e:
        open_run(p)
    one_line(str(e.value))


def test_empty_directory(tmp_path: Path) -> None:
    with raises(RunFormatError, str(tmp_path), "not a trajscope run", "trajscope.json is missing"):
        open_run(tmp_path)


def test_not_a_run_a_file(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with raises(RunFormatError, str(f), "not a directory"):
        open_run(f)


def test_not_a_run_other_json(tmp_path: Path) -> None:
    (tmp_path / "trajscope.json").write_text(json.dumps({"name": "something else"}))
    with raises(RunFormatError, "trajscope.json", "'format_version' missing"):
        open_run(tmp_path)


def test_format_version_newer(run_dir: Path) -> None:
    edit_manifest(run_dir, lambda m: m.update(format_version=99))
    with raises(RunFormatError, str(run_dir / "trajscope.json"), "format_version 99 is newer",
                "upgrade trajscope"):
        open_run(run_dir)


def test_manifest_invalid_json(run_dir: Path) -> None:
    (run_dir / "trajscope.json").write_text('{"format_version": 1, "params": [')
    with raises(RunFormatError, str(run_dir / "trajscope.json"), "invalid JSON"):
        open_run(run_dir)


def test_manifest_not_utf8(run_dir: Path) -> None:
    (run_dir / "trajscope.json").write_bytes(b'{"format_version": 1, "x": "\xff"}')
    with raises(RunFormatError, "trajscope.json", "invalid JSON"):
        open_run(run_dir)


@pytest.mark.parametrize("field,value,needle", [
    ("params", {"x": 1}, "'params' must be a list"),
    ("params", [{"name": "x", "shape": [-1]}], "'shape' must be a list of non-negative integers"),
    ("params", [{"name": "x", "shape": [2]}, {"name": "x", "shape": [2]}], "duplicate name 'x'"),
    ("params", [{"name": 3, "shape": [2]}], "params[0].name: expected a string name, got int"),
    ("status", "exploded", "'status' must be one of recording, complete, crashed"),
    ("final_step", "12", "'final_step' must be a non-negative integer or null"),
    ("optimizer", [], "'optimizer' must be an object"),
    ("objective", 5, "'objective' must be a string or null"),
])
def test_manifest_fields(run_dir: Path, field: str, value: object, needle: str) -> None:
    edit_manifest(run_dir, lambda m: m.update({field: value}))
    with raises(RunFormatError, "trajscope.json", needle):
        open_run(run_dir)


def test_scalars_invalid_json(run_dir: Path) -> None:
    path = run_dir / "scalars.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = '{"step": 1, "loss": '
    path.write_text("\n".join(lines) + "\n")
    run = open_run(run_dir)  # opening does not read scalars.jsonl: the snapshots stay usable
    with raises(RunFormatError, f"{path}:2", "invalid JSON"):
        run.scalars


def test_scalars_torn_last_line_is_tolerated(run_dir: Path) -> None:
    path = run_dir / "scalars.jsonl"
    path.write_bytes(path.read_bytes() + b'{"step": 4, "lo')
    assert [r["step"] for r in open_run(run_dir).scalars] == [0, 1, 2, 3]


def test_scalars_line_without_step(run_dir: Path) -> None:
    path = run_dir / "scalars.jsonl"
    path.write_text('{"loss": 1.0}\n' + path.read_text())
    with raises(RunFormatError, f"{path}:1", "expected an object with an integer 'step'"):
        open_run(run_dir).scalars


# --- step files ----------------------------------------------------------------------------------


def test_truncated_step_file_data(run_dir: Path) -> None:
    f = step_file(run_dir, 2)
    f.write_bytes(f.read_bytes()[:-10])
    with raises(RunFormatError, str(f), "the file is truncated") as e:
        read_snapshot(f)
    one_line(str(e.value))
    with raises(RunFormatError, str(f)):
        open_run(run_dir).snapshot(2)


def test_truncated_step_file_header(run_dir: Path) -> None:
    f = step_file(run_dir, 2)
    f.write_bytes(f.read_bytes()[:50])
    with raises(RunFormatError, str(f), "header claims", "truncated or corrupt"):
        read_snapshot(f)


def test_step_file_shorter_than_length_field(run_dir: Path) -> None:
    f = step_file(run_dir, 2)
    f.write_bytes(b"\x01\x02")
    with raises(RunFormatError, str(f), "truncated safetensors file (2 bytes)"):
        read_snapshot(f)


def test_corrupt_header_json(run_dir: Path) -> None:
    f = step_file(run_dir, 1)
    data = bytearray(f.read_bytes())
    data[8] = ord("[")  # '{' -> '[': still bytes, no longer the header object
    f.write_bytes(bytes(data))
    with raises(RunFormatError, str(f), "safetensors header is not valid JSON"):
        read_snapshot(f)


def test_oversized_header(run_dir: Path) -> None:
    f = step_file(run_dir, 1)
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with raises(RunFormatError, str(f), f"header claims {1 << 40} bytes", "limit 100000000"):
        read_snapshot(f)


def test_header_entry_with_bad_offsets(run_dir: Path) -> None:
    f = step_file(run_dir, 1)
    header = json.dumps({"param/x": {"dtype": "F64", "shape": [6], "data_offsets": [40, 8]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + bytes(48))
    with raises(RunFormatError, str(f), "tensor 'param/x'", "'data_offsets' must be [begin, end]"):
        read_snapshot(f)


def test_snapshot_without_trajscope_metadata(run_dir: Path) -> None:
    import safetensors.torch

    f = step_file(run_dir, 1)
    f.write_bytes(safetensors.torch.save({"param/x": torch.zeros(6, dtype=torch.float64)}))
    with raises(RunFormatError, str(f), "not a trajscope snapshot"):
        read_snapshot(f)


def test_snapshot_holding_another_step(run_dir: Path) -> None:
    f = step_file(run_dir, 1)
    rewrite_snapshot(f, lambda t, m: m.update(step=3))
    with raises(RunFormatError, str(f), "named for step 1 but holds step 3", "mix up steps"):
        read_snapshot(f)


@pytest.mark.parametrize("field,value,needle", [
    ("step", True, "lacks an integer 'step'"),
    ("lr", "fast", "'lr' must be a list of numbers"),
    ("loss", "low", "'loss' must be a number or null"),
    ("kind", "other", "'kind' must be 'step' or 'final'"),
    ("training", "yes", "'training' must be true, false or null"),
    ("batch_tree", {"zz": 1}, "unknown batch tree node kind 'zz'"),
    ("batch_tree", {"t": 7}, "batch tree names tensor 7, which is not stored"),
])
def test_snapshot_metadata_fields(run_dir: Path, field: str, value: object, needle: str) -> None:
    f = step_file(run_dir, 1)
    rewrite_snapshot(f, lambda t, m: m.update({field: value}))
    with raises(RunFormatError, str(f), needle):
        read_snapshot(f)


def test_batch_tree_too_deep(run_dir: Path) -> None:
    f = step_file(run_dir, 1)
    tree: dict = {"t": 0}
    for _ in range(200):
        tree = {"list": [tree]}
    rewrite_snapshot(f, lambda t, m: m.update(batch_tree=tree))
    with raises(RunFormatError, str(f), "nested deeper than 64 levels"):
        read_snapshot(f)


def test_missing_step(run_dir: Path) -> None:
    step_file(run_dir, 2).unlink()
    run = open_run(run_dir)
    assert run.pairs == [0, 3]
    with raises(RunFormatError, str(run_dir), "step 2 is not recorded", "recorded: 0-1, 3-4"):
        run.snapshot(2)


def test_every_pair_lost(run_dir: Path) -> None:
    for s in (1, 3):
        step_file(run_dir, s).unlink()
    with raises(RunFormatError, "every selected pair is lost", "step_00000001.safetensors is missing"):
        trajscope.analyze(run_dir, make_quadratic, dtype="float64", write=False, progress=False)


def test_every_pair_damaged(run_dir: Path) -> None:
    for s in range(5):
        step_file(run_dir, s).write_bytes(b"garbage!garbage!")
    with raises(RunFormatError, "all 4 pair(s) were skipped", "step_00000000.safetensors"):
        trajscope.analyze(run_dir, make_quadratic, dtype="float64", write=False, progress=False)


# --- the objective ---------------------------------------------------------------------------------


@pytest.fixture
def module_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a module with the given source in a fresh directory, chdir there, and return its
    unique name; sys.path and sys.modules are restored afterwards."""
    d = tmp_path / "code"
    d.mkdir()
    monkeypatch.chdir(d)
    monkeypatch.setattr(sys, "path", list(sys.path))
    names: list[str] = []

    def write(source: str) -> str:
        name = f"objmod_{uuid.uuid4().hex[:10]}"
        (d / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for n in names:
        sys.modules.pop(n, None)


def test_objective_module_missing(module_dir) -> None:
    with raises(ObjectiveError, "objective 'no_such_module_xyz:make'",
                "cannot import module 'no_such_module_xyz'", "--objective MODULE:FUNCTION"):
        load_objective("no_such_module_xyz:make")


def test_objective_function_missing(module_dir) -> None:
    mod = module_dir("X = 1\n")
    with raises(ObjectiveError, f"objective '{mod}:make'", f"module '{mod}' has no attribute 'make'"):
        load_objective(f"{mod}:make")


def test_objective_module_raises_on_import(module_dir) -> None:
    mod = module_dir("1 / 0\n")
    with raises(ObjectiveError, f"importing module '{mod}' raised ZeroDivisionError"):
        load_objective(f"{mod}:make")


def test_objective_module_syntax_error(module_dir) -> None:
    mod = module_dir("def make(:\n")
    with raises(ObjectiveError, f"importing module '{mod}' raised SyntaxError"):
        load_objective(f"{mod}:make")


def test_objective_returns_wrong_thing(module_dir) -> None:
    mod = module_dir("def make():\n    return 42\n")
    with raises(ObjectiveError, f"objective '{mod}:make'", "returned int",
                "expected trajscope.Objective"):
        load_objective(f"{mod}:make")


def test_objective_factory_raises(module_dir) -> None:
    mod = module_dir("def make():\n    raise KeyError('weights.pt')\n")
    with raises(ObjectiveError, f"objective '{mod}:make'", "calling it raised KeyError"):
        load_objective(f"{mod}:make")


def test_objective_not_callable(module_dir) -> None:
    mod = module_dir("make = 3\n")
    with raises(ObjectiveError, f"objective '{mod}:make'", "is a int, expected a function"):
        load_objective(f"{mod}:make")


def test_objective_fields_checked() -> None:
    with raises(ObjectiveError, "Objective.model", "expected a torch.nn.Module, got str"):
        Objective(model="net", loss=quad_loss)  # type: ignore[arg-type]
    with raises(ObjectiveError, "Objective.loss", "expected a callable, got int"):
        Objective(model=nn.Linear(1, 1), loss=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["noseparator", "../evil:make", "/tmp/evil:make", "evil/x:make",
                                  "C:\\evil:make",
                                  ".relative:make", "mod:", ":fn", "a b:make", "mod:fn()"])
def test_objective_spec_must_be_dotted_identifiers(spec: str) -> None:
    with raises(ObjectiveError, "expected 'module:function' made of dotted Python identifiers"):
        load_objective(spec)


def test_no_objective_anywhere(run_dir: Path) -> None:
    edit_manifest(run_dir, lambda m: m.update(objective=None))
    with raises(ObjectiveError, "no objective", "pass --objective MODULE:FUNCTION"):
        trajscope.analyze(run_dir, write=False, progress=False)


class _Quad2(nn.Module):
    def __init__(self, shape: tuple[int, ...] = (6,), extra: bool = False, name: str = "x") -> None:
        super().__init__()
        self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=torch.float64)))
        if extra:
            self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float64))


def test_parameter_name_differs(run_dir: Path) -> None:
    obj = Objective(model=_Quad2(name="w"), loss=lambda m, b: (m.w * b).sum())
    with raises(ObjectiveError, "parameter 'x' is recorded but the objective's model has no such",
                "model has 1: w"):
        trajscope.analyze(run_dir, obj, dtype="float64", write=False, progress=False)


def test_parameter_shape_differs(run_dir: Path) -> None:
    obj = Objective(model=_Quad2(shape=(3, 2)), loss=lambda m, b: m.x.sum())
    with raises(ObjectiveError, "parameter 'x'", "recorded shape (6,)", "model has (3, 2)"):
        trajscope.analyze(run_dir, obj, dtype="float64", write=False, progress=False)


def test_model_parameter_not_recorded(run_dir: Path) -> None:
    obj = Objective(model=_Quad2(extra=True), loss=lambda m, b: quad_loss(m, b) + m.bias.sum())
    with raises(ObjectiveError, "parameter 'bias' of the objective's model was not recorded",
                "run has 1: x"):
        trajscope.analyze(run_dir, obj, dtype="float64", write=False, progress=False)


def test_loss_raises(run_dir: Path) -> None:
    def bad_loss(model: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return model.x @ torch.ones(5, dtype=torch.float64)  # wrong size: matmul fails

    obj = Objective(model=_Quad2(), loss=bad_loss)
    with raises(ObjectiveError, "step 0: evaluating the objective's loss failed: RuntimeError") as e:
        trajscope.analyze(run_dir, obj, dtype="float64", write=False, progress=False)
    one_line(str(e.value))


def test_loss_returns_non_scalar(run_dir: Path) -> None:
    obj = Objective(model=_Quad2(), loss=lambda m, b: m.x * b)
    with raises(ObjectiveError, "objective loss returned Tensor(6,)", "expected a scalar tensor"):
        trajscope.analyze(run_dir, obj, dtype="float64", write=False, progress=False)


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,needle", [
    ({"dtype": "float16"}, "dtype='float16': expected as-trained (or None or 'auto'), float32 or float64"),
    ({"steps": "a:b"}, "steps='a:b': expected START:STOP[:STRIDE]"),
    ({"device": "tpu"}, "device='tpu': expected cpu, cuda, cuda:N or auto"),
    ({"points": 1}, "points=1: expected an int from 2 to 10001"),
    ({"points": 10002}, "points=10002: expected an int from 2 to 10001"),
    ({"margin": 100.5}, "margin=100.5: expected a finite number from 0 to 100"),
    ({"scheduler": "magic"}, "scheduler='magic': expected synchronous, threads, processes, a dask.distributed address"),
])
def test_bad_arguments(run_dir: Path, kw: dict, needle: str) -> None:
    with raises(AnalysisError, needle):
        trajscope.analyze(run_dir, make_quadratic, write=False, progress=False, **kw)


def test_no_pairs_selected(run_dir: Path) -> None:
    with raises(AnalysisError, str(run_dir), "no analyzable pairs", "--steps"):
        trajscope.analyze(run_dir, make_quadratic, steps="100:200", write=False, progress=False)


# --- the CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "version", "manifest", "objective"])
def test_cli_error_is_one_line_exit_1(run_dir: Path, case: str, capsys) -> None:
    target = run_dir
    if case == "missing":
        target = run_dir / "nope"
        needle = f"{target}: no such directory"
    elif case == "version":
        edit_manifest(run_dir, lambda m: m.update(format_version=7))
        needle = "format_version 7 is newer"
    elif case == "manifest":
        (run_dir / "trajscope.json").write_text("{")
        needle = "trajscope.json: invalid JSON"
    else:
        needle = "objective 'no_such_mod_q:make': cannot import module 'no_such_mod_q'"
    args = ["analyze", str(target), "-q"]
    if case == "objective":
        args += ["--objective", "no_such_mod_q:make"]
    code, out, err = cli(args, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trajscope: error: ") and needle in lines[0]
    assert "Traceback" not in err


def test_cli_debug_shows_traceback(run_dir: Path, capsys) -> None:
    code, out, err = cli(["--debug", "info", str(run_dir / "nope")], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("trajscope: error: ")


@pytest.mark.parametrize("args,needle", [
    (["analyze"], "Missing argument 'RUN_DIR'"),
    (["analyze", "x", "--points", "1"], "Invalid value for '--points'"),
    (["analyze", "x", "--scheduler", "magic"], "Invalid value for '--scheduler'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["info", "x", "--bogus"], "No such option"),
])
def test_cli_usage_errors_exit_2(args: list[str], needle: str, capsys) -> None:
    code, out, err = cli(args, capsys)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err


def test_cli_internal_error_is_one_line(run_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: object) -> None:
        raise TypeError("unexpected\nmultiline")

    monkeypatch.setattr("trajscope.store.run.open_run", boom)
    code, out, err = cli(["info", str(run_dir)], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("trajscope: internal error: TypeError: unexpected\\nmultiline")
    assert "--debug" in lines[0]


def test_cli_os_error_names_file(run_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device", str(run_dir / "analysis" / "metrics.nc"))

    monkeypatch.setattr("trajscope.analysis.driver._write_dataset", full)
    code, out, err = cli(["analyze", str(run_dir), "-q", "--objective", "support.problems:make_quadratic",
                          "--dtype", "float64"], capsys)
    assert code == 1
    assert err.strip() == f"trajscope: error: {run_dir / 'analysis' / 'metrics.nc'}: No space left on device"


def test_cli_warning_is_one_line(run_dir: Path, capsys) -> None:
    step_file(run_dir, 2).write_bytes(b"\x00" * 4)
    code, out, err = cli(["analyze", str(run_dir), "-q", "--dtype", "float64"], capsys)
    assert code == 0, err
    assert err.strip().splitlines() == [
        f"trajscope: warning: skipped 2 of 4 pair(s) because their snapshots are damaged or missing "
        f"(listed in the Dataset's 'skipped_pairs' attribute); first: pair 1: "
        f"{step_file(run_dir, 2)}: truncated safetensors file (4 bytes)"
    ]


def test_every_trajscope_error_is_a_subclass() -> None:
    for cls in (RunFormatError, ObjectiveError, AnalysisError, trajscope.errors.RecorderError,
                trajscope.errors.MetricRegistrationError):
        assert issubclass(cls, TrajscopeError)
    assert trajscope.TrajscopeError is TrajscopeError


class _QuadBN(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(6, dtype=torch.float64))
        self.register_buffer("stat", torch.zeros(n))


def test_buffer_shape_differs(run_dir: Path) -> None:
    edit_manifest(run_dir, lambda m: m.update(buffers=[{"name": "stat", "shape": [4], "dtype": "float32"}]))
    obj = Objective(model=_QuadBN(5), loss=quad_loss)
    with raises(ObjectiveError, "buffer 'stat': recorded shape (4,), objective's model has (5,)"):
        trajscope.analyze(run_dir, obj, dtype="float64", write=False, progress=False)


def test_path_with_nul_byte() -> None:
    with raises(RunFormatError, "no such directory"):
        open_run("run\x00dir")


def test_complex_parameter_is_refused_when_the_recorder_is_created(tmp_path: Path) -> None:
    from trajscope.recorders import Recorder

    model = nn.Linear(3, 2)
    model.register_parameter("w", nn.Parameter(torch.zeros(2, dtype=torch.complex64)))
    with pytest.raises(trajscope.errors.RecorderError) as exc:
        Recorder(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(exc.value) == ("model: parameter 'w' is complex64; the recorder takes real parameters only "
                              "(the run format stores no complex dtype, and the metrics are real inner products)")
    assert not (tmp_path / "run").exists()  # refused before anything is written
