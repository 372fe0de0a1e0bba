"""The recorder: what it writes, and that it never changes training."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from problems import MLP, make_mlp, make_mlp_dropout, train_classifier

import trajscope
from trajscope.errors import RecorderError


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


def test_schedule_every_window(tmp_path) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=23, every=10, window=3)
    run = trajscope.open_run(tmp_path / "run")
    assert run.steps == [0, 1, 2, 10, 11, 12, 20, 21, 22, 23]  # + final state x_23
    assert run.pairs == [0, 1, 10, 11, 20, 21, 22]
    assert run.final_step == 23 and run.status == "complete"
    lines = [json.loads(l) for l in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(23))
    assert [l["step"] for l in lines if l["recorded"]] == [0, 1, 2, 10, 11, 12, 20, 21, 22]
    assert all(np.isfinite(l["loss"]) and l["lr"] == [0.1] and not l["skipped"] for l in lines)


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
    train_classifier(tmp_path / "run", make_mlp, steps=3, objective="problems:make_mlp",
                     metadata={"note": "hi"})
    m = json.loads((tmp_path / "run" / "trajscope.json").read_text())
    assert m["format_version"] == 2 and m["status"] == "complete"
    assert m["objective"] == "problems:make_mlp" and m["metadata"] == {"note": "hi"}
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


def test_recorders_import_is_light() -> None:
    code = (
        "import sys, trajscope.recorders, trajscope\n"
        "trajscope.Recorder\n"
        "heavy = sorted(m for m in sys.modules\n"
        "               if m.split('.')[0] in ('dask', 'xarray', 'h5py', 'distributed', 'matplotlib'))\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
