"""One comparison of two named sets of tensors (parameters or buffers) by name, shape and dtype,
and the choice of a pair's coordinates of x among the recorded parameters.

The objective's model, the run's manifest and each snapshot name their parameters; before a replay
they must agree. :func:`mismatches` lists every difference in a fixed order and each caller words
it for its reader (an :class:`~trajscope.errors.ObjectiveError`, a skipped pair, a validation
problem). :func:`coordinates` says which parameters are the coordinates of x for a pair (t, t+1).
Torch-free: shapes are tuples of ints, dtypes strings such as ``"float32"``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["WRAPPER_PREFIXES", "Coordinates", "Mismatch", "coordinates", "mismatches", "first", "shapes",
           "dtypes", "strip_prefix", "wrapper_prefix"]

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


@dataclass(frozen=True)
class Coordinates:
    """The coordinates of x for one pair (t, t+1).

    Attributes:
        names: the parameters that are coordinates, in order (the order of the per-layer arrays).
        unrecorded: those of ``names`` that are coordinates only because their value changed between
            x_t and x_{t+1} although step t recorded no gradient for them and did not name them
            trainable: the trainable set changed during training in a way the run does not record.
            Their Δ_t is real; their g_t counts as zero.
    """

    names: tuple[str, ...]
    unrecorded: tuple[str, ...] = ()


def coordinates(params: Sequence[str], with_grad: Collection[str], trainable: Sequence[str] | None,
                changed: Callable[[str], bool]) -> Coordinates:
    """Which recorded parameters are the coordinates of x for the pair (t, t+1).

    A parameter is a coordinate when it is in ``trainable`` (the parameters the optimizer updates at
    step t; None: those in ``with_grad``), when step t recorded a gradient for it (``with_grad``),
    or when ``changed(name)`` says its value differs between x_t and x_{t+1}. The last kind alone is
    listed in :attr:`Coordinates.unrecorded`: a parameter that moved is part of the update Δ_t
    whatever the run says, so ℓ(α) = f(x_t + αΔ_t) runs along the step training took.

    Order: ``trainable`` as given (else the parameters with a gradient in ``params`` order), then
    the other coordinates in ``params`` order. ``changed`` is asked only about parameters that are
    not coordinates otherwise (one comparison each).
    """
    base = list(trainable) if trainable is not None else [n for n in params if n in with_grad]
    taken = set(base)
    names, unrecorded = list(base), []
    for n in params:
        if n in taken:
            continue
        if n in with_grad:
            names.append(n)
        elif changed(n):
            names.append(n)
            unrecorded.append(n)
    return Coordinates(tuple(names), tuple(unrecorded))
