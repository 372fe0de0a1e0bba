"""The Recorder's argument checks (trajscope.recorders.arguments): optimizers wrapped by accelerate or
Lightning are recorded through the torch optimizer inside them (recorded and replayed with real
accelerate), an optimizer that cannot be hooked fails with one message naming what to pass, and a
model compiled by inductor with dropout is recognised (real torch.compile)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F

import trajscope
from support.recorder_objectives import (
    batches,
    dataset,
    mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    xent_bf16,
)
from trajscope.errors import RecorderError
from trajscope.recorders import Recorder
from trajscope.recorders.arguments import (
    check_arguments,
    compiled_dropout_warning,
    unwrap_optimizer,
    wrapped_grad_scaler,
)
from trajscope.store.run import open_run

FAST: dict[str, Any] = {"progress": False, "points": 3, "margin": 0.0}
FALLBACK = "torch._inductor.config.fallback_random = True before the first compiled call"
# torch.compile's first use loads modules that define TorchScript methods (torch internals)
COMPILE_IMPORTS = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


class Unhookable(torch.optim.Optimizer):
    """A wrapper that subclasses torch's Optimizer without running its ``__init__`` (as accelerate's
    does) and holds its optimizer under a name the recorder does not know."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.wrapped = inner


def _check(optimizer: Any) -> torch.optim.Optimizer:
    return check_arguments(mlp(), optimizer, "safetensors", 1, "mean", "raise", 2)


@pytest.fixture
def accelerate_state() -> Iterator[Any]:
    """accelerate's module (its process-wide singletons reset before and after the test)."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield accelerate
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# --- wrapped optimizers ----------------------------------------------------------------------------


def make_mlp_dropout_bf16() -> trajscope.Objective:
    """The MLP with dropout under CPU bf16 autocast, as accelerate's ``mixed_precision="bf16"`` runs it."""
    return trajscope.Objective(model=mlp(dropout=0.3), loss=xent_bf16)


def test_accelerate_prepared_model_and_optimizer_record_and_replay(tmp_path: Path, accelerate_state: Any) -> None:
    """``Accelerator.prepare`` on the CPU returns the model itself (its forward wrapped in autocast)
    and an AcceleratedOptimizer, whose step calls the torch optimizer's only when an accumulation
    ends: the recorder hooks that one and counts the 4 real steps of 8 micro-batches."""
    model = make_mlp_dropout_bf16().model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    accelerator = accelerate_state.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    prepared, wrapped = accelerator.prepare(model, opt)
    assert prepared is model and type(wrapped).__name__ == "AcceleratedOptimizer"
    assert unwrap_optimizer(wrapped) is opt and wrapped_grad_scaler(wrapped) is None  # bf16: no scaler
    x, y = dataset()
    with Recorder(tmp_path / "run", prepared, wrapped, objective=make_mlp_dropout_bf16, accumulation=2) as rec:
        assert rec.optimizer is opt
        for idx in batches(8, size=16):
            with accelerator.accumulate(prepared):
                loss = F.cross_entropy(prepared(x[idx]), y[idx])
                accelerator.backward(loss)
                rec.batch((x[idx], y[idx]), loss=loss)
                wrapped.step()
                wrapped.zero_grad()
        assert rec.step == 4
    run = open_run(tmp_path / "run")
    assert run.status == "complete" and run.steps == [0, 1, 2, 3, 4]
    assert run.snapshot(0).micro_weights == [0.5, 0.5]
    ds = trajscope.analyze(tmp_path / "run", make_mlp_dropout_bf16, **FAST)
    assert float(ds.loss_replay_error.max()) <= 1e-6  # the dropout masks and bf16 autocast replayed
    assert float(ds.grad_replay_error.max()) <= 1e-4


def test_wrappers_are_looked_through_and_their_scaler_found(accelerate_state: Any) -> None:
    from accelerate.optimizer import AcceleratedOptimizer
    from lightning.pytorch.core.optimizer import LightningOptimizer

    opt = torch.optim.Adam(mlp().parameters(), lr=1e-3)
    lightning = LightningOptimizer(opt)
    assert isinstance(lightning, torch.optim.Adam)  # Lightning imitates the class it wraps
    assert unwrap_optimizer(lightning) is opt and _check(lightning) is opt
    accelerate_state.Accelerator(cpu=True)
    scaler = torch.amp.GradScaler("cpu")
    nested = AcceleratedOptimizer(LightningOptimizer(opt), device_placement=False, scaler=scaler)
    assert unwrap_optimizer(nested) is opt and _check(nested) is opt
    assert wrapped_grad_scaler(nested) is scaler
    assert unwrap_optimizer(opt) is opt and wrapped_grad_scaler(opt) is None


