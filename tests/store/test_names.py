"""The shared parameter comparison by name, shape and dtype (trajscope.store.names)."""

from __future__ import annotations

import torch

from trajscope.store.names import Mismatch, dtypes, first, mismatches, shapes


def test_mismatches_in_order() -> None:
    expected = {"a": (2, 3), "b": [4], "c": (1,), "d": ()}
    actual = {"z": (1,), "b": (5,), "a": (2, 3), "d": (), "y": (2,)}
    found = list(mismatches(expected, actual, expected_dtypes={"a": "float32", "d": None},
                            actual_dtypes={"a": "float64", "d": "int64"}))
    assert found == [
        Mismatch("dtype", "a", "float32", "float64"),
        Mismatch("shape", "b", (4,), (5,)),
        Mismatch("missing", "c"),
        Mismatch("extra", "z"),
        Mismatch("extra", "y"),
    ]
    assert first(mismatches(expected, actual), "missing", "extra") == Mismatch("missing", "c")
    assert first(mismatches(expected, expected)) is None


def test_shapes_and_dtypes_of_tensors() -> None:
    t = {"w": torch.zeros(2, 3, dtype=torch.float64), "s": torch.tensor(1)}
    assert shapes(t) == {"w": (2, 3), "s": ()}
    assert dtypes(t) == {"w": "float64", "s": "int64"}


