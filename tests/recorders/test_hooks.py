"""The recorder's hooks (trajscope.recorders.hooks) keep it invisible to the training program: the model
and optimizer stay copyable and picklable while recording, copies never call into the recorder, no hook
remains after close, the gradient hooks that measure a clip sit only on recorded steps, and a compiled or
wrapped model is recorded under the plain model's parameter names (trajscope.recorders.capture.unwrap_model).

Each recording is analyzed: a copy whose forward pass (with dropout) ran as if it were the recorded
model's would have its RNG state captured for the step, and the replay errors would show it.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import pickle
import shutil
import weakref
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

import trajscope
from support.recorder_objectives import (
    batches,
    dataset,
    make_mlp,
    make_mlp_dropout,
    mlp,
    one_torch_thread,  # noqa: F401 - autouse fixture
    xent,
)
from support.recording import record
from trajscope.recorders import Recorder
from trajscope.recorders.capture import unwrap_model
from trajscope.recorders.hooks import BoundHook, InertHook
from trajscope.store.run import open_run

STEPS = 5
LOSS_BOUND, GRAD_BOUND = 1e-6, 1e-4


def _recorder_hooks(obj: Any) -> list[Any]:
    """The recorder's hooks still registered on a module or an optimizer."""
    dicts = [getattr(obj, name, {}) for name in
             ("_forward_pre_hooks", "_forward_hooks", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")]
    return [h for d in dicts for h in d.values() if isinstance(h, BoundHook)]


def _check_replay(run_dir: Path, pairs: int = STEPS) -> None:
    ds = trajscope.analyze(run_dir, make_mlp_dropout, progress=False)
    assert ds.sizes["step"] == pairs  # pairs (x_t, x_t+1) of the run, the last one ending at x_T
    for name in ("loss_replay_error", "grad_replay_error"):
        assert not bool(ds[name].isnull().any()), name
    assert float(ds.loss_replay_error.max()) <= LOSS_BOUND
    assert float(ds.grad_replay_error.max()) <= GRAD_BOUND


def test_copies_and_pickles_during_recording_carry_no_live_hook(tmp_path: Path) -> None:
    model = make_mlp_dropout().model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = dataset()
    idx = batches(STEPS, size=16)
    with Recorder(tmp_path / "run", model, opt, objective=make_mlp_dropout) as rec:
        ema = AveragedModel(model)  # deep-copies the model, hooks included
        for step in range(STEPS):
            best = copy.deepcopy(model)
            buf = io.BytesIO()
            torch.save(model, buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=False)
            unpickled = pickle.loads(pickle.dumps(model))
            opt_copy = copy.deepcopy(opt)
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            model.load_state_dict(model.state_dict())
            for clone in (best, loaded, unpickled, ema.module):
                assert clone._forward_pre_hooks and all(
                    isinstance(h, InertHook) for h in clone._forward_pre_hooks.values())
            assert not _recorder_hooks(opt_copy)
            # Training-mode forward passes of the copies, with grad and dropout, right before the
            # recorded model's own: a live hook on a copy would capture the RNG state here.
            probe = x[:8]
            for clone in (best, loaded, unpickled, ema):
                clone.train()
                clone(probe).sum().backward()
            assert rec._capture.pending is None

            opt.zero_grad()
            mb = (x[idx[step]], y[idx[step]])
            loss = xent(model, mb)
            loss.backward()
            rec.batch(mb, loss=loss)
            opt.step()
            ema.update_parameters(model)
    assert not _recorder_hooks(model) and not _recorder_hooks(opt)
    assert open_run(tmp_path / "run").snapshot(1).rng  # captured at the model's forward pass
    _check_replay(tmp_path / "run")


def test_no_hook_remains_after_an_exception_in_the_with_block(tmp_path: Path) -> None:
    model = mlp(dropout=0.3)
    opt = torch.optim.Adam(model.parameters())
    n_pre, n_post = len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    with pytest.raises(ValueError, match="training failed"):
        with Recorder(tmp_path / "run", model, opt):
            assert len(_recorder_hooks(model)) == 1 and len(_recorder_hooks(opt)) == 2
            raise ValueError("training failed")
    assert not _recorder_hooks(model) and not _recorder_hooks(opt)
    assert not model._forward_pre_hooks
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == (n_pre, n_post)


def test_an_open_recorder_stays_alive_without_a_reference_until_closed(tmp_path: Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(tmp_path / "run", model, opt)
    rec.start()
    ref = weakref.ref(rec)
    del rec
    gc.collect()
    alive = ref()
    assert alive is not None
    alive.close()
    del alive
    gc.collect()
    assert ref() is None


def test_a_hook_acts_only_for_its_own_module_and_while_its_owner_lives() -> None:
    calls: list[Any] = []

    class Owner:
        def hook(self, module: torch.nn.Module, args: Any) -> None:
            calls.append(module)

    model, other = mlp(), mlp()
    owner = Owner()
    hook = BoundHook(owner.hook, model)
    hook(other, ())
    assert calls == []
    hook(model, ())
    assert calls == [model]
    replica = model._replicate_for_data_parallel()  # what DataParallel runs on each device
    hook(replica, ())
    assert calls == [model, replica]
    del owner  # the hook holds its owner weakly: no call into a recorder that is gone
    hook(model, ())
    assert calls == [model, replica]
    assert isinstance(copy.copy(hook), InertHook) and isinstance(pickle.loads(pickle.dumps(hook)), InertHook)


def test_unwrap_model_removes_compile_and_data_parallel_wrappers() -> None:
    model = mlp()
    compiled = cast(torch.nn.Module, torch.compile(torch.nn.DataParallel(model), backend="eager"))
    wrapped = torch.nn.DataParallel(compiled)
    assert unwrap_model(wrapped) is model
    assert unwrap_model(model) is model


def _train_compiled(run_dir: Path, compiled: torch.nn.Module, model: torch.nn.Module, **kwargs: Any) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = dataset()
    record(run_dir, compiled, opt, xent, [(x[i], y[i]) for i in batches(STEPS, size=16)],
           objective=make_mlp_dropout, **kwargs)
    assert not _recorder_hooks(model) and not _recorder_hooks(compiled) and not _recorder_hooks(opt)


def _param_names(run_dir: Path) -> list[str]:
    manifest = json.loads((run_dir / "trajscope.json").read_text())
    return [p["name"] for p in manifest["params"]]


def test_a_compiled_model_is_recorded_under_the_plain_model_names(tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    model = make_mlp_dropout().model
    # backend="eager": the OptimizedModule wrapper and dynamo's tracing of the hooks, without a C compiler
    compiled = cast(torch.nn.Module, torch.compile(model, backend="eager"))
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    counters.clear()
    # Recorded steps 0, 1, 3, 4 (and x_5 at close): the hook's decisions change from step to step.
    _train_compiled(tmp_path / "run", compiled, model, every=3, window=2)
    # The hook runs outside the graph: dynamo neither traces the recorder nor recompiles per step.
    assert counters["stats"]["unique_graphs"] == 1
    assert _param_names(tmp_path / "run") == [n for n, _ in model.named_parameters()]
    assert open_run(tmp_path / "run").snapshot(1).rng  # the pre-hook fired under the compiled call
    _check_replay(tmp_path / "run", pairs=3)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_an_inductor_compiled_model_with_dropout_replays(tmp_path: Path) -> None:
    import torch._inductor.config as inductor_config

    # Inductor draws dropout masks from its own generator unless told to use eager's RNG, which is
    # the stream the recorder captures and the replay uses. Set through the config's own patch():
    # a monkeypatch.setattr of it, once undone, hides the option from every later patch() in the
    # process (examples/charlm.py's, in tests/system/test_examples.py).
    with inductor_config.patch(fallback_random=True):
        model = make_mlp_dropout().model
        compiled = cast(torch.nn.Module, torch.compile(model))
        _train_compiled(tmp_path / "run", compiled, model)
        assert _param_names(tmp_path / "run") == [n for n, _ in model.named_parameters()]
        _check_replay(tmp_path / "run")


def _grad_hooks(model: torch.nn.Module) -> list[Any]:
    return [h for p in model.parameters() for h in (p._post_accumulate_grad_hooks or {}).values()]


def test_hooks_only_on_recorded_steps_inert_in_copies_and_gone_after_close(tmp_path: Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset()
    seen: list[int] = []
    with Recorder(tmp_path / "run", model, opt, objective=make_mlp, every=4, window=2) as rec:
        for idx in batches(8, size=8):
            seen.append(len(_grad_hooks(model)))
            if seen[-1]:
                for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
                    # torch copies no post-accumulate-grad hook; one that did would be inert
                    assert all(isinstance(h, InertHook) for h in _grad_hooks(clone))
                assert all(isinstance(h, BoundHook) for h in _grad_hooks(model))
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            rec.batch((x[idx], y[idx]), loss=loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            opt.step()
    n = len(list(model.parameters()))
    assert seen == [n, n, 0, 0, n, n, 0, 0]  # steps 0, 1, 4, 5 are recorded
    assert not _grad_hooks(model)
