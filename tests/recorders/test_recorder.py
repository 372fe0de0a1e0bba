"""The recorder (trajscope.recorders.recorder): what it writes, that it never changes training, misuse, and
what recording costs (``Recorder.stats``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import trajscope
from support.problems import MLP, make_mlp, make_mlp_dropout, train_classifier
from support.recorder_objectives import (
    batches,
    dataset,
    mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    train_sgd,
    xent,
)
from trajscope.errors import RecorderError
from trajscope.recorders import Recorder

FORMATS = ["safetensors", "hdf5"]


@pytest.mark.parametrize("factory", [make_mlp, make_mlp_dropout], ids=["mlp", "mlp-dropout"])
def test_training_is_bit_identical_with_and_without_recorder(tmp_path, factory) -> None:
    plain = train_classifier(None, factory, steps=12, seed=5)
    rng_plain = torch.get_rng_state()
    recorded = train_classifier(tmp_path / "run", factory, steps=12, seed=5, every=3, window=2)
    rng_recorded = torch.get_rng_state()
    for (n, a), (_, b) in zip(plain.named_parameters(), recorded.named_parameters()):
        assert torch.equal(a, b), n
    # the recorder draws no random numbers: the global RNG stream ends in the same state
    assert torch.equal(rng_plain, rng_recorded)


def test_snapshot_round_trip(tmp_path) -> None:
    """Parameters, gradients, the batch (any nesting), loss and lr come back exactly."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8, 10)
    y = torch.randint(0, 4, (8,))
    batch = {"inputs": [x, x.to(torch.bfloat16)], "meta": (y, 3, "tag", None, 2.5)}
    with trajscope.Recorder(tmp_path / "r", model, opt) as rec:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        want_params = {n: p.detach().clone() for n, p in model.named_parameters()}
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        rec.batch(batch, loss=loss)
        opt.step()
    run = trajscope.open_run(tmp_path / "r")
    snap = run.snapshot(0)
    for n in want_params:
        assert torch.equal(snap.params[n], want_params[n])
        assert torch.equal(snap.grads[n], want_grads[n])
    got = snap.batch
    assert set(got) == {"inputs", "meta"}
    assert torch.equal(got["inputs"][0], x) and isinstance(got["inputs"], list)
    assert got["inputs"][1].dtype == torch.bfloat16 and torch.equal(got["inputs"][1], x.to(torch.bfloat16))
    assert isinstance(got["meta"], tuple) and torch.equal(got["meta"][0], y)
    assert got["meta"][1:] == (3, "tag", None, 2.5)
    assert snap.loss == float(loss.detach()) and snap.lr == [0.05] and snap.training is True
    final = run.snapshot(1)
    assert final.kind == "final" and not final.has_grad
    for n, p in model.named_parameters():
        assert torch.equal(final.params[n], p.detach())


def test_manifest_contents(tmp_path) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=3, objective="support.problems:make_mlp",
                     metadata={"note": "hi"})
    m = json.loads((tmp_path / "run" / "trajscope.json").read_text())
    assert m["format_version"] == 2 and m["status"] == "complete"
    assert m["objective"] == "support.problems:make_mlp" and m["metadata"] == {"note": "hi"}
    assert m["schedule"] == {"kind": "every", "every": 1, "window": 2}
    assert m["optimizer"]["class"] == "torch.optim.sgd.SGD"
    group = m["optimizer"]["param_groups"][0]
    assert group["lr"] == 0.1 and group["momentum"] == 0.9
    assert group["params"] == [p["name"] for p in m["params"]]
    assert {p["name"]: p["shape"] for p in m["params"]}["fc1.weight"] == [24, 10]
    assert m["num_steps"] == 3 and m["final_step"] == 3


