"""The GPT-2-small benchmark runs end to end at a tiny shape (the 124M model is never built here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpt2_small_parameter_count() -> None:
    from benchmarks.gpt2_small import GPT2_SMALL, TINY, n_params
    from benchmarks.lm_memory import GPT

    assert n_params(GPT2_SMALL) == 124_439_808  # GPT-2 small (tied embeddings, 1024 positions)
    model = GPT(TINY["vocab"], TINY["embd"], TINY["layers"], TINY["heads"], TINY["block"])
    assert sum(p.numel() for p in model.parameters()) == n_params(TINY) == 43_904


@pytest.mark.slow
def test_gpt2_small_tiny_end_to_end(tmp_path: Path) -> None:
    """``--tiny --hand --threads 1``: train, analyze and hand-loop phases in their own processes
    (about 20 s of CPU time), then the numbers they report against what they must be."""
    out = tmp_path / "gpt2.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpt2_small", "--tiny", "--hand", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert (s["device"], s["pairs"], s["pairs_analyzed"], s["batch"], s["seq"]) == ("cpu", 2, 2, 2, 32)
    assert s["params"] == 43_904 and s["param_bytes"] == 4 * 43_904
    # a recorded step: parameters and gradients in float32, the 2 × 32 int64 tokens and targets,
    # the RNG state and the safetensors header
    assert 2 * s["param_bytes"] + 2 * 2 * 32 * 8 < s["step_bytes"] < 2 * s["param_bytes"] + 64 * 1024
    # a tiny point is batched without a trial, all 17 α points in one chunk (the budget holds them)
    assert (s["line_mode"], s["line_chunk"]) == ("batched", 17)
    assert s["derivatives"] == "forward (sdpa math kernel)"  # the fused attention kernels have no jvp
    assert 0 < s["point_bytes"] < s["budget"]
    assert s["within_budget"] is True and s["analyze_added"] <= s["budget"]
    assert s["replay_rel_diff"] < 1e-6  # ℓ(0) re-evaluated = the loss the training loop logged
    assert s["hand_line_rel_diff"] < 1e-5  # the hand loop's jvps give the analyzer's line
    assert s["analyze_pairs_per_minute"] == pytest.approx(60 / s["analyze_seconds_per_pair"])
    assert "within the budget (added <= budget): yes" in proc.stdout