def test_an_optimizer_without_step_hooks_fails_with_one_message(tmp_path: Path) -> None:
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(RecorderError) as exc:
        Recorder(tmp_path / "run", mlp(), Unhookable(opt))
    assert str(exc.value) == (
        "optimizer: Unhookable has no optimizer step hooks; pass the torch.optim.Optimizer it wraps"
    )
    assert not (tmp_path / "run").exists()

    class Outer:
        def __init__(self, inner: Any) -> None:
            self.optimizer = inner

    with pytest.raises(RecorderError) as exc:
        unwrap_optimizer(Outer(Unhookable(opt)))
    assert str(exc.value) == (
        "optimizer: Outer wraps a Unhookable, which has no optimizer step hooks; pass the "
        "torch.optim.Optimizer that Unhookable wraps"
    )
    with pytest.raises(RecorderError) as exc:
        _check("sgd")
    assert str(exc.value) == "optimizer: expected a torch.optim.Optimizer, got str"


# --- compiled dropout --------------------------------------------------------------------------------


class Attention(torch.nn.Module):
    """nanoGPT's way: the dropout probability kept as a float and passed to SDPA as ``dropout_p``."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)


@COMPILE_IMPORTS
def test_compiled_dropout_warning_names_the_setting() -> None:
    """Only compiling (not running) here: whether inductor would draw the masks itself."""
    import torch._inductor.config as inductor_config

    assert not inductor_config.fallback_random  # the default this test is about
    compiled = cast(torch.nn.Module, torch.compile(mlp(dropout=0.3)))
    message = compiled_dropout_warning(compiled)
    assert message == (
        "model: compiled with torch.compile (inductor) and has dropout (module '2', p=0.3); inductor draws "
        "its dropout masks from its own generator, which the analysis cannot replay: set "
        f"{FALLBACK}"
    )
    attention = torch.nn.Sequential(torch.nn.Linear(8, 8), Attention(0.1))
    attention.compile()  # compiled in place: no OptimizedModule wrapper
    assert "(module '1', p=0.1)" in (compiled_dropout_warning(attention) or "")
    outer = torch.nn.Sequential(cast(torch.nn.Module, torch.compile(Attention(0.2))), torch.nn.Linear(8, 8))
    assert "(module '0', p=0.2)" in (compiled_dropout_warning(outer) or "")

    assert compiled_dropout_warning(mlp(dropout=0.3)) is None  # not compiled
    assert compiled_dropout_warning(cast(torch.nn.Module, torch.compile(mlp()))) is None  # no dropout
    assert compiled_dropout_warning(cast(torch.nn.Module, torch.compile(Attention(0.0)))) is None
    # backends that run torch's own dropout draw from the generator the recorder captures
    assert compiled_dropout_warning(cast(torch.nn.Module, torch.compile(mlp(dropout=0.3), backend="eager"))) is None
    assert compiled_dropout_warning(
        cast(torch.nn.Module, torch.compile(mlp(dropout=0.3), backend="aot_eager"))) is None
    optioned = torch.compile(mlp(dropout=0.3), options={"fallback_random": True})
    assert compiled_dropout_warning(cast(torch.nn.Module, optioned)) is None
    with inductor_config.patch(fallback_random=True):  # set globally, after torch.compile
        assert compiled_dropout_warning(compiled) is None


def _dropout_masks(model: torch.nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropout mask of a training forward from torch's generator at ``seed``, and the gradient."""
    torch.manual_seed(seed)
    layer = cast(torch.nn.Linear, model.get_submodule("0"))
    layer.zero_grad()
    out = model(torch.ones(16, 8))
    out.sum().backward()
    assert layer.weight.grad is not None
    return out == 0, layer.weight.grad.clone()


@pytest.mark.slow
@COMPILE_IMPORTS
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_inductor_dropout_replays_only_with_fallback_random() -> None:
    """The masks of a compiled training step equal eager's from the same RNG state exactly when
    ``fallback_random`` is set (what the replay needs); without it they differ, and the warning says so."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))
    eager_mask, eager_grad = _dropout_masks(model, seed=5)
    assert 0 < int(eager_mask.sum()) < eager_mask.numel()
    # dynamo reuses a graph compiled for the same code under an equal backend, whatever the global
    # inductor config was: reset it so each compile below really compiles
    torch._dynamo.reset()
    try:
        with inductor_config.patch(fallback_random=True):
            replayable = cast(torch.nn.Module, torch.compile(model))
            assert compiled_dropout_warning(replayable) is None
            mask, grad = _dropout_masks(replayable, seed=5)
        assert torch.equal(mask, eager_mask)
        torch.testing.assert_close(grad, eager_grad)
        torch._dynamo.reset()
        own_rng = cast(torch.nn.Module, torch.compile(model))
        assert FALLBACK in (compiled_dropout_warning(own_rng) or "")
        mask, _ = _dropout_masks(own_rng, seed=5)
        assert not torch.equal(mask, eager_mask)
    finally:
        torch._dynamo.reset()
