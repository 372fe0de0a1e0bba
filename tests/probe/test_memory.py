"""Sizes and the chunk plan of the memory budget (trajscope.probe.memory)."""

from __future__ import annotations

import pytest

from trajscope.errors import AnalysisError
from trajscope.probe.memory import SAFETY, parse_size, plan_chunk


def test_plan_and_sizes() -> None:
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size(1000) == 1000
    assert parse_size("1e6") == 10**6
    with pytest.raises(AnalysisError, match="expected bytes or a size"):
        parse_size("lots")
    assert plan_chunk(100 * 2**20, 10 * 2**20, 17) == int(100 / (SAFETY * 10))
    assert plan_chunk(10**12, 10, 17) == 17