def test_crash_marks_run_and_keeps_steps(tmp_path) -> None:
    with pytest.raises(ZeroDivisionError):
        train_classifier(tmp_path / "run", make_mlp, steps=4, crash_after=2)
    run = trajscope.open_run(tmp_path / "run")
    assert run.status == "crashed" and run.final_step is None
    assert run.steps == [0, 1] and run.pairs == [0]


def test_refuses_to_overwrite_a_run(tmp_path) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=2)
    with pytest.raises(RecorderError, match="already holds a trajscope run"):
        train_classifier(tmp_path / "run", make_mlp, steps=2)
    train_classifier(tmp_path / "run", make_mlp, steps=3, overwrite=True)
    assert trajscope.open_run(tmp_path / "run").manifest["num_steps"] == 3


def test_missing_batch_call_is_a_clear_error(tmp_path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match=r"step 0: optimizer.step\(\) was called without rec.batch"):
        with trajscope.Recorder(tmp_path / "r", model, opt):
            model(torch.randn(2, 10)).sum().backward()
            opt.step()


@pytest.mark.parametrize("kw, msg", [
    ({"every": 0}, "every=0"),
    ({"window": 1}, "window=1"),
    ({"objective": "nocolon"}, "objective='nocolon'"),
    ({"objective": lambda: None}, "module-level function"),
    ({"format": "zip"}, "format='zip'"),
])
def test_bad_arguments(tmp_path, kw, msg) -> None:
    model = MLP()
    with pytest.raises(RecorderError, match=msg):
        trajscope.Recorder(tmp_path / "r", model, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("async_write", [True, False])
def test_training_is_bit_identical_in_every_format_and_write_mode(tmp_path: Path, format: str,
                                                                  async_write: bool) -> None:
    plain = train_sgd(None, steps=5)
    recorded = train_sgd(tmp_path / "run", steps=5,
                         recorder_kwargs={"format": format, "async_write": async_write})
    for (n, a), (_, b) in zip(plain.named_parameters(), recorded.named_parameters()):
        assert torch.equal(a, b), n


def test_misuse_gives_one_clear_error(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="format='zarr': expected one of safetensors, hdf5"):
        Recorder(tmp_path / "r", model, opt, format="zarr")
    with pytest.raises(RecorderError, match="accumulation=0"):
        Recorder(tmp_path / "r", model, opt, accumulation=0)
    with pytest.raises(RecorderError, match="on_error='ignore'"):
        Recorder(tmp_path / "r", model, opt, on_error="ignore")
    with pytest.raises(RecorderError, match="batch_fn=.*module-level function"):
        Recorder(tmp_path / "r", model, opt, batch_fn=lambda ix: ix)
    rec = Recorder(tmp_path / "r", model, opt)
    with pytest.raises(RecorderError, match="outside the recorder's `with` block"):
        rec.batch((torch.ones(1),))
    with pytest.raises(RecorderError, match=r"step 0: optimizer.step\(\) was called without rec.batch"):
        with Recorder(tmp_path / "r2", model, opt):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
    assert json.loads((tmp_path / "r2" / "trajscope.json").read_text())["status"] == "crashed"
    with pytest.raises(RecorderError, match="already holds a trajscope run"):
        Recorder(tmp_path / "r2", model, opt).start()


def test_stats_account_for_every_snapshot(tmp_path: Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    with Recorder(tmp_path / "run", model, opt, every=4, window=2) as rec:
        for idx in batches(8):
            opt.zero_grad()
            xent(model, (x[idx], y[idx])).backward()
            rec.batch((x[idx], y[idx]))
            opt.step()
        rec.flush()
        stats = rec.stats
        assert stats.snapshots == 4  # steps 0, 1, 4, 5
        files = sorted((tmp_path / "run" / "steps").iterdir())
        assert stats.bytes == sum(f.stat().st_size for f in files)
        assert 0 < stats.copy_seconds <= stats.hook_seconds
        assert stats.write_seconds > 0 and stats.wait_seconds >= 0
    assert rec.stats.snapshots == 5  # + the final state at close
