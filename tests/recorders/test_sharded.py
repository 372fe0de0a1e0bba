"""The parts of trajscope.recorders.sharded that need no process group: plain names, the recorded
mixed-precision policy, and a single process left alone. The layouts themselves are recorded under
torchrun in tests/system/test_fsdp.py."""

from __future__ import annotations

import torch
from torch import nn

from trajscope.recorders import sharded


def test_wrapper_components_are_dropped_from_names() -> None:
    assert sharded.clean_name("_fsdp_wrapped_module.0._fsdp_wrapped_module.weight") == "0.weight"
    assert sharded.clean_name("blocks.1._checkpoint_wrapped_module.attn.c_attn.bias") == "blocks.1.attn.c_attn.bias"
    assert sharded.clean_name("fsdp_wrapped_module_like.weight") == "fsdp_wrapped_module_like.weight"


def test_the_mixed_precision_policy_is_recorded_by_its_dtypes() -> None:
    from torch.distributed.fsdp import MixedPrecision, MixedPrecisionPolicy

    assert sharded._policy(MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)) == {
        "param_dtype": "bfloat16", "reduce_dtype": "float32"}
    assert sharded._policy(MixedPrecision(param_dtype=torch.float16, buffer_dtype=torch.float16)) == {
        "param_dtype": "float16", "buffer_dtype": "float16"}
    assert sharded._policy(MixedPrecisionPolicy()) is None and sharded._policy(None) is None


def test_a_single_process_is_not_sharded() -> None:
    assert sharded.detect(nn.Linear(2, 2), "hdf5") is None
