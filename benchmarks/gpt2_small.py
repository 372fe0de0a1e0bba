"""Record and analyze a GPT-2-small-shaped model on whatever device is there: memory per phase,
time per pair, and (on CUDA) pairs per minute against a hand loop on the same GPU.

The model is :class:`benchmarks.lm_memory.GPT` at GPT-2 small's shape: 12 pre-norm blocks of 12
heads, n_embd 768, vocabulary 50257, 1024 learned positions, token embedding tied to the output
head, biases everywhere: 124,439,808 parameters (:func:`n_params`). No weights or text are
downloaded: it starts from its seeded initialization and trains on generated tokens
(:func:`benchmarks.lm_memory._tokens`), with AdamW. Each phase runs in its own Python process:

* train: record ``--pairs`` + 1 steps with :class:`trajscope.recorders.Recorder`;
* analyze: ``trajscope.analyze`` with default settings (memory budget: half the available
  memory, for the line) or ``--max-memory SIZE`` (a budget for everything the analysis adds) on
  the device, every pair;
* hand (CUDA, or ``--hand``): per pair the same 17 α points by one ``jvp`` each and the two
  gradients, as ``benchmarks.lm_memory``'s hand loop, on the same device.

``--no-grads`` (offered only when the installed ``Recorder`` takes ``grads``) records parameters
without gradients.

Peak memory: on a CPU the resident-set high-water mark (``VmHWM``, what ``ru_maxrss`` reports),
on CUDA ``torch.cuda.max_memory_allocated``; the analyzer leaves both alone in the caller's process.
The analysis stays within its budget when its peak minus the memory held just before ``analyze``
was called is at most the budget: ``--max-memory`` itself, or by default the line's room
(``extra/line_budget`` of its first persisted pair), a stricter test than the default budget's
own, which sizes the line only.

Time per pair: on a CPU, the analysis' wall time / pairs (one analysis, its one-time costs
included: the derivative-path trial jvp, the first use of ``torch.func``, the line calibration,
writing the Dataset). With a hand loop (CUDA, ``--hand``), each side is warmed up on the first
pair, then timed on the first pair alone and on all pairs, as lm_memory does: marginal time per
pair = (time of all pairs − time of the first) / (pairs − 1); pairs per minute = 60 / that. The
analyses all write their pairs and Dataset (``force=True``), so their fixed costs cancel.

    python -m benchmarks.gpt2_small                     # CPU: batch 1 × 256 tokens, 1 pair
    python -m benchmarks.gpt2_small --max-memory 6GB    # the same under a 6 GB budget
    python -m benchmarks.gpt2_small --device cuda       # CUDA: batch 8 × 1024 tokens, 6 pairs
    python -m benchmarks.gpt2_small --tiny --hand --threads 1   # a tiny model, for tests
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, Peaks, machine, sync
from benchmarks.lm_memory import GPT, _tokens, lm_loss

GPT2_SMALL = {"vocab": 50257, "embd": 768, "layers": 12, "heads": 12, "block": 1024}
"""GPT-2 small (``block``: the number of learned positions, the longest sequence)."""
TINY = {"vocab": 512, "embd": 32, "layers": 2, "heads": 2, "block": 64}
"""A shape that records and analyzes in seconds (``--tiny``), for tests."""
RUN_DEFAULTS = {"cpu": {"batch": 1, "seq": 256, "pairs": 1}, "cuda": {"batch": 8, "seq": 1024, "pairs": 6},
                "tiny": {"batch": 2, "seq": 32, "pairs": 2}}
"""``--batch``, ``--seq`` and ``--pairs`` when not given. On a CPU a 124M-parameter jvp over 256
tokens takes seconds, and a pair is 17 of them plus two gradients."""
SHAPE_ENV = "TRAJSCOPE_GPT2_SHAPE"
"""The model shape as JSON, exported to the children; :func:`make_gpt2` reads it (the analyzer
imports the objective by name)."""
OBJECTIVE = "benchmarks.gpt2_small:make_gpt2"


def n_params(s: dict[str, int]) -> int:
    """Parameters of :class:`benchmarks.lm_memory.GPT` with tied embeddings:
    V·C + T·C (token and position tables) + L·(12C² + 13C) (per block: qkv 3C² + 3C, projection
    C² + C, MLP 8C² + 5C, two LayerNorms 4C) + 2C (final LayerNorm), C = embd, T = block."""
    c = s["embd"]
    return s["vocab"] * c + s["block"] * c + s["layers"] * (12 * c * c + 13 * c) + 2 * c


def model_shape() -> dict[str, int]:
    return {**GPT2_SMALL, **json.loads(os.environ.get(SHAPE_ENV, "{}"))}


def make_gpt2() -> Any:  # an Objective (trajscope imported here: the driver does not need it)
    from trajscope import Objective

    s = model_shape()
    torch.manual_seed(0)
    return Objective(model=GPT(s["vocab"], s["embd"], s["layers"], s["heads"], s["block"]), loss=lm_loss)


def _train(cfg: dict[str, Any], peaks: Peaks) -> dict[str, Any]:
    from trajscope.recorders import Recorder

    dev, s = cfg["device"], {**model_shape(), "batch": cfg["batch"], "seq": cfg["seq"]}
    model = make_gpt2().model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(1)
    extra = {"grads": False} if cfg["no_grads"] else {}
    t0 = time.perf_counter()
    with Recorder(cfg["run"], model, opt, objective=OBJECTIVE, overwrite=True, **extra) as rec:
        for _ in range(cfg["pairs"] + 1):
            x, y = _tokens(gen, s)
            batch = (x.to(dev), y.to(dev))
            opt.zero_grad()
            loss = lm_loss(model, batch)
            loss.backward()
            rec.batch(batch, loss=loss)
            opt.step()
    sync(dev)
    step0 = Path(cfg["run"]) / "steps" / "step_00000000.safetensors"
    return {"seconds": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters()),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "step_bytes": step0.stat().st_size, "peak": peaks.device()}


def _analyze(cfg: dict[str, Any], peaks: Peaks) -> dict[str, Any]:
    import safetensors.numpy

    import trajscope
    from trajscope.analysis.persist import pair_path
    from trajscope.probe.memory import parse_size

    dev, run, steps = cfg["device"], cfg["run"], f"0:{cfg['pairs']}"  # the last recorded step has no pair
    first = None
    if cfg["marginal"]:  # every analysis writes its pairs and Dataset: the fixed costs cancel
        # warm-up: imports, first writes
        trajscope.analyze(run, steps="0:1", device=dev, derivatives=cfg["derivatives"], progress=False)
        t0 = time.perf_counter()
        trajscope.analyze(run, steps="0:1", device=dev, derivatives=cfg["derivatives"], force=True,
                          progress=False)
        sync(dev)
        first = time.perf_counter() - t0
    base = peaks.mark()
    t0 = time.perf_counter()
    ds = trajscope.analyze(run, steps=steps, device=dev, derivatives=cfg["derivatives"], force=cfg["marginal"],
                           max_memory=cfg["max_memory"], progress=False)  # defaults otherwise
    sync(dev)
    seconds = time.perf_counter() - t0
    pairs_dir = Path(run) / "analysis" / "pairs"
    saved = [safetensors.numpy.load_file(str(pair_path(pairs_dir, int(t)))) for t in ds["step"].values]
    # ℓ(0) = f(x_t; z_t) re-evaluated against the loss the training loop logged
    replay = max(abs(p["loss_line"][list(p["alpha"]).index(0.0)] / p["loss_recorded"][0] - 1) for p in saved)
    return {"first": first, "all": seconds, "pairs": len(saved), "baseline": base, "peak": peaks.device(),
            "budget": int(saved[0]["extra/line_budget"][0]) if cfg["max_memory"] is None
            else parse_size(cfg["max_memory"]),
            "held": int(saved[0]["extra/line_held"][0]) if "extra/line_held" in saved[0] else 0,
            "point_bytes": int(saved[0]["extra/line_point_bytes"][0]),
            "mode": ds.attrs.get("line_mode"), "chunk": ds.attrs.get("line_chunk"),
            "derivatives": ds.attrs.get("derivatives"), "replay": float(replay),
            "line0": saved[0]["loss_line"].tolist()}


def _hand(cfg: dict[str, Any], peaks: Peaks) -> dict[str, Any]:
    """17 α points by one jvp each and the two gradients per pair (benchmarks.lm_memory's loop)."""
    from torch.func import functional_call, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import trajscope
    from trajscope.analysis.execution import keep_freed_memory
    from trajscope.probe import alpha_grid

    keep_freed_memory()  # as the analyzer sets it in its workers
    dev, r = cfg["device"], trajscope.open_run(cfg["run"])
    model = make_gpt2().model.to(dev)
    alphas = [float(a) for a in alpha_grid(9, 0.5)]

    def pair(t: int) -> list[float]:
        a, b = r.snapshot(t), r.snapshot(t + 1)
        x0 = {n: v.to(dev).float() for n, v in a.params.items()}
        delta = {n: b.params[n].to(dev).float() - x0[n] for n in x0}
        batch = tuple(z.to(dev) for z in a.batch)

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return lm_loss(lambda idx: functional_call(model, p, (idx,), tie_weights=True), batch)  # type: ignore[arg-type]

        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no forward-mode rule
            line = [jvp(f, ({n: x0[n] + al * delta[n] for n in x0},), (delta,))[0] for al in alphas]
        for x in (x0, {n: v.to(dev).float() for n, v in b.params.items()}):
            leaves = {n: v.detach().requires_grad_(True) for n, v in x.items()}
            torch.autograd.grad(f(leaves), list(leaves.values()), allow_unused=True)
        return [float(v) for v in line]  # float(): waits for the device

    line0 = pair(0)  # warm-up
    peaks.mark()
    t0 = time.perf_counter()
    pair(0)
    t1 = time.perf_counter()
    for t in range(cfg["pairs"]):
        pair(t)
    return {"first": t1 - t0, "all": time.perf_counter() - t1, "peak": peaks.device(), "line0": line0}


PHASES: dict[str, Callable[[dict[str, Any], Peaks], dict[str, Any]]] = {
    "train": _train, "analyze": _analyze, "hand": _hand}


def _child(phase: str, cfg: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, SHAPE_ENV: json.dumps(cfg["shape"]), "PYTHONPATH": str(ROOT)}
    t0, cpu0 = time.perf_counter(), _children_cpu()
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpt2_small", "--child", phase, json.dumps(cfg)],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"gpt2_small: phase {phase} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - t0,
            "process_cpu_seconds": _children_cpu() - cpu0}


