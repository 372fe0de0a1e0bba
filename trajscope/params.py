"""One comparison of two named sets of tensors (parameters or buffers) by name, shape and dtype.

The objective's model, the run's manifest and each snapshot name their parameters; before a replay
they must agree. :func:`mismatches` lists every difference in a fixed order and each caller words
it for its reader (an :class:`~trajscope.errors.ObjectiveError`, a skipped pair, a validation
problem). Torch-free: shapes are tuples of ints, dtypes strings such as ``"float32"``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["WRAPPER_PREFIXES", "Mismatch", "mismatches", "first", "shapes", "dtypes", "strip_prefix",
           "wrapper_prefix"]

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


WRAPPER_PREFIXES = ("_orig_mod.", "module.")
"""What a wrapper puts before its model's names: ``torch.compile`` (``_orig_mod.``), DDP and
DataParallel (``module.``), in any combination (``module._orig_mod.``)."""


def wrapper_prefix(recorded: Iterable[str], model: Collection[str]) -> str:
    """The wrapper prefix to strip from ``recorded`` names so that each is one of ``model``'s
    names, or ``""`` when none applies.

    One applies when some recorded name is not in ``model``, every recorded name starts with the
    same run of :data:`WRAPPER_PREFIXES` components, and removing that run (the longest that
    works: a model may itself hold a submodule named ``module``) leaves only names ``model`` has.
    """
    names = list(recorded)
    if not names or all(n in model for n in names):
        return ""
    for prefix in reversed(_prefix_runs(names[0])):
        if all(n.startswith(prefix) and n[len(prefix):] in model for n in names):
            return prefix
    return ""


def _prefix_runs(name: str) -> list[str]:
    """The wrapper prefixes ``name`` starts with, shortest first (``"module._orig_mod.w"`` →
    ``["module.", "module._orig_mod."]``)."""
    runs: list[str] = []
    rest = name
    while True:
        part = next((p for p in WRAPPER_PREFIXES if rest.startswith(p)), None)
        if part is None:
            return runs
        rest = rest[len(part):]
        runs.append(name[: len(name) - len(rest)])


def strip_prefix(name: str, prefix: str) -> str:
    """``name`` without ``prefix`` (unchanged when it does not start with it)."""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name
