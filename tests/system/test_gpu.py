"""CUDA: recording a model on the GPU and analyzing on the GPU give the CPU's answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trajscope
from conftest import requires_cuda
from support.problems import MLP, ce_loss, classification_data, classifier_run
from support.recording import record

pytestmark = [requires_cuda, pytest.mark.gpu]


def test_analysis_on_cuda_matches_cpu(tmp_path) -> None:
    classifier_run(tmp_path / "run", steps=6)
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
    batches = [(X[i * 16:(i + 1) * 16], Y[i * 16:(i + 1) * 16]) for i in range(4)]
    record(tmp_path / "run", model, opt, ce_loss, batches, objective="support.problems:make_mlp")
    run = trajscope.open_run(tmp_path / "run")
    snap = run.snapshot(3)
    assert snap.params["fc1.weight"].device.type == "cpu"
    assert torch.equal(run.snapshot(4).params["out.bias"], model.out.bias.detach().cpu())
    assert "cuda0" in snap.rng
    ds = trajscope.analyze(tmp_path / "run", device="cuda", write=False, progress=False)
    assert float(ds.loss_replay_error.max()) < 1e-5
    assert float(ds.grad_replay_error.max()) < 1e-4
