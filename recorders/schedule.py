"""Which optimizer steps the recorder saves.

A schedule is a predicate ``step -> bool`` with a JSON description for the manifest. Metrics are
computed on *pairs* of consecutive recorded steps, so schedules record windows of consecutive steps:
a window of w steps gives w−1 pairs. Three shapes cover what people ask for:

* :class:`Every` — a window every k steps (uniform coverage at a fixed cost fraction w/k);
* :class:`Log` — windows dense early and sparse late (training changes fastest at the start);
* :class:`At` — windows starting at explicit steps (e.g. around a loss spike seen in a previous run).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from trajscope.errors import RecorderError

__all__ = ["Schedule", "Every", "Log", "At", "as_schedule"]


@runtime_checkable
class Schedule(Protocol):
    """What the recorder needs from a schedule."""

    def __call__(self, step: int) -> bool: ...

    def to_json(self) -> dict[str, Any]: ...


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RecorderError(f"{name}={value!r}: expected an int >= {minimum}")


@dataclass(frozen=True)
class Every:
    """Record steps t, t+1, …, t+window−1 for every t divisible by ``every`` (window−1 pairs each).

    ``every=1`` records every step, i.e. every consecutive pair.
    """

    every: int = 1
    window: int = 2

    def __post_init__(self) -> None:
        _check_int("every", self.every, 1)
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 2:
            raise RecorderError(
                f"window={self.window!r}: expected an int >= 2 (a pair needs two consecutive steps)"
            )

    def __call__(self, step: int) -> bool:
        return step % self.every < self.window

    def to_json(self) -> dict[str, Any]:
        return {"kind": "every", "every": self.every, "window": self.window}


@dataclass(frozen=True)
class Log:
    """Windows starting at step 0 and at round(10^(i/per_decade)) for i = 0, 1, 2, …

    With the defaults (10 per decade, window 2) a 100k-step run records about 100 windows: every
    step up to ~10, then ever sparser (…, 1000, 1259, 1585, …). ``start`` shifts all windows (e.g.
    to skip a warm-up).
    """

    per_decade: int = 10
    window: int = 2
    start: int = 0
    _starts: list[int] = field(default_factory=list, init=False, repr=False, compare=False)
    _next_exponent: list[int] = field(default_factory=lambda: [0], init=False, repr=False,
                                      compare=False)

    def __post_init__(self) -> None:
        _check_int("per_decade", self.per_decade, 1)
        _check_int("window", self.window, 2)
        _check_int("start", self.start, 0)
        self._starts.append(0)

    def _extend(self, upto: int) -> None:
        # Starts are generated lazily: the number of steps is not known in advance.
        while self._starts[-1] <= upto:
            i = self._next_exponent[0]
            self._next_exponent[0] = i + 1
            nxt = round(10 ** (i / self.per_decade))
            if nxt > self._starts[-1]:
                self._starts.append(nxt)

    def __call__(self, step: int) -> bool:
        s = step - self.start
        if s < 0:
            return False
        self._extend(s)
        j = bisect.bisect_right(self._starts, s) - 1
        return s - self._starts[j] < self.window

    def to_json(self) -> dict[str, Any]:
        return {"kind": "log", "per_decade": self.per_decade, "window": self.window,
                "start": self.start}


@dataclass(frozen=True)
class At:
    """Windows starting at the given steps: ``At([100, 5000])`` records 100, 101, 5000, 5001.

    ``window=1`` records exactly the listed steps (pairs then exist only where two listed steps are
    consecutive).
    """

    steps: tuple[int, ...]
    window: int = 2

    def __init__(self, steps: Iterable[int], window: int = 2) -> None:
        try:
            items = list(steps)
        except TypeError:
            raise RecorderError(f"steps={steps!r}: expected an iterable of ints >= 0") from None
        for s in items:
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise RecorderError(f"steps={items!r}: expected ints >= 0, got {s!r}")
        listed = sorted(set(items))
        _check_int("window", window, 1)
        object.__setattr__(self, "steps", tuple(listed))
        object.__setattr__(self, "window", window)

    def __call__(self, step: int) -> bool:
        j = bisect.bisect_right(self.steps, step) - 1
        return j >= 0 and step - self.steps[j] < self.window

    def to_json(self) -> dict[str, Any]:
        return {"kind": "at", "steps": list(self.steps), "window": self.window}


def as_schedule(schedule: Any, every: int, window: int) -> Schedule:
    """The schedule the recorder uses: ``schedule`` if given, else ``Every(every, window)``.

    ``schedule`` may be a schedule object or a list of steps (an :class:`At` with ``window=1``:
    exactly those steps).
    """
    if schedule is None:
        return Every(every, window)
    if (every, window) != (1, 2):
        raise RecorderError(
            f"schedule={schedule!r} given together with every={every}, window={window}; "
            "pass one or the other"
        )
    if isinstance(schedule, (Every, Log, At)):
        return schedule
    if isinstance(schedule, (list, tuple, range, set, frozenset)):
        return At(schedule, window=1)
    if isinstance(schedule, Schedule):
        return schedule
    raise RecorderError(
        f"schedule={schedule!r}: expected Every(...), Log(...), At(...) or a list of steps"
    )

