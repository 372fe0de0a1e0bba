"""Language modelling: a small GPT-style character-level transformer trained with AdamW on the
Python standard library's own source code (text already on disk; nothing is downloaded).

The paper's third setting (GPT-2 pretraining with AdamW) at laptop scale: a two-layer, pre-norm,
causal transformer in the style of nanoGPT, trained on the characters of the ``.py`` files under
``sysconfig.get_paths()["stdlib"]``. It trains the way such models are trained: attention through
``F.scaled_dot_product_attention(..., is_causal=True)``, the model wrapped in ``torch.compile``
(when a C compiler is on the PATH; ``--no-compile`` runs eager), and the gradient clipped to norm
``--clip`` (default 1.0; 0 turns clipping off) before each AdamW step. Recording a window of two
steps every ``every`` steps keeps the run small while still giving a pair (t, t+1) to analyze at
regular intervals. The findings are the paper's questions: is the step convex along its own line
(``inst_gap`` ≤ 0), does the cumulative ``convexity_ratio`` stay positive, how often does the next
batch's gradient point uphill (``update_corr`` > 0), and how large is the instantaneous smoothness
compared with what a descent-lemma analysis at this learning rate would need?

    python examples/charlm.py            # default size
    python examples/charlm.py --small    # what the test suite runs

Gradient clipping is on: the recorder stores the clip factor c = max_norm/‖g‖ of each clipped
recorded step and the analyzer compares the replayed gradient clipped the same way, so
``max_grad_replay_error`` stays at rounding level; ``frac_clipped`` says how many steps were clipped.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from _common import example_main, finish, report_and_time
from torch import nn

import trajscope


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
    clip: float = 1.0  # max gradient norm (clip_grad_norm_); 0: no clipping
    compile: bool = True  # torch.compile the training model


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
        # softmax(q·kᵀ/√d_head + causal mask)·v; the analyzer's forward-mode probe runs it on
        # SDPA's math kernel (--derivatives auto), since the fused kernels lack forward-mode AD
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


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


@contextmanager
def compiled(model: nn.Module, cfg: Config) -> Iterator[nn.Module]:
    """``torch.compile(model)`` when ``cfg.compile``, else ``model`` itself, for the training loop
    inside the ``with`` block (compilation happens at the first call)."""
    if not cfg.compile:
        yield model
        return
    import torch._inductor.config as inductor_config

    # inductor draws dropout masks from its own generator, not the RNG state the recorder
    # captures; torch's own random ops keep a model with dropout replayable
    with inductor_config.patch(fallback_random=True):
        yield cast(nn.Module, torch.compile(model))


def train(run_dir: Path, cfg: Config, data: torch.Tensor) -> tuple[list[float], list[bool]]:
    """AdamW with linear warmup then cosine decay and gradient clipping (the pretraining recipe,
    scaled down). Returns each step's loss (nats per character) and whether it was clipped."""
    obj = make_objective()
    model = obj.model
    # nanoGPT's split: weight decay on matrices, none on biases, LayerNorm gains and embeddings
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok" not in n and "pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "tok" not in n and "pos" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, clipped = [], []
    # the loop calls the compiled model; the run names the plain model's parameters
    with compiled(model, cfg) as net, trajscope.Recorder(
            run_dir, net, opt, objective=make_objective, every=cfg.every, window=2, overwrite=True,
            metadata={"example": "charlm", "config": asdict(cfg)}) as rec:
        for step in range(cfg.steps):
            warm = (step + 1) / cfg.warmup
            cos = 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (warm if step < cfg.warmup else 0.1 + 0.9 * cos)
            batch = get_batch(data, cfg, gen)
            opt.zero_grad()
            loss = obj.loss(net, batch)
            loss.backward()
            if cfg.clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                clipped.append(bool(norm > cfg.clip))
            rec.batch(batch, loss=loss)
            opt.step()
            losses.append(float(loss.detach()))
    return losses, clipped


def findings(ds: xr.Dataset, losses: list[float], clipped: list[bool]) -> dict[str, float]:
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
        # under clipping: the clip rescale 1/c − 1 of the most clipped recorded step
        "max_grad_replay_error": float(np.nanmax(ds["grad_replay_error"].values)),
        "frac_clipped": float(np.mean(clipped)) if clipped else 0.0,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, analyze, report; print and return the findings."""
    return example_main(argv, doc=__doc__, name="charlm", run=run, options=options)


def options(ap: argparse.ArgumentParser) -> None:
    """The example's own flags: ``--clip`` and ``--no-compile``."""
    ap.add_argument("--clip", type=float, default=Config.clip,
                    help="clip the gradient to this norm before each step (clip_grad_norm_); 0: no clipping")
    ap.add_argument("--no-compile", action="store_true",
                    help="train the eager model (default: torch.compile when a C compiler is on the PATH)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The example proper: record, analyze, report, print the findings."""
    # inductor generates C++ on the CPU: without a C compiler the example trains eager
    can_compile = shutil.which("cc") is not None or shutil.which("gcc") is not None
    cfg = replace(SMALL if args.small else Config(), clip=args.clip, compile=can_compile and not args.no_compile)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = load_text(cfg.text_chars)
    run_dir = args.out / "adamw"
    losses, clipped = train(run_dir, cfg, data)
    ds = trajscope.analyze(run_dir, make_objective, points=cfg.points, margin=cfg.margin, progress=False)
    results: dict[str, Any] = {"config": asdict(cfg), "adamw": findings(ds, losses, clipped)}
    report_and_time(args, results, [run_dir], t0)

    r = results["adamw"]
    n_params = sum(p.numel() for p in make_objective().model.parameters())
    mode = "compiled" if cfg.compile else "eager"
    clip = f"clip {cfg.clip:g} ({r['frac_clipped']:.0%} of steps clipped)" if cfg.clip > 0 else "no clipping"
    print(f"charlm: {GPT_CONFIG.n_layer}-layer GPT, {n_params:,} parameters, {mode}, AdamW, {clip}, "
          f"{len(data):,} characters of stdlib source")
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
