"""CUDA: recording a model on the GPU and analyzing on the GPU give the CPU's answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from problems import MLP, classification_data, make_mlp, train_classifier

import trajscope

pytestmark = [requires_cuda, pytest.mark.gpu]


def test_analysis_on_cuda_matches_cpu(tmp_path) -> None:
    train_classifier(tmp_path / "run", make_mlp, steps=6, objective="problems:make_mlp")
    cpu = trajscope.analyze(tmp_path / "run", device="cpu", dtype="float64", write=False, progress=False)
    gpu = trajscope.analyze(tmp_path / "run", device="cuda", dtype="float64", write=False, progress=False)
    assert gpu.attrs["device"] == "cuda"
    for name in cpu.data_vars:
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-6,
                                   atol=1e-9 * max(1.0, float(np.nanmax(np.abs(cpu[name].values)))),
                                   err_msg=name)


def test_recording_a_cuda_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = MLP().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X, Y = classification_data()
    X, Y = X.cuda(), Y.cuda()
    with trajscope.Recorder(tmp_path / "run", model, opt, objective="problems:make_mlp") as rec:
        for i in range(4):
            batch = (X[i * 16:(i + 1) * 16], Y[i * 16:(i + 1) * 16])
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
            loss.backward()
            rec.batch(batch, loss=loss)
            opt.step()
    run = trajscope.open_run(tmp_path / "run")
    snap = run.snapshot(3)
    assert snap.params["fc1.weight"].device.type == "cpu"
    assert torch.equal(run.snapshot(4).params["out.bias"], model.out.bias.detach().cpu())
    assert "cuda0" in snap.rng
    ds = trajscope.analyze(tmp_path / "run", device="cuda", write=False, progress=False)
    assert float(ds.loss_replay_error.max()) < 1e-5
    assert float(ds.grad_replay_error.max()) < 1e-4
