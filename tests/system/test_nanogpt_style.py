"""The nanoGPT integration of README.md and docs/recording.md works as printed.

A training loop with the structure of nanoGPT's ``train.py`` (a ``while True:`` loop, periodic
evaluation under ``no_grad``, gradient accumulation with the loss divided by the number of
micro-batches and the next batch prefetched before ``backward``, a disabled ``GradScaler``,
``clip_grad_norm_``, ``torch.compile``), a GPT in the style of nanoGPT's ``model.py`` (tied
embedding and head weights, ``scaled_dot_product_attention(..., is_causal=True)``, ``forward``
returning ``(logits, loss)``), and exactly the documented added lines (marked ``# +``). Then
``trajscope analyze`` on the result.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import trajscope
from trajscope.cli import cli
from trajscope.recorders import Recorder  # +

# nanoGPT's configuration: module globals, collected into ``config`` for logging
batch_size, block_size, vocab_size = 4, 16, 65
n_layer, n_head, n_embd, dropout, bias = 1, 2, 16, 0.0, False
gradient_accumulation_steps = 2
learning_rate, max_iters, warmup_iters, min_lr = 1e-2, 6, 2, 1e-3
weight_decay, beta1, beta2, grad_clip = 0.1, 0.9, 0.95, 1.0
eval_interval, eval_iters = 3, 2
config = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


# --- model.py (condensed) -----------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(n_embd, dim=2)
        q, k, v = (z.view(b, t, n_head, c // n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if self.training else 0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """nanoGPT's ``transformer`` ModuleDict, with attributes typed for mypy (same parameter names)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block() for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = Transformer()
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def make_objective() -> trajscope.Objective:
    """The objective module the snippet names: the same GPT, and the loss ``model(X, Y)`` returns."""
    torch.manual_seed(1)
    return trajscope.Objective(model=GPT(), loss=lambda m, b: m(*b)[1])


# --- train.py (condensed; the added lines are marked "# +") --------------------------------------

def train(out_dir: Path, compile_backend: str) -> None:
    torch.manual_seed(1337)
    data = torch.randint(vocab_size, (4000,), generator=torch.Generator().manual_seed(0))

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([data[i:i + block_size] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
        return x, y

    def get_lr(it: int) -> float:
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        ratio = (it - warmup_iters) / (max_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    @torch.no_grad()
    def estimate_loss() -> float:
        model.eval()
        losses = [model(*get_batch())[1].item() for _ in range(eval_iters)]
        model.train()
        return sum(losses) / len(losses)

    ctx = nullcontext()  # nanoGPT: autocast on CUDA, nullcontext on the CPU
    model = GPT()
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # nanoGPT: enabled only for float16
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2),
                                  weight_decay=weight_decay)
    model = torch.compile(model, backend=compile_backend)  # type: ignore[assignment]
    X, Y = get_batch()
    iter_num = 0
    rec = Recorder(out_dir / "trajscope", model, optimizer, objective="test_nanogpt_style:make_objective",  # +
                   every=3, accumulation=gradient_accumulation_steps, metadata={"config": config}).start()  # +
    while True:
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if iter_num % eval_interval == 0:
            estimate_loss()
        for _micro_step in range(gradient_accumulation_steps):
            with ctx:
                logits, loss = model(X, Y)
                rec.batch((X, Y), loss=loss)  # +
                loss = loss / gradient_accumulation_steps
            X, Y = get_batch()
            scaler.scale(loss).backward()
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        if iter_num > max_iters:
            break
    rec.close()  # +


def test_the_documented_nanogpt_lines_record_an_analyzable_run(tmp_path: Path) -> None:
    # backend="eager": the compiled wrapper and dynamo without a C compiler (inductor is the slow
    # charlm example's test)
    train(tmp_path, compile_backend="eager")
    run_dir = tmp_path / "trajscope"
    res = CliRunner().invoke(cli, ["analyze", str(run_dir), "--points", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    ds = trajscope.open_metrics(run_dir)
    # every=3, window=2 over iterations 0..max_iters: pairs (0, 1), (3, 4), (6, 7)
    assert list(ds["step"].values) == [0, 3, 6]
    run = trajscope.open_run(run_dir)
    assert run.manifest["metadata"]["config"]["gradient_accumulation_steps"] == 2
    assert len(run.snapshot(0).batch) == gradient_accumulation_steps
    # the replay reproduces the loss and gradient of each step's accumulated micro-batches (the
    # gradient norm stays under grad_clip here: no recorded step is clipped)
    assert float(ds["loss_replay_error"].max()) < 1e-5
    assert float(ds["grad_replay_error"].max()) < 1e-5
    assert float(ds["grad_norm"].max()) < grad_clip
