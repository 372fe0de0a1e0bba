"""What the recorder guarantees when the training program, another process or the disk works against
it: one writer per run directory, the readers' limits enforced when recording, parameters replaced
during training, a model on the meta device, and a full disk that ends the run ``crashed`` with its
cause (``docs/reliability.md``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from support.recorder_objectives import (
    dataset,
    mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    train_sgd,
    xent,
)
from trajscope import runformat as fmt
from trajscope.analysis.persist import analysis_lock
from trajscope.errors import RecorderError, RunFormatError
from trajscope.recorders import Recorder, RecorderWarning
from trajscope.recorders.backends import HDF5Writer, SafetensorsWriter
from trajscope.store.run import open_run

TESTS = Path(__file__).parents[1]  # on the child interpreter's PYTHONPATH: the helpers in support/


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _step(rec: Recorder, model: nn.Module, opt: torch.optim.Optimizer, batch: Any = None) -> None:
    """One training step of the MLP on a fixed minibatch; ``batch`` is what ``rec.batch`` is told."""
    x, y = dataset()
    opt.zero_grad()
    loss = xent(model, (x[:16], y[:16]))
    loss.backward()
    rec.batch((x[:16], y[:16]) if batch is None else batch, loss=loss)
    opt.step()


def _step_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / fmt.STEPS_DIR).iterdir())


# --- one writer per run ------------------------------------------------------------------------------

HOLDER = textwrap.dedent('''
    import sys, torch
    from support.recorder_objectives import dataset, mlp, xent
    from trajscope.recorders import Recorder

    def step(rec, model, opt):
        x, y = dataset()
        opt.zero_grad()
        loss = xent(model, (x[:16], y[:16]))
        loss.backward()
        rec.batch((x[:16], y[:16]), loss=loss)
        opt.step()

    torch.set_num_threads(1)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(sys.argv[1], model, opt, objective="support.recorder_objectives:make_mlp") as rec:
        for _ in range(2):
            step(rec, model, opt)
        rec.flush()
        print("recording", flush=True)
        sys.stdin.readline()  # hold the run open until the test has tried to take it over
        for _ in range(2):
            step(rec, model, opt)
    print("closed", flush=True)
''')


@pytest.fixture
def live_recorder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A second process recording into ``tmp_path / "run"``, holding it open (2 steps written)
    until a line is written to its stdin."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=TESTS, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == "recording\n", child.stderr
        yield run_dir, child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_overwrite_is_refused_while_another_process_records_the_run(
        live_recorder: tuple[Path, subprocess.Popen[str]]) -> None:
    run_dir, child = live_recorder
    before = _step_files(run_dir)
    model = mlp()
    with pytest.raises(RecorderError) as info:
        Recorder(run_dir, model, _sgd(model), overwrite=True).start()
    message = str(info.value)
    assert message.startswith(f"{run_dir / fmt.RECORDING_LOCK}: another recorder is writing this run "
                              f"(pid {child.pid} on ")
    assert "\n" not in message
    assert _step_files(run_dir) == before == ["step_00000000.safetensors", "step_00000001.safetensors"]
    out, err = child.communicate("go on\n", timeout=120)
    assert child.returncode == 0 and out == "closed\n", err
    run = open_run(run_dir)  # the live recording was left whole
    assert run.status == fmt.STATUS_COMPLETE and run.steps == [0, 1, 2, 3, 4]
    # Once its recorder has closed, the run may be replaced.
    with Recorder(run_dir, model, _sgd(model), overwrite=True) as rec:
        _step(rec, model, rec.optimizer)
    assert open_run(run_dir).steps == [0, 1]


def test_overwrite_is_refused_while_an_analysis_writes_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_sgd(run_dir, steps=3)
    (run_dir / fmt.ANALYSIS_DIR).mkdir()
    model = mlp()
    with analysis_lock(run_dir / fmt.ANALYSIS_DIR):
        with pytest.raises(RecorderError) as info:
            Recorder(run_dir, model, _sgd(model), overwrite=True).start()
        assert str(info.value).startswith(
            f"{run_dir / fmt.ANALYSIS_DIR / fmt.LOCK_FILE}: an analysis of this run is writing there "
            f"(pid {os.getpid()} on ")
        assert open_run(run_dir).steps == [0, 1, 2, 3]  # nothing was removed
        assert fmt.recorder_alive(run_dir) is False  # and the recording lock was given back
    with Recorder(run_dir, model, _sgd(model), overwrite=True) as rec:
        _step(rec, model, rec.optimizer)
    assert open_run(run_dir).steps == [0, 1] and not (run_dir / fmt.ANALYSIS_DIR).exists()


def test_a_second_recorder_of_one_directory_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    model = mlp()
    with Recorder(run_dir, model, _sgd(model)) as rec:
        with pytest.raises(RecorderError, match=f"another recorder is writing this run \\(pid {os.getpid()} "):
            Recorder(run_dir, model, _sgd(model), overwrite=True).start()
        _step(rec, model, rec.optimizer)
    assert open_run(run_dir).status == fmt.STATUS_COMPLETE
    assert (run_dir / fmt.RECORDING_LOCK).read_bytes() == b""  # the holder's note goes with the lock


# --- the readers' limits, enforced when recording -------------------------------------------------


def test_metadata_larger_than_a_reader_accepts_is_refused_at_construction(tmp_path: Path) -> None:
    model = mlp()
    with pytest.raises(RecorderError, match=rf"^metadata: \d+ bytes as written in {fmt.MANIFEST}, more than "
                                            rf"the {fmt.MAX_MANIFEST_BYTES} bytes a reader accepts"):
        Recorder(tmp_path / "run", model, _sgd(model), metadata={"notes": "x" * fmt.MAX_MANIFEST_BYTES})
    assert not (tmp_path / "run").exists()


def test_metadata_is_measured_as_the_manifest_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 3000 zeros: about 9 kB as compact JSON, about 21 kB indented as the manifest writes them
    monkeypatch.setattr(fmt, "MAX_MANIFEST_BYTES", 20_000)
    model = mlp()
    with pytest.raises(RecorderError, match="more than the 20000 bytes a reader accepts"):
        Recorder(tmp_path / "run", model, _sgd(model), metadata={"xs": [0] * 3000})
    Recorder(tmp_path / "run", model, _sgd(model), metadata={"xs": [0] * 2000})


def test_a_manifest_larger_than_a_reader_accepts_is_refused_at_start(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    model = mlp()
    rec = Recorder(run_dir, model, _sgd(model))
    monkeypatch.setattr(fmt, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(RecorderError, match=rf"^{re.escape(str(run_dir / fmt.MANIFEST))}: the manifest would "
                                            r"be \d+ bytes, more than the 1000 bytes a reader accepts"):
        rec.start()
    monkeypatch.undo()
    assert fmt.recorder_alive(run_dir) is False  # the failed start gave the lock back
    with Recorder(run_dir, model, _sgd(model)) as rec:
        _step(rec, model, rec.optimizer)
    assert open_run(run_dir).steps == [0, 1]


def _nested(levels: int, leaf: Any) -> Any:
    """``leaf`` inside ``levels`` nested one-element lists."""
    for _ in range(levels):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize("levels", [5000, fmt.MAX_METADATA_DEPTH + 1])
def test_metadata_nested_deeper_than_the_limit_is_one_error(tmp_path: Path, levels: int) -> None:
    model = mlp()
    with pytest.raises(RecorderError) as info:
        Recorder(tmp_path / "run", model, _sgd(model), metadata={"deep": _nested(levels - 1, 1)})
    assert str(info.value) == (f"metadata: nested deeper than {fmt.MAX_METADATA_DEPTH} levels of lists "
                               "and objects, which every reader parses; flatten it")


def test_metadata_at_the_nesting_limit_is_recorded_and_read(tmp_path: Path) -> None:
    model = mlp()
    deep = {"deep": _nested(fmt.MAX_METADATA_DEPTH - 1, 1)}
    with Recorder(tmp_path / "run", model, _sgd(model), metadata=deep) as rec:
        _step(rec, model, rec.optimizer)
    assert open_run(tmp_path / "run").manifest["metadata"] == deep


def _reader_accepts(tree_of: Any) -> bool:
    """Whether a reader rebuilds the batch tree ``tree_of`` (what a snapshot would store)."""
    tree, leaves = fmt.flatten_batch(tree_of)
    try:
        fmt.unflatten_batch(tree, leaves)
    except RunFormatError:
        return False
    return True


@pytest.mark.parametrize("accumulation", [1, 2])
def test_rec_batch_refuses_a_batch_nested_deeper_than_a_reader_accepts(tmp_path: Path, accumulation: int) -> None:
    """At the limit the batch is recorded and read back; one level deeper ``rec.batch`` refuses it.
    With several micro-batches the stored tree is their list: one level less is left to each."""
    x, y = dataset()
    limit = fmt.MAX_BATCH_DEPTH - (accumulation > 1)
    fits, too_deep = _nested(limit, x[:4]), _nested(limit + 1, x[:4])
    stored = (lambda b: [b] * accumulation) if accumulation > 1 else (lambda b: b)
    assert _reader_accepts(stored(fits)) and not _reader_accepts(stored(too_deep))
    model = mlp()
    opt = _sgd(model)
    with pytest.raises(RecorderError) as info:
        with Recorder(tmp_path / "run", model, opt, accumulation=accumulation) as rec:
            for _ in range(accumulation):
                xent(model, (x[:4], y[:4])).backward()
                rec.batch(fits)
            opt.step()
            rec.batch(too_deep)
    assert str(info.value) == (
        f"step 1: rec.batch(): the batch is nested deeper than {limit} levels of tuples, lists and "
        f"dicts{' (one level is the list of micro-batches)' if accumulation > 1 else ''}, more than "
        "a reader accepts; flatten it")
    run = open_run(tmp_path / "run")
    assert run.steps == [0] and run.status == fmt.STATUS_CRASHED
    assert torch.equal(_innermost(run.snapshot(0).batch, limit + (accumulation > 1)), x[:4])


def _innermost(batch: Any, levels: int) -> Any:
    for _ in range(levels):
        (batch,) = batch[:1]
    return batch


def test_a_snapshot_header_larger_than_a_reader_accepts_is_refused(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "MAX_HEADER_BYTES", 4000)
    model = mlp()
    x, y = dataset()
    with pytest.raises(RecorderError, match=r"^step 0: the snapshot's header would be \d+ bytes, more than the "
                                            r"4000 bytes a reader accepts; it holds the batch's numbers"):
        with Recorder(tmp_path / "run", model, _sgd(model)) as rec:
            _step(rec, model, rec.optimizer, batch=(x[:16], y[:16], ["a sentence of the batch"] * 200))


def test_a_parameter_name_a_reader_refuses_is_refused_at_construction(tmp_path: Path) -> None:
    model = mlp()
    model.register_parameter("scale\nfactor", nn.Parameter(torch.ones(())))
    with pytest.raises(RecorderError, match=r"^model: parameter name: name 'scale\\nfactor' contains character "
                                            r"U\+000A .*, which a reader of the run refuses$"):
        Recorder(tmp_path / "run", model, _sgd(model))


# --- parameters replaced during training ------------------------------------------------------------


def test_a_replaced_parameter_the_optimizer_does_not_train_is_refused(tmp_path: Path) -> None:
    model = mlp()
    opt = _sgd(model)
    with pytest.raises(RecorderError) as info:
        with Recorder(tmp_path / "run", model, opt) as rec:
            _step(rec, model, opt)
            model[0].weight = nn.Parameter(torch.zeros_like(model[0].weight))
            _step(rec, model, opt)
    assert str(info.value) == (
        "step 1: parameter '0.weight' of the model is a new tensor, but the optimizer still updates "
        "the one it replaced: the new parameter is not being trained. Give the optimizer the new "
        "parameter (replace the old one in optimizer.param_groups, or create the optimizer after "
        "the model), or change the parameter in place (with torch.no_grad(): param.copy_(new))")
    run = open_run(tmp_path / "run")
    assert run.steps == [0] and run.status == fmt.STATUS_CRASHED


def test_a_replaced_parameter_the_optimizer_trains_is_recorded(tmp_path: Path) -> None:
    model = mlp()
    opt = _sgd(model)
    seen: list[torch.Tensor] = []
    with Recorder(tmp_path / "run", model, opt, every=3, window=2) as rec:
        for t in range(6):
            if t == 2:  # a step that is not recorded: seen at the next recorded one
                new = nn.Parameter(torch.full_like(model[0].weight, 0.5))
                opt.param_groups[0]["params"] = [new if p is model[0].weight else p
                                                 for p in opt.param_groups[0]["params"]]
                model[0].weight = new
            seen.append(model[0].weight.detach().clone())
            _step(rec, model, opt)
    run = open_run(tmp_path / "run")
    assert run.status == fmt.STATUS_COMPLETE and run.steps == [0, 1, 3, 4, 6]
    for t in (0, 1, 3, 4):
        snap = run.snapshot(t)
        assert torch.equal(snap.params["0.weight"], seen[t])
        assert "0.weight" in snap.grads
    assert torch.equal(run.snapshot(6).params["0.weight"], model[0].weight.detach())


def test_a_replaced_parameter_outside_the_optimizer_is_recorded(tmp_path: Path) -> None:
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with Recorder(tmp_path / "run", model, opt) as rec:
        _step(rec, model, opt)
        model[0].bias = nn.Parameter(torch.ones_like(model[0].bias), requires_grad=False)
        _step(rec, model, opt)
    run = open_run(tmp_path / "run")
    assert torch.equal(run.snapshot(1).params["0.bias"], torch.ones(model[0].bias.shape))


def test_a_replaced_parameter_of_another_shape_is_refused(tmp_path: Path) -> None:
    model = mlp()
    opt = _sgd(model)
    with pytest.raises(RecorderError, match=r"^step 1: parameter '2.bias' of the model is a new tensor of "
                                            r"shape \(4,\) float32; it was recorded as \(3,\) float32"):
        with Recorder(tmp_path / "run", model, opt) as rec:
            _step(rec, model, opt)
            model[2].bias = new = nn.Parameter(torch.zeros(4))
            opt.param_groups[0]["params"][-1] = new  # trained, but of another shape
            _step(rec, model, opt)


# --- a model on the meta device ---------------------------------------------------------------------


def test_a_model_on_the_meta_device_is_refused_at_construction(tmp_path: Path) -> None:
    model = nn.Linear(3, 2, device="meta")
    with pytest.raises(RecorderError) as info:
        Recorder(tmp_path / "run", model, _sgd(model))
    assert str(info.value) == (
        "model: parameter 'weight' is on the meta device (a shape without data), which cannot be "
        "recorded; materialise the model first (model.to_empty(device=...) and initialise it)")
    assert not (tmp_path / "run").exists()


# --- a full disk ------------------------------------------------------------------------------------


def _usage(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())


@pytest.fixture
def disk_fills_at_step_3(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A disk that fills up while step 3 is written, and holds from then on exactly what the run
    directory holds: the snapshot write fails with ENOSPC, and a manifest fits only in room the
    recorder gives back (a write that does not fit leaves its empty temporary file, as on a real
    full disk)."""
    full: dict[str, int] = {}
    real_write = fmt.atomic_write_bytes

    def failing(real: Any) -> Any:
        def write(self: Any, image: Any) -> Path:
            if image.step == 3:
                full["capacity"] = _usage(self.path.parent if isinstance(self, HDF5Writer) else self.dir.parent)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, image)
        return write

    def atomic_write_bytes(path: Path, data: bytes) -> None:
        if "capacity" in full and _usage(path.parent) + len(data) > full["capacity"]:
            path.with_name(f".{path.name}.tmp-{os.getpid()}").touch()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(HDF5Writer, "write", failing(HDF5Writer.write))
    monkeypatch.setattr(SafetensorsWriter, "write", failing(SafetensorsWriter.write))
    monkeypatch.setattr(fmt, "atomic_write_bytes", atomic_write_bytes)
    yield


