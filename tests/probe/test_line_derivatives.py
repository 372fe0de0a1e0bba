"""The derivative paths of the line probe (trajscope.probe.line): forward mode (jvp), reverse mode (one
backward per α point) and ``derivatives="auto"``, which picks one per analysis
(:func:`trajscope.probe.trials.resolve_derivatives`).

Models whose ops have no forward-mode AD rule (a custom ``autograd.Function`` without ``jvp``,
``F.scaled_dot_product_attention``'s fused kernels) must analyze with no flags, and the two
paths must give the same line to rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import trajscope
from support.recorder_objectives import Rows, hf_loss, one_torch_thread  # noqa: F401
from trajscope.cli import cli
from trajscope.errors import ForwardModeError
from trajscope.recorders import Recorder

FAST: dict[str, Any] = {"progress": False, "points": 5, "margin": 0.25, "write": False}


# --- a custom autograd.Function with backward only ---------------------------------------------------


class _HandSoftplus(torch.autograd.Function):
    """softplus(x) = log(1 + eˣ) with a hand-written backward and no jvp."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.log1p(torch.exp(x))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class SoftplusNet(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 12, dtype=torch.float64)
        self.fc2 = nn.Linear(12, 3, dtype=torch.float64)
        self.custom = custom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = _HandSoftplus.apply(h) if self.custom else torch.log1p(torch.exp(h))
        return self.fc2(h)


