"""Replaying how each forward pass ran: autocast, each micro-batch's RNG state, memory formats, and
what a loss difference below the evaluation's rounding may say.

The objectives (``support.recorder_objectives``) hold no autocast: the analyzer applies training's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.recorder_objectives import mlp, one_torch_thread  # noqa: F401 - fixture
from trajscope.analysis import analyze
from trajscope.analysis.health import FLAGS
from trajscope.errors import ForwardModeError, RunFormatError
from trajscope.recorders import Recorder
from trajscope.report import format_headline, headline
from trajscope.store import open_run
from trajscope.store.snapshot import check_meta

BELOW = FLAGS["below_resolution"][0]


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _analyze(run: Path, **kw: object) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = analyze(run, progress=False, **kw)  # type: ignore[arg-type]
    return ds, [str(w.message) for w in caught]


def test_dropout_replays_per_micro_batch_with_global_rng_draws_between(tmp_path: Path) -> None:
    """nanoGPT's get_batch draws from the global RNG between micro-batches: each micro-batch's
    dropout masks come from its own recorded state."""
    model = mlp(dropout=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x, y = _data()
    with Recorder(tmp_path / "run", model, opt, objective="support.recorder_objectives:make_mlp_dropout",
                  accumulation=2) as rec:
        idx = torch.randint(0, len(x), (8,))
        for _ in range(4):
            for _ in range(2):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                (loss / 2).backward()
                rec.batch((x[idx], y[idx]), loss=loss)
                idx = torch.randint(0, len(x), (8,))  # the next micro-batch, from the global RNG
            opt.step()
            opt.zero_grad()
    assert sorted(open_run(tmp_path / "run").snapshot(0).micro_rng) == [1]
    ds, caught = _analyze(tmp_path / "run", dtype="float64")
    assert not [m for m in caught if "replay failed" in m]
    assert np.all(ds.loss_replay_error.values <= 1e-6)
    assert np.all(ds.grad_replay_error.values <= 1e-6)


def _bf16_step(rec: Recorder, model: nn.Module, opt: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One optimizer step with the forward pass under CPU bf16 autocast, named to ``rec``."""
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    rec.batch(batch, loss=loss)
    opt.step()


def _train_bf16(run: Path, lrs: list[float]) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0])
    x, y = _data()
    with Recorder(run, model, opt, objective="support.recorder_objectives:make_mlp") as rec:
        for lr in lrs:
            for group in opt.param_groups:
                group["lr"] = lr
            _bf16_step(rec, model, opt, (x, y))


def test_bf16_autocast_replays_exactly_and_flags_pairs_below_its_resolution(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train_bf16(run, [1e-6, 1.0, 1e-6, 1.0, 1e-6, 1.0])
    assert open_run(run).snapshot(0).autocast == {"cpu": (torch.bfloat16, True)}
    ds, caught = _analyze(run)
    assert not [m for m in caught if "replay failed" in m]
    assert ds.attrs["eval_precision"] == "as trained: float32 under bfloat16 autocast"
    assert np.all(ds.loss_replay_error.values <= 1e-6) and np.all(ds.grad_replay_error.values <= 1e-4)
    res = ds.loss_resolution.values
    assert np.all(np.isfinite(res)) and np.all(res > 0)
    # one bf16 evaluation of a loss ~1.1 is off by about its unit roundoff, relative
    assert np.all(res < 2**-8 * 4 * np.abs(ds.loss_line.sel(alpha=0.0).values))
    below = (np.abs(ds.loss_change.values) <= 2 * res) | (np.abs(ds.inst_gap.values) <= 2 * res)
    flagged = (ds.pair_flags.values & BELOW) != 0
    np.testing.assert_array_equal(flagged, below)
    assert flagged[[0, 2, 4]].all()  # lr 1e-6: the loss cannot tell x_{t+1} from x_t at bf16
    assert not flagged.all()
    h = headline(ds)
    assert h["pairs_below_resolution"] == flagged.sum()
    counted = ~flagged
    assert h["pairs_moved"] == counted.sum()
    assert h["frac_inst_gap_le_0"] == np.mean(ds.inst_gap.values[counted] <= 0)
    assert f"{int(flagged.sum())} (left out of the fractions)" in format_headline(h)


def test_float32_evaluation_of_a_bf16_run_uses_training_rounding(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train_bf16(run, [0.5] * 4)
    ds, caught = _analyze(run, dtype="float32", write=False)
    assert not [m for m in caught if "replay failed" in m]
    assert ds.attrs["eval_precision"] == "float32 (training ran under bfloat16 autocast)"
    assert ds.attrs["training_rounding"] == 2.0**-8
    assert ds.attrs["loss_replay_bound"] == 16 * 2.0**-8 and ds.attrs["grad_replay_bound"] == 32 * 2.0**-8
    assert np.all(np.isnan(ds.loss_resolution.values)) and not np.any(ds.pair_flags.values & BELOW)
    assert np.all(ds.grad_replay_error.values > 1e-4)  # the float32 replay differs from bf16 training...
    assert np.all(ds.grad_replay_error.values <= ds.attrs["grad_replay_bound"])  # ...within its rounding


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a convolution fed by BatchNorm: forward-mode AD under autocast fails there
        return self.fc(self.conv2(torch.relu(self.bn(self.conv(x)))).flatten(1))


def make_conv() -> object:
    import trajscope

    return trajscope.Objective(model=_Conv(), loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]))