@pytest.mark.parametrize("storage", ["hdf5", "safetensors"])
@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_full_disk_ends_the_run_crashed_with_its_cause(tmp_path: Path, disk_fills_at_step_3: None,
                                                         storage: str, on_error: str) -> None:
    run_dir = tmp_path / "run"
    where = run_dir / (fmt.HDF5_FILE if storage == "hdf5" else f"{fmt.STEPS_DIR}/step_00000003.safetensors")
    message = f"{where}: writing step 3 failed ({os.strerror(errno.ENOSPC)})"
    kwargs = {"format": storage, "on_error": on_error, "async_write": False}
    if on_error == "raise":
        with pytest.raises(RecorderError, match=re.escape(message)):
            train_sgd(run_dir, steps=6, recorder_kwargs=kwargs)
    else:
        with pytest.warns(UserWarning, match=re.escape(message)):
            train_sgd(run_dir, steps=6, recorder_kwargs=kwargs)
    run = open_run(run_dir)
    assert run.status == fmt.STATUS_CRASHED and run.manifest["error"] == message
    assert run.steps == [0, 1, 2]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [fmt.RECORDING_LOCK]
    assert (run_dir / fmt.RECORDING_LOCK).stat().st_size == 0


def test_the_manifest_keeps_room_for_its_last_rewrite(tmp_path: Path) -> None:
    """While recording, the recording lock holds disk space for two manifests (given back on a full
    disk, and at close)."""
    model = mlp()
    with Recorder(tmp_path / "run", model, _sgd(model)) as rec:
        size = (tmp_path / "run" / fmt.MANIFEST).stat().st_size
        assert (tmp_path / "run" / fmt.RECORDING_LOCK).stat().st_size >= 2 * size
        _step(rec, model, rec.optimizer)
    assert (tmp_path / "run" / fmt.RECORDING_LOCK).stat().st_size == 0


