"""The line ℓ(α) on the α grid (trajscope.probe.line): batched evaluation (vmap over α, in chunks) equals
point-by-point evaluation.

The batched path falls back to the point loop with a ProbeWarning when vmap fails; every test here
that compares the two turns that warning into an error and checks which path ran, so a broken
batched path fails them instead of being hidden by the fallback.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

import trajscope
import trajscope.probe.line as line_mod
import trajscope.probe.stages as stages
from support.problems import classifier_run, make_mlp, make_mlp_dropout
from trajscope.errors import AnalysisError, ProbeWarning
from trajscope.probe import ProbeSettings, alpha_grid, probe_pair

# A fallback from the batched path is an error in this file unless a test expects it (pytest.warns).
pytestmark = pytest.mark.filterwarnings("error::trajscope.errors.ProbeWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, factory in [("mlp", make_mlp), ("dropout", make_mlp_dropout)]:
        out[name] = tmp_path_factory.mktemp(name) / "run"
        classifier_run(out[name], factory, steps=4)
    return out


def line_inputs(run_dir: Path, factory, dtype: torch.dtype, points: int = 9):
    run = trajscope.open_run(run_dir)
    snap, nxt = run.snapshot(1), run.snapshot(2)
    obj = factory()
    obj.model.train(True)
    bound = stages._Bound(obj.model, obj.loss)
    x0 = {n: t.to(dtype) for n, t in snap.params.items()}
    delta = {n: nxt.params[n].to(dtype) - x0[n] for n in x0}
    batch = (snap.batch[0].to(dtype), snap.batch[1])

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(bound, {f"model.{n}": v for n, v in p.items()}, (batch,)).reshape(())

    alphas = torch.tensor(alpha_grid(points, 0.5), dtype=dtype)
    return f, x0, delta, alphas, snap.rng


def line(inputs, *, batched: bool, chunk: int | None = None, replay: bool = False,
         expect_path: bool = True):
    """ℓ, ℓ' by the probe's line evaluation; with ``expect_path``, fails unless the path asked
    for (batched or point by point) is the one that ran, without a fallback warning."""
    f, x0, delta, alphas, rng = inputs
    settings = ProbeSettings(alphas=tuple(alphas.tolist()), batched=batched, chunk_size=chunk,
                             dtype="float64" if alphas.dtype == torch.float64 else "float32")
    if not expect_path:
        return line_mod._line(f, x0, delta, alphas, settings, rng, replay)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeWarning)
        vals, ders, ran_batched = line_mod.line_and_path(f, x0, delta, alphas, settings, rng, replay)
    assert ran_batched == batched, "the batched path did not run" if batched else "the point loop did not run"
    return vals, ders


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("chunk", [None, 1, 4, 5, 17, 100])
def test_batched_equals_pointwise(runs: dict[str, Path], dtype: torch.dtype, rtol: float,
                                  chunk: int | None) -> None:
    inputs = line_inputs(runs["mlp"], make_mlp, dtype)
    want = line(inputs, batched=False)
    got = line(inputs, batched=True, chunk=chunk)
    assert got[0].shape == want[0].shape == (17,)
    np.testing.assert_allclose(got[0], want[0], rtol=rtol)
    # ℓ' crosses zero along the line: relative to its scale
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=rtol * np.abs(want[1]).max())


def test_batched_equals_pointwise_with_dropout_replay(runs: dict[str, Path]) -> None:
    inputs = line_inputs(runs["dropout"], make_mlp_dropout, torch.float64)
    assert inputs[4], "the recorder stores the RNG state of train-mode steps"
    want = line(inputs, batched=False, replay=True)
    got = line(inputs, batched=True, chunk=5, replay=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12 * np.abs(want[1]).max())
    # and the replayed mask is the training one: another RNG state gives another loss
    torch.manual_seed(123)
    other = line(inputs[:4] + ({"cpu": torch.get_rng_state()},), batched=True, replay=True)
    assert not np.allclose(other[0], want[0])


def _oom_above(limit: int, sizes: list[int]):
    """A vmap that fails like an out-of-memory device for chunks of more than ``limit`` points."""
    real = line_mod.vmap

    def fake_vmap(fn, **kw):
        batched = real(fn, **kw)

        def call(stacked: dict[str, torch.Tensor]):
            k = next(iter(stacked.values())).shape[0]
            sizes.append(k)
            if k > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {k} GiB")
            return batched(stacked)

        return call

    return fake_vmap


def test_out_of_memory_halves_the_chunk(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = line_inputs(runs["mlp"], make_mlp, torch.float64)
    want = line(inputs, batched=False)
    sizes: list[int] = []
    monkeypatch.setattr(line_mod, "vmap", _oom_above(5, sizes))
    monkeypatch.setattr(line_mod, "_CHUNK_HINTS", {})
    got = line(inputs, batched=True)
    assert sizes == [17, 8, 4, 4, 4, 4, 1]  # 17 and 8 fail; then chunks of 4 (and the rest)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12 * np.abs(want[1]).max())
    # the next pair starts from the size that fit
    sizes.clear()
    line(inputs, batched=True)
    assert sizes == [4, 4, 4, 4, 1]


def test_out_of_memory_even_for_one_point_falls_back_then_fails_clearly(
        runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = line_inputs(runs["mlp"], make_mlp, torch.float64)
    want = line(inputs, batched=False)
    monkeypatch.setattr(line_mod, "vmap", _oom_above(0, []))
    monkeypatch.setattr(line_mod, "_CHUNK_HINTS", {})
    # vmap cannot run at all: point by point, same numbers, and a warning that says why
    with pytest.warns(ProbeWarning, match=r"evaluated batched with vmap \(OutOfMemoryError: CUDA out of memory"):
        got = line(inputs, batched=True, expect_path=False)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12 * np.abs(want[1]).max())

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(line_mod, "jvp", no_memory)
    with pytest.raises(AnalysisError, match=r"device='cpu': out of memory evaluating the loss at a single"):
        line(inputs, batched=True, expect_path=False)  # no fallback warning: the fallback failed too


def test_analysis_batched_equals_pointwise(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _count_batched_lines(monkeypatch)
    # batched=True pins the path: the default (None) calibrates on the first pair, with one more batched call
    a = trajscope.analyze(runs["mlp"], make_mlp, dtype="float64", batched=True, write=False, progress=False)
    assert lines == [a.sizes["step"]], "every pair's line is computed by the batched path"
    b = trajscope.analyze(runs["mlp"], make_mlp, dtype="float64", batched=False, write=False,
                          progress=False)
    assert lines == [a.sizes["step"]], "batched=False never calls the batched path"
    c = trajscope.analyze(runs["mlp"], make_mlp, dtype="float64", chunk_size=3, write=False,
                          progress=False)
    assert lines == [2 * a.sizes["step"]]
    loss_scale = np.abs(a.loss_line.values).max()  # residuals ≈ 0 are differences of losses
    for ds in (b, c):
        for name in a.data_vars:
            want = a[name].values
            np.testing.assert_allclose(ds[name].values, want, rtol=1e-9,
                                       atol=1e-12 * max(np.nanmax(np.abs(want)), loss_scale),
                                       equal_nan=True, err_msg=name)


def _count_batched_lines(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A one-element list counting the batched line evaluations that returned (a spy)."""
    count = [0]
    real = line_mod.line_batched

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        count[0] += 1
        return out

    monkeypatch.setattr(line_mod, "line_batched", spy)
    return count