def _children_cpu() -> float:
    """CPU seconds (user + system, every thread) of the finished child processes: with the wall
    time, how much other jobs slowed a phase down on a shared machine."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _per_pair(res: dict[str, Any], pairs: int) -> float:
    """Seconds per pair: marginal after the first pair when it was timed alone, else the mean."""
    if res.get("first") is None:
        return float(res["all"]) / pairs
    return (float(res["all"]) - float(res["first"])) / (pairs - 1)


def summarize(res: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's numbers (what ``--json`` writes) from the phases' results; bytes, seconds."""
    tr, an = res["train"], res["analyze"]
    cuda = cfg["device"].startswith("cuda")
    added = an["peak"] - an["baseline"]
    out: dict[str, Any] = {
        "machine": machine(), "device": cfg["device"], "shape": cfg["shape"], "batch": cfg["batch"],
        "seq": cfg["seq"], "pairs": cfg["pairs"], "threads": cfg["threads"] or torch.get_num_threads(),
        "params": tr["params"], "param_bytes": tr["param_bytes"],
        "step_bytes": tr["step_bytes"], "train_seconds": tr["seconds"], "train_peak_rss": tr["peak_rss"],
        "train_cuda_peak": tr["peak"] if cuda else None, "analyze_peak_rss": an["peak_rss"],
        "analyze_peak": an["peak"], "analyze_baseline": an["baseline"], "analyze_added": added,
        "max_memory": cfg["max_memory"], "budget": an["budget"], "held_at_line": an["held"],
        "within_budget": added <= an["budget"], "point_bytes": an["point_bytes"],
        "analyze_to_train_peak": an["peak_rss"] / tr["peak_rss"],
        "line_mode": an["mode"], "line_chunk": an["chunk"], "derivatives": an["derivatives"],
        "replay_rel_diff": an["replay"], "pairs_analyzed": an["pairs"], "analyze_seconds": an["all"],
        "analyze_seconds_per_pair": _per_pair(an, cfg["pairs"]),
        "phase_seconds": {k: v["process_seconds"] for k, v in res.items()},
        "phase_cpu_seconds": {k: v["process_cpu_seconds"] for k, v in res.items()},
    }
    if "hand" in res:
        hand = res["hand"]
        out.update({"hand_seconds_per_pair": _per_pair(hand, cfg["pairs"]), "hand_peak_rss": hand["peak_rss"],
                    "hand_peak": hand["peak"],
                    "hand_line_rel_diff": max(abs(a / h - 1) for a, h in zip(an["line0"], hand["line0"]))})
        out["analyze_pairs_per_minute"] = 60 / out["analyze_seconds_per_pair"]
        out["hand_pairs_per_minute"] = 60 / out["hand_seconds_per_pair"]
    return out


