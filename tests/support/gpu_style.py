"""Six small training programs written the way GPU training is written, run on the CPU, and their
objectives (importable by name: ``"support.gpu_style:make_cnn"``).

CPU autocast stands in for CUDA autocast. Each program trains a few optimizer steps, every one
recorded (``every=1``, ``window=2``), and its objective is what a user would write: the model built
as training builds it and the plain loss, with **no** autocast, no ``memory_format`` conversion and
no RNG handling inside: reproducing training's numerics ("as trained") is the analyzer's job.

* :func:`train_cnn`: conv + BatchNorm CNN in ``channels_last`` under bf16 autocast, SGD with
  momentum and weight decay, an EMA copy (``AveragedModel``) updated every step.
* :func:`train_gpt`: a nanoGPT-style GPT (SDPA dropout, dropout 0.1), bf16 autocast,
  ``torch.compile`` (inductor, ``fallback_random``), 2 micro-batches per step with the next one
  drawn from the global RNG between them, ``clip_grad_norm_`` that clips every step.
* :func:`train_hf_gpt2`: the Hugging Face ``Trainer`` (bf16, accumulation 2, clipping) on a tiny
  GPT-2 built from its config, recorded by :class:`trajscope.recorders.hf.TrajscopeCallback`.
* :func:`train_lightning`: Lightning ``precision="bf16-mixed"``, clipping, accumulation 2, recorded
  by :class:`trajscope.recorders.lightning.TrajscopeCallback`.
* :func:`train_accelerate`: an ``accelerate`` loop (``mixed_precision="bf16"``) with the prepared
  model and optimizer handed to the ``Recorder``.
* :func:`train_fp16_scaler`: fp16 autocast with ``GradScaler("cpu")``, unscale, clip, step.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import trajscope
from support.recorder_objectives import Rows
from trajscope.recorders import Recorder

STEPS = 5
"""Optimizer steps per program (all recorded: STEPS pairs)."""


def _data(n: int, shape: tuple[int, ...], classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def xent(model: nn.Module, batch: Any) -> torch.Tensor:
    """The plain classification loss (no autocast: the analyzer applies training's)."""
    x, y = batch
    return F.cross_entropy(model(x), y)


# --- 1. channels_last CNN, BatchNorm, bf16 autocast, SGD momentum + weight decay, EMA ---------------


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cnn() -> CNN:
    torch.manual_seed(0)
    return CNN()


def make_cnn() -> trajscope.Objective:
    """The CNN as built (contiguous: the recorded tensors carry training's layout) and the plain loss."""
    return trajscope.Objective(model=cnn(), loss=xent)


def train_cnn(run_dir: Path, steps: int = STEPS) -> dict[str, Any]:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = cnn().to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x_all, y_all = _data(128, (3, 8, 8), 10, seed=11)
    g = torch.Generator().manual_seed(12)
    model.train()
    with Recorder(run_dir, model, opt, objective="support.gpu_style:make_cnn", every=1, window=2) as rec:
        for _ in range(steps):
            idx = torch.randint(0, len(x_all), (16,), generator=g)
            x = x_all[idx].to(memory_format=torch.channels_last)
            y = y_all[idx]
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.batch((x, y), loss=loss)
            opt.step()
            ema.update_parameters(model)
    return {"channels_last": model.conv1.weight.is_contiguous(memory_format=torch.channels_last),
            "ema_updates": int(ema.n_averaged)}


# --- 2. nanoGPT-style GPT, bf16, torch.compile, accumulation with global-RNG batches, clipping ------

VOCAB, BLOCK, N_LAYER, N_HEAD, N_EMBD, DROPOUT = 64, 16, 2, 2, 32, 0.1
GPT_MICRO, GPT_BATCH, GPT_CLIP = 2, 4, 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.resid_dropout = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(N_EMBD, dim=2)
        q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class Block(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(N_EMBD, bias=False)
        self.attn = CausalSelfAttention(dropout)
        self.ln_2 = nn.LayerNorm(N_EMBD, bias=False)
        self.mlp = nn.Sequential(nn.Linear(N_EMBD, 4 * N_EMBD, bias=False), nn.GELU(),
                                 nn.Linear(4 * N_EMBD, N_EMBD, bias=False), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, N_EMBD)
        self.wpe = nn.Embedding(BLOCK, N_EMBD)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([Block(dropout) for _ in range(N_LAYER)])
        self.ln_f = nn.LayerNorm(N_EMBD, bias=False)


class GPT(nn.Module):
    def __init__(self, dropout: float = DROPOUT) -> None:
        super().__init__()
        self.transformer = Transformer(dropout)
        self.lm_head = nn.Linear(N_EMBD, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def gpt(dropout: float = DROPOUT) -> GPT:
    torch.manual_seed(1)
    return GPT(dropout)


def gpt_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(*batch)[1]


def make_gpt() -> trajscope.Objective:
    return trajscope.Objective(model=gpt(), loss=gpt_loss)


def make_gpt_no_dropout() -> trajscope.Objective:
    """nanoGPT's pretraining default, ``dropout = 0.0``: attention then runs a fused SDPA kernel."""
    return trajscope.Objective(model=gpt(0.0), loss=gpt_loss)


def train_gpt(run_dir: Path, steps: int = STEPS, backend: str = "inductor", dropout: float = DROPOUT
              ) -> dict[str, Any]:
    """nanoGPT's loop: ``get_batch`` draws from the global RNG, so the second micro-batch's indices
    are drawn between the micro-batches' forward passes (after the first one's backward)."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    torch.manual_seed(1337)
    data = torch.randint(VOCAB, (2000,), generator=torch.Generator().manual_seed(0))

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - BLOCK, (GPT_BATCH,))
        x = torch.stack([data[i:i + BLOCK] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + BLOCK] for i in ix])
        return x, y

    preclip: list[float] = []
    # set before compiling, as the record-time warning tells users to
    with torch._inductor.config.patch(fallback_random=True):
        model = gpt(dropout)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        cmodel = torch.compile(model, backend=backend)
        objective = "support.gpu_style:" + ("make_gpt" if dropout else "make_gpt_no_dropout")
        try:
            with Recorder(run_dir, cmodel, opt, objective=objective, every=1, window=2,
                          accumulation=GPT_MICRO) as rec:
                for _ in range(steps):
                    for _micro in range(GPT_MICRO):
                        x, y = get_batch()
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            _, loss = cmodel(x, y)
                        rec.batch((x, y), loss=loss)
                        (loss / GPT_MICRO).backward()
                    preclip.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), GPT_CLIP)))
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        finally:
            torch._dynamo.reset()
    return {"preclip_norms": preclip}


# --- 3. Hugging Face Trainer, bf16, accumulation 2, clipping, tiny GPT-2 ----------------------------


def gpt2() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)  # default dropouts (0.1)


def hf_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(**batch)["loss"]


def make_hf_gpt2() -> trajscope.Objective:
    return trajscope.Objective(model=gpt2(), loss=hf_loss)


def train_hf_gpt2(run_dir: Path, out_dir: Path, steps: int = 4) -> dict[str, Any]:
    import transformers

    from trajscope.recorders.hf import TrajscopeCallback

    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(64):
        ids = torch.randint(0, 64, (16,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), bf16=True, use_cpu=True, gradient_accumulation_steps=2, max_grad_norm=1.0,
        max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = transformers.Trainer(
        model=gpt2(), args=args, train_dataset=Rows(rows),
        callbacks=[TrajscopeCallback(run_dir, objective="support.gpu_style:make_hf_gpt2", every=1, window=2)],
    )
    trainer.train()
    return {}


# --- 4. Lightning, bf16-mixed, clipping, accumulation 2 ----------------------------------------------


@functools.cache
def _lit_net_class() -> type:
    """The LightningModule, defined on first use (importing Lightning costs seconds)."""
    import lightning.pytorch as pl

    class LitNet(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)

    return LitNet


def mlp(n_in: int = 8, n_out: int = 3, dropout: float = 0.1, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, n_out))


def lit_net() -> nn.Module:
    module: nn.Module = _lit_net_class()()
    return module


def lit_step_loss(model: Any, batch: Any) -> torch.Tensor:
    return model.training_step(batch, 0)


def make_lit() -> trajscope.Objective:
    return trajscope.Objective(model=lit_net(), loss=lit_step_loss)


def train_lightning(run_dir: Path, root: Path, steps: int = 4) -> dict[str, Any]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from trajscope.recorders.lightning import TrajscopeCallback

    x, y = _data(256, (8,), 3, seed=5)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(precision="bf16-mixed", gradient_clip_val=0.05, accumulate_grad_batches=2,
                         accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         callbacks=[TrajscopeCallback(run_dir, objective="support.gpu_style:make_lit",
                                                      every=1, window=2)])
    torch.manual_seed(0)
    trainer.fit(lit_net(), loader)
    return {}


# --- 5. accelerate, bf16, the prepared model and optimizer recorded ---------------------------------


def make_accel_mlp() -> trajscope.Objective:
    return trajscope.Objective(model=mlp(seed=2), loss=xent)


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons (the Trainer creates them too)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_accelerate(run_dir: Path, steps: int = STEPS) -> dict[str, Any]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = mlp(seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    x_all, y_all = _data(128, (8,), 3, seed=6)
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(8)
    model.train()
    with Recorder(run_dir, model, opt, objective="support.gpu_style:make_accel_mlp", every=1, window=2) as rec:
        for _ in range(steps):
            idx = torch.randint(0, len(x_all), (16,), generator=g)
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            rec.batch((x, y), loss=loss)
            opt.step()
    return {}


# --- 6. fp16 autocast with GradScaler: unscale, clip, step --------------------------------------------

FP16_CLIP = 0.5


def make_fp16_mlp() -> trajscope.Objective:
    return trajscope.Objective(model=mlp(seed=4), loss=xent)


def train_fp16_scaler(run_dir: Path, steps: int = STEPS) -> dict[str, Any]:
    model = mlp(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x_all, y_all = _data(128, (8,), 3, seed=9)
    g = torch.Generator().manual_seed(10)
    torch.manual_seed(11)
    preclip: list[float] = []
    skipped: list[bool] = []
    model.train()
    with Recorder(run_dir, model, opt, objective="support.gpu_style:make_fp16_mlp", every=1, window=2,
                  grad_scaler=scaler) as rec:
        for _ in range(steps):
            idx = torch.randint(0, len(x_all), (16,), generator=g)
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            rec.batch((x, y), loss=loss)
            scaler.unscale_(opt)
            preclip.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), FP16_CLIP)))
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped.append(scaler.get_scale() < scale)
    return {"preclip_norms": preclip, "skipped": skipped}

