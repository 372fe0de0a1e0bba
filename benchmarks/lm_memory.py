"""Peak memory and time per pair of ``trajscope analyze`` on a small GPT with a realistic vocabulary,
against training and a point-by-point hand loop.

The workload: a nanoGPT-style GPT written here (token embedding tied to the output head, learned
positions, ``--layers`` pre-norm blocks with causal ``scaled_dot_product_attention``), vocabulary
``--vocab``, width ``--embd``, ``--batch`` × ``--seq`` tokens of generated data, AdamW. Its logits
(batch × seq × vocab floats) dominate one evaluation's memory. Each phase runs in its own Python
process (peak RSS from ``ru_maxrss`` of that process):

* train: record ``--pairs`` + 1 steps;
* analyze: ``trajscope.analyze`` on the first pair, then on all pairs (default settings, CPU);
* hand loop: the same 17 α points by one ``jvp`` each, and the two gradients, per pair.

Peak RSS is the high-water mark of the phase's process, with the resets the analyzer makes while
it plans its line folded in (``benchmarks.common.Peaks``).

Marginal time per pair = (time of all pairs − time of the first) / (pairs − 1), in one process
after a warm-up on the first pair (each analysis calibrates on its first pair: that cancels).

    python -m benchmarks.lm_memory                       # full size (vocab 16384, 2 layers, 128 wide)
    python -m benchmarks.lm_memory --vocab 4096 --batch 4 --pairs 3   # reduced
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import ROOT, Peaks, machine

SHAPE = {"vocab": 16384, "embd": 128, "layers": 2, "heads": 4, "seq": 256, "batch": 8}
"""The model and batch shape; overridden by the command line (exported to children through
``TRAJSCOPE_LM_SHAPE``, which :func:`make_gpt` reads)."""


def _shape() -> dict[str, int]:
    return {**SHAPE, **json.loads(os.environ.get("TRAJSCOPE_LM_SHAPE", "{}"))}


class Block(nn.Module):
    def __init__(self, embd: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(embd), nn.LayerNorm(embd)
        self.qkv, self.proj = nn.Linear(embd, 3 * embd), nn.Linear(embd, embd)
        self.mlp = nn.Sequential(nn.Linear(embd, 4 * embd), nn.GELU(), nn.Linear(4 * embd, embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, embd: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, embd), nn.Embedding(seq, embd)
        self.blocks = nn.ModuleList(Block(embd, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(embd)
        self.head = nn.Linear(embd, vocab, bias=False)
        self.head.weight = self.wte.weight  # weight tying

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_gpt() -> Any:  # an Objective (imported lazily: the benchmark's driver never needs trajscope)
    from trajscope import Objective

    s = _shape()
    torch.manual_seed(0)
    return Objective(model=GPT(s["vocab"], s["embd"], s["layers"], s["heads"], s["seq"]), loss=lm_loss)


def _tokens(gen: torch.Generator, s: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated text: a noisy "next token = previous + 1" rule, learnable from scratch."""
    start = torch.randint(0, s["vocab"], (s["batch"], 1), generator=gen)
    seq = (start + torch.arange(s["seq"] + 1)) % s["vocab"]
    noise = torch.rand(seq.shape, generator=gen) < 0.1
    seq = torch.where(noise, torch.randint(0, s["vocab"], seq.shape, generator=gen), seq)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _train(run: str, pairs: int) -> dict[str, float]:
    from trajscope.recorders import Recorder

    s = _shape()
    obj = make_gpt()
    opt = torch.optim.AdamW(obj.model.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(1)
    with Recorder(run, obj.model, opt, objective="benchmarks.lm_memory:make_gpt", overwrite=True) as rec:
        for _ in range(pairs + 1):
            batch = _tokens(gen, s)
            opt.zero_grad()
            loss = lm_loss(obj.model, batch)
            loss.backward()
            rec.batch(batch, loss=loss)
            opt.step()
    return {}


def _analyze(run: str, pairs: int) -> dict[str, float]:
    import trajscope

    trajscope.analyze(run, steps="0:1", device="cpu", write=False, progress=False)  # warm-up: imports
    t0 = time.perf_counter()
    trajscope.analyze(run, steps="0:1", device="cpu", write=False, progress=False)
    t1 = time.perf_counter()
    ds = trajscope.analyze(run, steps=f"0:{pairs}", device="cpu", write=False, progress=False)
    t2 = time.perf_counter()
    return {"first": t1 - t0, "all": t2 - t1, "mode": ds.attrs.get("line_mode"),
            "chunk": ds.attrs.get("line_chunk")}


def _hand(run: str, pairs: int) -> dict[str, float]:
    from torch.func import functional_call, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import trajscope
    from trajscope.analysis.execution import keep_freed_memory
    from trajscope.probe import alpha_grid

    keep_freed_memory()  # as the analyzer sets it in its workers
    r = trajscope.open_run(run)
    model = make_gpt().model
    alphas = [float(a) for a in alpha_grid(9, 0.5)]

    def pair(t: int) -> None:
        a, b = r.snapshot(t), r.snapshot(t + 1)
        x0 = {n: v.float() for n, v in a.params.items()}
        delta = {n: b.params[n].float() - x0[n] for n in x0}
        batch = a.batch

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return lm_loss(lambda idx: functional_call(model, p, (idx,), tie_weights=True), batch)  # type: ignore[arg-type]

        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no forward-mode rule
            for al in alphas:
                jvp(f, ({n: x0[n] + al * delta[n] for n in x0},), (delta,))
        for x in (x0, {n: v.float() for n, v in b.params.items()}):
            leaves = {n: v.detach().requires_grad_(True) for n, v in x.items()}
            torch.autograd.grad(f(leaves), list(leaves.values()), allow_unused=True)

    pair(0)  # warm-up
    t0 = time.perf_counter()
    pair(0)
    t1 = time.perf_counter()
    for t in range(pairs):
        pair(t)
    t2 = time.perf_counter()
    return {"first": t1 - t0, "all": t2 - t1}


def _child(phase: str, run: str, pairs: int, shape: dict[str, int]) -> dict[str, float]:
    env = {**os.environ, "TRAJSCOPE_LM_SHAPE": json.dumps(shape), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.lm_memory", "--child", phase, run, str(pairs)],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{phase} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in SHAPE.items():
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--child", nargs=3, metavar=("PHASE", "RUN", "PAIRS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        phase, run, pairs = args.child
        # The analyzer resets the resident-set high-water mark while it plans its line (the mark
        # ru_maxrss reports): Peaks folds each reset into the maximum it keeps.
        with Peaks("cpu") as peaks:
            res = {"train": _train, "analyze": _analyze, "hand": _hand}[phase](run, int(pairs))
            res["peak_rss"] = max(peaks.rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print(json.dumps(res))
        return
    shape = {k: getattr(args, k) for k in SHAPE}
    with tempfile.TemporaryDirectory() as tmp:
        run = str(Path(tmp) / "run")
        res = {phase: _child(phase, run, args.pairs, shape) for phase in ("train", "analyze", "hand")}
    gb = {k: v["peak_rss"] / 1e9 for k, v in res.items()}
    per = {k: (res[k]["all"] - res[k]["first"]) / max(1, args.pairs - 1) for k in ("analyze", "hand")}
    print(f"# {machine()}; shape {shape}, {args.pairs} pairs")
    print(f"peak RSS: train {gb['train']:.2f} GB, analyze {gb['analyze']:.2f} GB "
          f"({gb['analyze'] / gb['train']:.2f}x train; target <= 2x), hand loop {gb['hand']:.2f} GB")
    print(f"marginal time per pair: analyze {per['analyze']:.2f} s, hand loop {per['hand']:.2f} s "
          f"({per['analyze'] / per['hand']:.2f}x; target <= 1.1x)")
    a = res["analyze"]
    print(f"line plan: mode {a['mode']}, chunk {a['chunk']}")


if __name__ == "__main__":
    main()