def report(s: dict[str, Any]) -> list[str]:
    """The summary in words, one line per quantity."""
    gb, mb = 1e9, 1e6
    peak = "allocated on the GPU" if s["device"].startswith("cuda") else "RSS"
    lines = [
        f"# {s['machine']}",
        f"device {s['device']}; model {s['shape']}; batch {s['batch']} x {s['seq']} tokens; {s['pairs']} pairs; "
        f"torch threads per phase {s['threads']}",
        f"parameters: {s['params']:,} ({s['param_bytes'] / mb:.1f} MB in float32)",
        f"recorded step: {s['step_bytes'] / mb:.1f} MB on disk ({s['step_bytes'] / s['param_bytes']:.2f}x the "
        "parameters' bytes)",
        f"training (record {s['pairs'] + 1} steps): {s['train_seconds']:.1f} s, "
        f"peak RSS {s['train_peak_rss'] / gb:.2f} GB"
        + (f", peak allocated on the GPU {s['train_cuda_peak'] / gb:.2f} GB" if s["train_cuda_peak"] else ""),
        f"analysis: process peak RSS {s['analyze_peak_rss'] / gb:.2f} GB; {peak} {s['analyze_baseline'] / gb:.2f} GB "
        f"before analyze, peak {s['analyze_peak'] / gb:.2f} GB: added {s['analyze_added'] / gb:.2f} GB",
        f"analysis peak RSS / training peak RSS: {s['analyze_to_train_peak']:.2f}",
        (f"memory budget (--max-memory {s['max_memory']}, everything the analysis adds): {s['budget'] / gb:.2f} GB; "
         f"held when the line was planned {s['held_at_line'] / gb:.2f} GB"
         if s["max_memory"] else f"memory budget of the line (default): {s['budget'] / gb:.2f} GB")
        + f"; one alpha point {s['point_bytes'] / gb:.3f} GB; line {s['line_mode']}, chunk {s['line_chunk']}; "
        f"derivatives {s['derivatives']}",
        f"within the budget (added <= budget): {'yes' if s['within_budget'] else 'NO'}",
        f"replay: loss at alpha=0 vs the recorded loss, max relative difference {s['replay_rel_diff']:.1e}",
        f"analysis: {s['pairs_analyzed']} pairs in {s['analyze_seconds']:.1f} s; "
        f"{s['analyze_seconds_per_pair']:.2f} s per pair",
    ]
    if "hand_seconds_per_pair" in s:
        ratio = s["analyze_seconds_per_pair"] / s["hand_seconds_per_pair"]
        lines += [f"marginal pairs per minute: analyze {s['analyze_pairs_per_minute']:.2f}, hand loop "
                  f"{s['hand_pairs_per_minute']:.2f} (analyze/hand time per pair {ratio:.2f}x)",
                  f"hand loop: peak {peak} {s['hand_peak'] / gb:.2f} GB (after its warm-up pair); loss along "
                  f"the first pair vs the analyzer's, max relative difference {s['hand_line_rel_diff']:.1e}"]
    return lines


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--pairs", type=int, help="pairs recorded and analyzed (default: CPU 1, CUDA 6)")
    ap.add_argument("--batch", type=int, help="sequences per minibatch (default: CPU 1, CUDA 8)")
    ap.add_argument("--seq", type=int,
                    help="tokens per sequence, at most the model's block (default: CPU 256, CUDA 1024)")
    ap.add_argument("--tiny", action="store_true", help=f"the model shape {TINY} instead of GPT-2 small")
    ap.add_argument("--hand", action="store_true", help="also time the hand loop on a CPU (always on CUDA)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads of each phase (default: torch's)")
    ap.add_argument("--max-memory", metavar="SIZE",
                    help="the analysis' memory budget, e.g. 6GB (default: trajscope's default)")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    from trajscope.recorders import Recorder

    if "grads" in inspect.signature(Recorder).parameters:
        ap.add_argument("--no-grads", action="store_true", help="record parameters without gradients")
    ap.add_argument("--child", nargs=2, metavar=("PHASE", "CONFIG"), help=argparse.SUPPRESS)
    return ap


