"""How a forward pass ran, as the recorder captures it (trajscope.recorders.forward)."""

from __future__ import annotations

import torch
from torch import nn

from trajscope.recorders.forward import StepCapture, autocast_state, capture_forward, memory_format, memory_formats


def test_autocast_in_force_is_read_per_device_type() -> None:
    assert autocast_state() == {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_state() == {"cpu": {"dtype": "bfloat16", "cache": True}}
    with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
        assert autocast_state() == {"cpu": {"dtype": "float16", "cache": False}}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert autocast_state() == {}


def test_autocast_decorating_the_forward_is_found() -> None:
    # accelerate's prepare() replaces model.forward with autocast(forward) wrapped once more; the
    # model's forward pre-hook runs before that autocast is entered.
    import functools
    from types import MethodType

    model = nn.Linear(3, 2)
    inner = torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward)

    @functools.wraps(inner)
    def outer(*args: object, **kwargs: object) -> object:
        return inner(*args, **kwargs)

    model.forward = MethodType(outer, model)  # type: ignore[method-assign]
    assert autocast_state(model) == {"cpu": {"dtype": "bfloat16", "cache": True}}
    assert autocast_state(nn.Linear(3, 2)) == {}
    # an adapter's knowledge of the framework's autocast (Lightning's precision plugin)
    given = torch.autocast("cpu", dtype=torch.float16, cache_enabled=False)
    assert autocast_state(nn.Linear(3, 2), given) == {"cpu": {"dtype": "float16", "cache": False}}


def test_memory_formats_name_only_tensors_not_laid_out_contiguous() -> None:
    x = torch.randn(2, 3, 4, 5)
    assert memory_format(x) is None
    assert memory_format(x.to(memory_format=torch.channels_last)) == "channels_last"
    assert memory_format(torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d)) == "channels_last_3d"
    assert memory_format(torch.randn(2, 1, 1, 1).to(memory_format=torch.channels_last)) is None  # both at once
    assert memory_format(x.transpose(0, 1)) is None  # strided otherwise: stored contiguous, replayed so
    entries = [("param/w", x.to(memory_format=torch.channels_last)), ("batch/0", x)]
    assert memory_formats(entries) == {"param/w": "channels_last"}


def test_each_micro_batch_keeps_its_own_rng_state() -> None:
    model = nn.BatchNorm1d(3)
    cap = StepCapture()
    states = []
    for i in range(3):
        torch.manual_seed(10 + i)
        states.append(torch.get_rng_state())
        cap.pending = capture_forward(model, buffers=i == 0)
        cap.on_batch(i)
    assert cap.of_step is not None and torch.equal(cap.of_step.tensors["rng/cpu"], states[0])
    assert "buffer/running_mean" in cap.of_step.tensors
    assert sorted(cap.later) == [1, 2]
    assert torch.equal(cap.later[2]["cpu"], states[2])
    meta: dict[str, object] = {}
    keys = [k for k, _ in cap.entries(model, meta)]
    assert "rng/micro1/cpu" in keys and "rng/micro2/cpu" in keys and "autocast" not in meta
    cap.clear()
    assert cap.later == {} and cap.for_snapshot() is None
