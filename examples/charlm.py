"""Language modelling: a small GPT-style character-level transformer trained with AdamW on the
Python standard library's own source code (text already on disk; nothing is downloaded).

The paper's third setting (GPT-2 pretraining with AdamW) at laptop scale: a two-layer, pre-norm,
causal transformer in the style of nanoGPT, trained on the characters of the ``.py`` files under
``sysconfig.get_paths()["stdlib"]``. Recording a window of two steps every ``every`` steps keeps
the run small while still giving a pair (t, t+1) to analyze at regular intervals. The findings are
the paper's questions: is the step convex along its own line (``inst_gap`` ≤ 0), does the
cumulative ``convexity_ratio`` stay positive, how often does the next batch's gradient point uphill
(``update_corr`` > 0), and how large is the instantaneous smoothness compared with what a
descent-lemma analysis at this learning rate would need?

    python examples/charlm.py            # default size
    python examples/charlm.py --small    # what the test suite runs
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

import trajscope
from _common import example_main, finish, report_and_time


@dataclass
class Config:
    """Size of the example (``--small`` shrinks it for the tests)."""

    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    every: int = 50  # record steps t, t+1 for every t divisible by 50
    text_chars: int = 1_000_000  # characters of standard-library source to train on
    seed: int = 0
    points: int = 9  # analysis grid: points on [0, 1], plus a margin on both sides
    margin: float = 0.5


SMALL = Config(steps=60, warmup=10, every=10, text_chars=200_000, points=5, margin=0.25)


@dataclass(frozen=True)
class GPTConfig:
    """The architecture (module constants, so the analyzer's objective rebuilds the same model)."""

    vocab_size: int = 98  # tab, newline, printable ASCII 32..126, and one "other" symbol
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


GPT_CONFIG = GPTConfig()


# --- data: characters of the standard library's Python sources --------------------------------

def encode(text: str) -> torch.Tensor:
    """Fixed character map (no vocabulary file to ship): 0 tab, 1 newline, 2..96 printable ASCII,
    97 anything else."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.full(codes.shape, 97, dtype=np.int64)
    ids[codes == 9] = 0
    ids[codes == 10] = 1
    printable = (codes >= 32) & (codes <= 126)
    ids[printable] = codes[printable] - 30
    return torch.from_numpy(ids)


def load_text(n_chars: int) -> torch.Tensor:
    """The first ``n_chars`` characters of the stdlib's top-level ``.py`` files, in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            text = (root / name).read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            total += len(text)
            if total >= n_chars:
                break
    return encode("".join(parts)[:n_chars])


def get_batch(data: torch.Tensor, cfg: Config, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``block_size`` characters; the targets are the inputs shifted by one."""
    t = GPT_CONFIG.block_size
    ix = torch.randint(len(data) - t - 1, (cfg.batch_size,), generator=gen)
    x = torch.stack([data[i : i + t] for i in ix])
    y = torch.stack([data[i + 1 : i + t + 1] for i in ix])
    return x, y


# --- model: a minimal GPT ---------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t only sees positions ≤ t."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        # explicit causal attention (not scaled_dot_product_attention): forward-mode AD and vmap,
        # which the analyzer's line probe uses, support every op here on every backend
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.n_head)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(c.n_embd)
        self.attn = CausalSelfAttention(c)
        self.ln2 = nn.LayerNorm(c.n_embd)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(), nn.Linear(4 * c.n_embd, c.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token and position embeddings, the blocks, a final LayerNorm and the logits head."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos = nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.head = nn.Linear(c.n_embd, c.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln_f(self.blocks(h)))


def make_objective() -> trajscope.Objective:
    """The GPT skeleton and the mean next-character cross-entropy (nats per character)."""
    torch.manual_seed(0)
    model = GPT(GPT_CONFIG)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return trajscope.Objective(model=model, loss=loss)


def train(run_dir: Path, cfg: Config, data: torch.Tensor) -> list[float]:
    """AdamW with linear warmup then cosine decay (the pretraining recipe, scaled down)."""
    obj = make_objective()
    model = obj.model
    # nanoGPT's split: weight decay on matrices, none on biases, LayerNorm gains and embeddings
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok" not in n and "pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "tok" not in n and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    with trajscope.Recorder(run_dir, model, opt, objective=make_objective, every=cfg.every, window=2,
                            overwrite=True, metadata={"example": "charlm"}) as rec:
        for step in range(cfg.steps):
            warm = (step + 1) / cfg.warmup
            cos = 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (warm if step < cfg.warmup else 0.1 + 0.9 * cos)
            batch = get_batch(data, cfg, gen)
            opt.zero_grad()
            loss = obj.loss(model, batch)
            loss.backward()
            rec.batch(batch, loss=loss)
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def findings(ds: xr.Dataset, losses: list[float]) -> dict[str, float]:
    gap, uc = ds["inst_gap"].values, ds["update_corr"].values
    ratio = ds["inst_smoothness"].values * ds["lr"].values / 2  # metrics.md: stability_ratio
    k = max(1, len(losses) // 10)
    return {
        "pairs": int(ds.sizes["step"]),
        "loss_first_tenth": float(np.mean(losses[:k])),
        "loss_last_tenth": float(np.mean(losses[-k:])),
        "frac_inst_gap_le_0": float(np.mean(gap <= 0)),
        "final_convexity_ratio": float(ds["convexity_ratio"].values[-1]),
        "min_convexity_ratio": float(np.nanmin(ds["convexity_ratio"].values)),
        "frac_update_corr_gt_0": float(np.mean(uc[np.isfinite(uc)] > 0)),
        "frac_loss_change_lt_0": float(np.mean(ds["loss_change"].values < 0)),
        "median_inst_smoothness": float(np.median(ds["inst_smoothness"].values)),
        # one modest L for the whole run? the spread of inst_smoothness along the path
        "max_over_min_inst_smoothness": float(np.max(ds["inst_smoothness"].values)
                                              / np.min(ds["inst_smoothness"].values)),
        "median_stability_ratio": float(np.median(ratio)),
        "max_loss_replay_error": float(np.nanmax(ds["loss_replay_error"].values)),
        "max_grad_replay_error": float(np.nanmax(ds["grad_replay_error"].values)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, analyze, report; print and return the findings."""
    return example_main(argv, doc=__doc__, name="charlm", run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The example proper: record, analyze, report, print the findings."""
    cfg = SMALL if args.small else Config()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = load_text(cfg.text_chars)
    run_dir = args.out / "adamw"
    losses = train(run_dir, cfg, data)
    ds = trajscope.analyze(run_dir, make_objective, points=cfg.points, margin=cfg.margin, progress=False)
    results: dict[str, Any] = {"config": asdict(cfg), "adamw": findings(ds, losses)}
    report_and_time(args, results, [run_dir], t0)

    r = results["adamw"]
    print(f"charlm: {GPT_CONFIG.n_layer}-layer GPT, {sum(p.numel() for p in make_objective().model.parameters()):,} "
          f"parameters, AdamW, {len(data):,} characters of stdlib source")
    print(f"  loss {r['loss_first_tenth']:.3f} -> {r['loss_last_tenth']:.3f} nats/char over {cfg.steps} steps; "
          f"{r['pairs']} pairs analyzed")
    print(f"  inst_gap<=0: {r['frac_inst_gap_le_0']:.1%}  convexity_ratio final={r['final_convexity_ratio']:.3f} "
          f"(min {r['min_convexity_ratio']:.3f})  update_corr>0: {r['frac_update_corr_gt_0']:.1%}  "
          f"loss_change<0: {r['frac_loss_change_lt_0']:.1%}")
    print(f"  median inst_smoothness={r['median_inst_smoothness']:.3g} (max/min over the run "
          f"{r['max_over_min_inst_smoothness']:.3g})  median inst_smoothness·lr/2="
          f"{r['median_stability_ratio']:.3g}  replay err loss/grad={r['max_loss_replay_error']:.1e}/"
          f"{r['max_grad_replay_error']:.1e}")
    return finish(args, results)


if __name__ == "__main__":
    main()
