"""One comparison of two named sets of tensors (parameters or buffers) by name, shape and dtype.

The objective's model, the run's manifest and each snapshot name their parameters; before a replay
they must agree. :func:`mismatches` lists every difference in a fixed order and each caller words
it for its reader (an :class:`~trajscope.errors.ObjectiveError`, a skipped pair, a validation
problem). Torch-free: shapes are tuples of ints, dtypes strings such as ``"float32"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Mismatch", "mismatches", "first", "shapes", "dtypes"]

Kind = Literal["missing", "shape", "dtype", "extra"]


@dataclass(frozen=True)
class Mismatch:
    """One difference between the expected and the actual set.

    Attributes:
        kind: ``"missing"`` (expected, not in actual), ``"shape"``, ``"dtype"`` (both have it,
            differently), ``"extra"`` (in actual, not expected).
        name: the tensor's name.
        expected, actual: the two shapes (tuples) or dtypes (strings); None where absent.
    """

    kind: Kind
    name: str
    expected: Any = None
    actual: Any = None


def shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """name → shape tuple of anything with a ``.shape`` (tensors, arrays)."""
    return {n: tuple(t.shape) for n, t in tensors.items()}


def dtypes(tensors: Mapping[str, Any]) -> dict[str, str]:
    """name → dtype as the run format writes it (``"float32"``, not ``"torch.float32"``)."""
    return {n: str(t.dtype).removeprefix("torch.") for n, t in tensors.items()}


def mismatches(expected: Mapping[str, Sequence[int]], actual: Mapping[str, Sequence[int]], *,
               expected_dtypes: Mapping[str, str | None] | None = None,
               actual_dtypes: Mapping[str, str] | None = None) -> Iterator[Mismatch]:
    """Every difference between ``expected`` and ``actual`` (name → shape), lazily, in this order:

    for each expected name in order, ``missing`` or else ``shape`` then ``dtype`` (a dtype is
    compared only where both dtype maps name it and the expected one is not None); then ``extra``
    for each actual name not expected, in actual's order.

    Shapes compare as tuples, so a JSON list ``[3, 4]`` equals a tensor's ``(3, 4)``.
    """
    for name, want in expected.items():
        if name not in actual:
            yield Mismatch("missing", name)
            continue
        have = actual[name]
        if tuple(have) != tuple(want):
            yield Mismatch("shape", name, tuple(want), tuple(have))
        if expected_dtypes is not None and actual_dtypes is not None:
            want_dt, have_dt = expected_dtypes.get(name), actual_dtypes.get(name)
            if want_dt is not None and have_dt is not None and want_dt != have_dt:
                yield Mismatch("dtype", name, want_dt, have_dt)
    for name in actual:
        if name not in expected:
            yield Mismatch("extra", name)


def first(found: Iterator[Mismatch], *kinds: Kind) -> Mismatch | None:
    """The first mismatch of one of ``kinds`` (all kinds if none given), or None."""
    return next((m for m in found if not kinds or m.kind in kinds), None)