def test_forward_mode_under_autocast_falls_back_to_reverse(tmp_path: Path) -> None:
    model = _Conv().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with Recorder(tmp_path / "run", model, opt, objective=f"{__name__}:make_conv") as rec:
        for _ in range(3):
            x = torch.randn(6, 3, 6, 6, generator=g).to(memory_format=torch.channels_last)
            _bf16_step(rec, model, opt, (x, torch.randint(0, 3, (6,), generator=g)))
    snap = open_run(tmp_path / "run").snapshot(0)
    assert snap.params["conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert snap.batch[0].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ForwardModeError, match=r"autocast.*use --derivatives reverse"):
        analyze(tmp_path / "run", derivatives="forward", write=False, progress=False)
    ds, caught = _analyze(tmp_path / "run", write=False)
    assert ds.attrs["derivatives"] == "reverse"
    assert "under bfloat16 autocast" in ds.attrs["derivatives_reason"]
    assert not [m for m in caught if "replay failed" in m]
    assert np.all(ds.loss_replay_error.values <= 1e-6) and np.all(ds.grad_replay_error.values <= 1e-4)


@pytest.mark.parametrize("meta, what", [
    ({"autocast": {"cpu": {"dtype": "int8"}}}, "'autocast'"),
    ({"autocast": ["cpu"]}, "'autocast'"),
    ({"memory_formats": {"param/w": "nhwc"}}, "'memory_formats'"),
])
def test_malformed_forward_metadata_is_refused(tmp_path: Path, meta: dict[str, object], what: str) -> None:
    with pytest.raises(RunFormatError, match=what):
        check_meta({"step": 0, **meta}, tmp_path / "step_00000000.safetensors")


def test_a_replay_that_cannot_compile_runs_eagerly_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling the gradient passes of a compiled run can fail (no C++ compiler): f runs eagerly,
    with one ProbeWarning; an error of the loss itself is not swallowed."""
    import torch._dynamo.exc

    from trajscope.errors import ProbeWarning
    from trajscope.probe.stages import compiled_as_trained

    def broken(f: object) -> object:
        def call(params: object) -> torch.Tensor:
            raise torch._dynamo.exc.TorchDynamoException("backend failed")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    f = lambda p: (p["w"] ** 2).sum()  # noqa: E731
    with compiled_as_trained(True) as compile_f, pytest.warns(ProbeWarning, match="replayed eagerly"):
        assert float(compile_f(f)({"w": torch.tensor([3.0])})) == 9.0
    with compiled_as_trained(False) as compile_f:
        assert compile_f(f) is f

    def failing(p: object) -> torch.Tensor:
        raise ValueError("the loss's own error")

    monkeypatch.setattr(torch, "compile", lambda g: g)
    with compiled_as_trained(True) as compile_f, pytest.raises(ValueError, match="own error"):
        compile_f(failing)({"w": torch.tensor([1.0])})


def test_reanalyzing_an_autocast_run_reuses_its_persisted_pairs(tmp_path: Path) -> None:
    """The check that the objective still computes a persisted pair compares one plain pass with
    the pair's own plain pass: under autocast, the batched ℓ(0) rounds differently."""
    run = tmp_path / "run"
    _train_bf16(run, [0.5] * 3)
    first, _ = _analyze(run)
    again, caught = _analyze(run)
    assert not [m for m in caught if "objective changed" in m], caught
    np.testing.assert_array_equal(first.grad_replay_error.values, again.grad_replay_error.values)


def test_the_cli_says_the_evaluation_ran_under_training_autocast(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                  ) -> None:
    from support.rundirs import cli

    _train_bf16(tmp_path / "run", [0.5] * 2)
    code, out, _ = cli(["analyze", str(tmp_path / "run")], capsys)
    assert code == 0
    assert "precision: as trained: float32 under bfloat16 autocast" in out.splitlines()
    code, out, _ = cli(["analyze", str(tmp_path / "run"), "--dtype", "float32", "--force"], capsys)
    assert code == 0 and "precision: float32 (training ran under bfloat16 autocast)" in out.splitlines()
