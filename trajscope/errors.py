"""The one exception hierarchy of trajscope.

Every failure that a user can cause (a bad argument, a damaged run directory, an objective that
cannot be imported) raises a subclass of :class:`TrajscopeError`. Its message is one line that names
the culprit (file, step, argument) and says what was expected, so the CLI can print it as is.
Anything else that escapes is a bug in trajscope.
"""

from __future__ import annotations

__all__ = [
    "TrajscopeError",
    "RecorderError",
    "RunFormatError",
    "ObjectiveError",
    "AnalysisError",
    "MetricRegistrationError",
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


class MetricRegistrationError(TrajscopeError):
    """A metric (built-in or plugin) breaks the registry's contract."""