def xent(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_custom() -> trajscope.Objective:
    return trajscope.Objective(model=SoftplusNet(custom=True), loss=xent)


def make_twin() -> trajscope.Objective:
    return trajscope.Objective(model=SoftplusNet(custom=False), loss=xent)


def _train(path: Path, model: nn.Module, objective: Any, *, lr: float, seed: int, steps: int,
           clip: float | None = None) -> Path:
    """Record ``steps`` SGD steps of ``model`` on float64 minibatches of 16 (6 features, 3 classes)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with Recorder(path, model, opt, objective=objective, every=1) as rec:
        for _ in range(steps):
            x = torch.randn(16, 6, dtype=torch.float64, generator=g)
            y = torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad()
            loss = xent(model, (x, y))
            loss.backward()
            rec.batch((x, y), loss=loss)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return path


def _train_softplus(path: Path, steps: int = 4) -> Path:
    # max norm 0.05 clips every step
    return _train(path, SoftplusNet(custom=True), make_custom, lr=0.3, seed=1, steps=steps, clip=0.05)


@pytest.fixture(scope="module")
def softplus_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_softplus(tmp_path_factory.mktemp("softplus") / "run")


def test_custom_function_reverse_matches_forward_twin(softplus_run: Path) -> None:
    rev = trajscope.analyze(softplus_run, make_custom, dtype="float64", **FAST)
    twin = trajscope.analyze(softplus_run, make_twin, dtype="float64", derivatives="forward", **FAST)
    assert rev.attrs["derivatives"] == "reverse" and twin.attrs["derivatives"] == "forward"
    assert "_HandSoftplus" in rev.attrs["derivatives_reason"]
    assert json.loads(rev.attrs["probe"])["derivatives"] == "reverse"
    for name in ("loss_line", "dloss_line"):
        np.testing.assert_allclose(rev[name].values, twin[name].values, rtol=1e-6, atol=0)
    assert float(np.abs(rev.dloss_line).min()) > 0  # a non-trivial slope was compared
    assert (rev.clip_factor.values < 1).all()
    assert float(rev.loss_replay_error.max()) <= 1e-6
    assert float(rev.grad_replay_error.max()) <= 1e-4


def test_custom_function_forward_requested_is_one_clear_error(softplus_run: Path) -> None:
    with pytest.raises(ForwardModeError) as info:
        trajscope.analyze(softplus_run, make_custom, derivatives="forward", **FAST)
    msg = str(info.value)
    assert "_HandSoftplus" in msg and "--derivatives reverse" in msg
    assert "\n" not in msg and "\\n" not in msg and "objective's loss failed" not in msg
    result = CliRunner().invoke(cli, ["analyze", str(softplus_run), "--objective",
                                      "test_line_derivatives:make_custom", "--derivatives", "forward", "-q"])
    assert result.exit_code != 0


def test_cli_auto_says_reverse(softplus_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(softplus_run, tmp_path / "run")
    result = CliRunner().invoke(cli, ["analyze", str(run), "--objective", "test_line_derivatives:make_custom",
                                      "--points", "3", "--margin", "0"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("derivatives:")]
    assert len(lines) == 1 and "reverse mode" in lines[0] and "_HandSoftplus" in lines[0]
    # persisted pairs carry the path: a forward analysis of the twin does not reuse them
    ds = trajscope.analyze(run, make_twin, derivatives="forward", progress=False, points=3, margin=0.0)
    assert ds.attrs["derivatives"] == "forward"


# --- reverse equals forward on an ordinary MLP ---------------------------------------------------------


def test_reverse_equals_forward_on_mlp(softplus_run: Path) -> None:
    fwd = trajscope.analyze(softplus_run, make_twin, dtype="float64", derivatives="forward", **FAST)
    rev = trajscope.analyze(softplus_run, make_twin, dtype="float64", derivatives="reverse", **FAST)
    assert rev.attrs["derivatives"] == "reverse" and rev.attrs["derivatives_reason"] == "requested"
    assert fwd.attrs["line_batched_fallback_pairs"] == 0
    for name in ("loss_line", "dloss_line", "loss_replay_error", "grad_replay_error"):
        np.testing.assert_allclose(rev[name].values, fwd[name].values, rtol=1e-10, atol=1e-14)


# --- a small GPT with F.scaled_dot_product_attention -----------------------------------------------------

VOCAB, CTX, EMBD = 32, 8, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(EMBD), nn.LayerNorm(EMBD)
        self.qkv, self.proj = nn.Linear(EMBD, 3 * EMBD), nn.Linear(EMBD, EMBD)
        self.mlp = nn.Sequential(nn.Linear(EMBD, 4 * EMBD), nn.GELU(), nn.Linear(4 * EMBD, EMBD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(EMBD, dim=2)
        q, k, v = (z.view(b, t, 2, c // 2).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(VOCAB, EMBD), nn.Embedding(CTX, EMBD)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(EMBD)
        self.head = nn.Linear(EMBD, VOCAB, bias=False)
        self.head.weight = self.wte.weight  # weight tying

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    idx, targets = batch
    return F.cross_entropy(model(idx).reshape(-1, VOCAB), targets.reshape(-1))


def make_gpt() -> trajscope.Objective:
    return trajscope.Objective(model=TinyGPT(), loss=gpt_loss)


def _compiled(model: nn.Module) -> nn.Module:
    """``torch.compile`` as people train: inductor where a C compiler is there, else the eager backend
    (the same OptimizedModule wrapper and ``_orig_mod.`` names, no code generation)."""
    return torch.compile(model) if shutil.which("cc") else torch.compile(model, backend="eager")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_small_gpt_with_sdpa_analyzes_with_no_flags(tmp_path: Path, compiled: bool) -> None:
    """SDPA attention, weight tying, no dropout; two micro-batches per step, clipping that rescales
    every step, and optionally torch.compile: analyzed with no flags, replay exact."""
    model = TinyGPT()
    trained = _compiled(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    with Recorder(tmp_path / "run", trained, opt, objective=make_gpt, every=1, accumulation=2) as rec:
        for _ in range(3):
            opt.zero_grad()
            for _ in range(2):  # two micro-batches per step
                idx = torch.randint(0, VOCAB, (4, CTX + 1), generator=g)
                loss = gpt_loss(trained, (idx[:, :-1], idx[:, 1:]))
                (loss / 2).backward()
                rec.batch((idx[:, :-1], idx[:, 1:]), loss=loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
    ds = trajscope.analyze(tmp_path / "run", make_gpt, **FAST)
    assert ds.sizes["step"] == 3
    assert ds.attrs["derivatives"] in ("forward (sdpa math kernel)", "reverse")
    assert (ds.clip_factor.values < 1).all()  # every step was clipped, and the clip was recorded
    assert float(ds.loss_replay_error.max()) <= 1e-6
    assert float(ds.grad_replay_error.max()) <= 1e-4


# --- a transformers GPT-2 through the HF Trainer ----------------------------------------------------------


def make_hf_gpt2() -> trajscope.Objective:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return trajscope.Objective(model=transformers.GPT2LMHeadModel(config), loss=hf_loss)


def test_hf_gpt2_default_attention_analyzes_with_no_flags(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from trajscope.recorders.hf import TrajscopeCallback

    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": (ids := torch.randint(0, 64, (12,), generator=g)), "labels": ids.clone()}
            for _ in range(16)]
    # the Trainer clips by default (max_grad_norm=1.0); 0.05 makes every step of this tiny model clip
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, max_grad_norm=0.05, max_steps=3)
    trainer = transformers.Trainer(model=make_hf_gpt2().model, args=args, train_dataset=Rows(rows),
                                   callbacks=[TrajscopeCallback(tmp_path / "run", objective=make_hf_gpt2)])
    trainer.train()
    ds = trajscope.analyze(tmp_path / "run", make_hf_gpt2, **FAST)
    assert ds.sizes["step"] == 3
    assert (ds.clip_factor.values < 1).all()
    assert float(ds.loss_replay_error.max()) <= 1e-6
    assert float(ds.grad_replay_error.max()) <= 1e-4


class BNDropNet(nn.Module):
    """BatchNorm (train mode: batch statistics) and dropout (replayed masks) on the line."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.3),
                                 nn.Linear(12, 3)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_bn_drop() -> trajscope.Objective:
    return trajscope.Objective(model=BNDropNet(), loss=xent)


def test_reverse_equals_forward_with_batchnorm_and_dropout(tmp_path: Path) -> None:
    _train(tmp_path / "run", BNDropNet(), make_bn_drop, lr=0.2, seed=4, steps=3)
    kw = dict(FAST, dtype="float64")
    fwd = trajscope.analyze(tmp_path / "run", make_bn_drop, derivatives="forward", **kw)
    rev = trajscope.analyze(tmp_path / "run", make_bn_drop, derivatives="reverse", **kw)
    assert float(rev.loss_replay_error.max()) <= 1e-12  # the dropout masks training drew
    for name in ("loss_line", "dloss_line"):
        np.testing.assert_allclose(rev[name].values, fwd[name].values, rtol=1e-10, atol=1e-14)


def test_probe_pair_forward_failure_names_the_op(softplus_run: Path) -> None:
    """A pair probed in forward mode (the driver's test skipped) fails with the same clear error,
    batched or not, and the error crosses process boundaries whole."""
    import pickle

    from trajscope.probe import ProbeSettings, probe_pair

    run = trajscope.open_run(softplus_run)
    for batched in (True, False):
        with pytest.raises(ForwardModeError) as info:
            probe_pair(make_custom(), run.snapshot(1), run.snapshot(2), ProbeSettings(batched=batched))
        msg = str(info.value)
        assert msg.startswith("step 1: ") and "_HandSoftplus" in msg and "--derivatives reverse" in msg
        assert "\n" not in msg and "\\n" not in msg
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == msg and again.what == info.value.what


def test_forward_ad_failure_reads_torch_messages() -> None:
    from trajscope.probe.line import forward_ad_failure

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError) as info:
        torch.func.jvp(lambda t: F.scaled_dot_product_attention(t, t, t, is_causal=True).sum(), (q,), (q,))
    assert forward_ad_failure(info.value) == "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert forward_ad_failure(RuntimeError("shape mismatch")) is None
    assert forward_ad_failure(ValueError("forward AD")) is None