def test_a_failed_close_of_the_hdf5_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    real_close = HDF5Writer.close

    def close(self: HDF5Writer) -> None:
        real_close(self)
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(self.path))

    monkeypatch.setattr(HDF5Writer, "close", close)
    with pytest.raises(RecorderError) as info:
        train_sgd(run_dir, steps=2, recorder_kwargs={"format": "hdf5"})
    message = f"{run_dir / fmt.HDF5_FILE}: closing failed ({os.strerror(errno.EIO)})"
    assert str(info.value) == message
    manifest = json.loads((run_dir / fmt.MANIFEST).read_text())
    assert manifest["status"] == fmt.STATUS_CRASHED and manifest["error"] == message
    # on_error="warn": the same failure is one warning naming the file, not silence
    message = message.replace(str(run_dir), str(tmp_path / "warned"))
    with pytest.warns(RecorderWarning, match=rf"trajscope: {re.escape(message)}; the run is marked crashed") as w:
        train_sgd(tmp_path / "warned", steps=2, recorder_kwargs={"format": "hdf5", "on_error": "warn"})
    assert sum(issubclass(x.category, RecorderWarning) for x in w) == 1
    assert json.loads((tmp_path / "warned" / fmt.MANIFEST).read_text())["status"] == fmt.STATUS_CRASHED


def test_an_in_place_convert_holds_the_run_against_a_recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While ``trajscope convert`` rewrites a run in place, it is the run's one writer: a recorder
    starting into the directory, even with ``overwrite=True``, is refused, naming the convert."""
    from support.problems import train_quadratic
    from trajscope.tools import convert

    run = tmp_path / "run"
    train_quadratic(run, steps=3)
    real = convert._write_all
    seen: list[str] = []

    def write_all(*args: Any, **kwargs: Any) -> Any:
        model = torch.nn.Linear(2, 2)
        with pytest.raises(RecorderError, match=r"\.recording\.lock: .*\(trajscope convert\)") as err:
            Recorder(run, model, torch.optim.SGD(model.parameters(), lr=0.1), overwrite=True).start()
        seen.append(str(err.value))
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "_write_all", write_all)
    convert.convert_run(run, "hdf5")
    assert seen and open_run(run).storage.kind == "hdf5"
    assert (run / ".recording.lock").read_bytes() == b""  # released, and emptied
