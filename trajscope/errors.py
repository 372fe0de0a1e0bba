"""The one exception hierarchy of trajscope.

Every failure that a user can cause (a bad argument, a damaged run directory, an objective that
cannot be imported) raises a subclass of :class:`TrajscopeError`. Its message is one line that names
the culprit (file, step, argument) and says what was expected, so the CLI can print it as is.
Anything else that escapes is a bug in trajscope.

Recoverable trouble (a damaged step that costs only its pairs, non-finite values in a pair) is
reported with a :class:`TrajscopeWarning` and, where it affects results, in the Dataset itself.
"""

from __future__ import annotations

__all__ = [
    "TrajscopeError",
    "RecorderError",
    "RunFormatError",
    "ObjectiveError",
    "AnalysisError",
    "ForwardModeError",
    "MetricRegistrationError",
    "TrajscopeWarning",
    "DamagedRunWarning",
    "ProbeWarning",
    "one_line",
]


class TrajscopeError(Exception):
    """Base class of every error trajscope raises on purpose."""


class RecorderError(TrajscopeError):
    """The recorder was misused (e.g. ``rec.batch`` not called before a recorded step)."""


class RunFormatError(TrajscopeError):
    """A run directory is missing, damaged, or not in a format this version understands."""


class ObjectiveError(TrajscopeError):
    """The objective cannot be imported, returns the wrong thing, or does not match the run."""


class AnalysisError(TrajscopeError):
    """The analysis cannot proceed with the given settings."""


class ForwardModeError(AnalysisError):
    """The forward-mode derivative path cannot evaluate the loss: an op it uses has no
    forward-mode AD rule. ``what`` names the op (``aten::…``, a custom ``autograd.Function``)."""

    def __init__(self, message: str, what: str = "an op") -> None:
        super().__init__(message)
        self.what = what

    def __reduce__(self) -> tuple[object, ...]:  # crosses process boundaries with its ``what``
        return (type(self), (str(self), self.what))


class MetricRegistrationError(TrajscopeError):
    """A metric (built-in or plugin) breaks the registry's contract."""


class TrajscopeWarning(UserWarning):
    """Base class of the warnings trajscope issues for trouble it can work around."""


class DamagedRunWarning(TrajscopeWarning):
    """Part of a run is missing or damaged; only the affected pairs are skipped."""


class ProbeWarning(TrajscopeWarning):
    """The probe took a slower path with the same numbers (e.g. ``vmap`` could not batch the
    α points, so they were evaluated one by one)."""


def one_line(text: object, limit: int = 2000) -> str:
    """``text`` as one printable line: control characters (newlines, ANSI escapes, NUL, bidi
    overrides) are shown as escapes, so a string from a hostile run directory can neither break a
    one-line message nor drive the terminal. Long text is shortened in the middle."""
    s = str(text)
    out = []
    for ch in s:
        if ch == "\t":
            out.append(" ")
        elif _unprintable(ch):
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
        else:
            out.append(ch)
    s = "".join(out)
    if len(s) > limit:
        s = s[: limit // 2] + " … " + s[-limit // 2 :]
    return s


def _unprintable(ch: str) -> bool:
    import unicodedata

    # Cc control, Cf format (bidi overrides, zero-width), Cs surrogates, Co private use,
    # Cn unassigned, Zl/Zp line and paragraph separators.
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