def test_probe_records_the_path_that_ran(runs: dict[str, Path]) -> None:
    run = trajscope.open_run(runs["mlp"])
    snap, nxt = run.snapshot(1), run.snapshot(2)
    batched = probe_pair(make_mlp(), snap, nxt, ProbeSettings(dtype="float64"))
    pointwise = probe_pair(make_mlp(), snap, nxt, ProbeSettings(dtype="float64", batched=False))
    assert batched.extras["line_batched"] == 1.0 and pointwise.extras["line_batched"] == 0.0
    np.testing.assert_allclose(batched.loss_line, pointwise.loss_line, rtol=1e-12)


def test_stacked_parameters_equal_pointwise_bit_for_bit_across_reused_buffers() -> None:
    """The [k, …] stacks are built into buffers reused from call to call: every slice must equal
    x + aΔ computed alone, also when the next call (other Δ, other k) reuses or replaces them."""
    gen = torch.Generator().manual_seed(0)
    x0 = {"w": torch.randn(7, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    for k, scale in [(17, 1.0), (17, -3.0), (5, 0.25), (17, 2.0)]:
        delta = {n: scale * torch.randn(t.shape, generator=gen) for n, t in x0.items()}
        alphas = torch.linspace(-0.5, 1.5, k)
        stacked = line_mod._stack_on_line(x0, delta, alphas)
        assert {n: t.shape for n, t in stacked.items()} == {n: (k, *t.shape) for n, t in x0.items()}
        for i, a in enumerate(alphas):
            point = line_mod._on_line(x0, delta, a)
            for n in x0:
                assert torch.equal(stacked[n][i], point[n]), (k, scale, i, n)
    # bounded memory: the stacks of the last two chunk shapes only
    assert len(line_mod._STACK_BUFFERS) == 2
    assert {k[0] for k in line_mod._STACK_BUFFERS} == {5, 17}