def _config(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpt2_small: --device cuda: no CUDA device is available (use --device cpu or auto)")
    shape = TINY if args.tiny else GPT2_SMALL
    d = RUN_DEFAULTS["tiny" if args.tiny else device]
    cfg = {"device": device, "shape": shape, "no_grads": bool(getattr(args, "no_grads", False)),
           "threads": args.threads, "max_memory": args.max_memory,
           **{k: d[k] if getattr(args, k) is None else getattr(args, k) for k in ("batch", "seq", "pairs")}}
    cfg["marginal"] = device == "cuda" or args.hand
    # The tiny shape stands in for GPT-2 small, whose line work `auto` gives to forward mode; at
    # its own size `auto` would pick reverse mode (trajscope.probe.trials.reverse_is_cheaper).
    cfg["derivatives"] = "forward" if args.tiny else "auto"
    if not 1 <= cfg["seq"] <= shape["block"]:
        raise SystemExit(f"gpt2_small: --seq {cfg['seq']}: expected 1..{shape['block']} (the model's block)")
    for k in ("batch", "threads"):
        if cfg[k] is not None and cfg[k] < 1:
            raise SystemExit(f"gpt2_small: --{k} {cfg[k]}: expected >= 1")
    if cfg["pairs"] < (2 if cfg["marginal"] else 1):
        raise SystemExit(f"gpt2_small: --pairs {cfg['pairs']}: expected >= 2 with a hand loop "
                         "(marginal time after the first pair), >= 1 otherwise")
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = _parser().parse_args(argv)
    if args.child:
        phase, cfg = args.child[0], json.loads(args.child[1])
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        with Peaks(cfg["device"]) as peaks:
            res = PHASES[phase](cfg, peaks)
            res["peak_rss"] = peaks.rss()
        print(json.dumps(res))
        return None
    cfg = _config(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg["run"] = str(Path(tmp) / "run")
        phases = ("train", "analyze", "hand") if cfg["marginal"] else ("train", "analyze")
        res = {phase: _child(phase, cfg) for phase in phases}
    s = summarize(res, cfg)
    s["total_seconds"] = time.perf_counter() - t0
    print("\n".join(report(s)))
    took = ", ".join(f"{k} {v:.0f} s ({s['phase_cpu_seconds'][k]:.0f} s CPU)" for k, v in s["phase_seconds"].items())
    print(f"total: {s['total_seconds']:.0f} s (processes: {took})")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2) + "\n")
    return s


if __name__ == "__main__":
    main()
