"""Which optimizer steps the recorder saves.

A schedule is a predicate ``step -> bool`` with a JSON description for the manifest. Metrics are
computed on *pairs* of consecutive recorded steps, so schedules record windows of consecutive steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trajscope.errors import RecorderError


@dataclass(frozen=True)
class Every:
    """Record steps t, t+1, …, t+window−1 for every t divisible by ``every`` (window−1 pairs each).

    ``every=1`` records every step, i.e. every consecutive pair.
    """

    every: int = 1
    window: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise RecorderError(f"every={self.every!r}: expected an int >= 1")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 2:
            raise RecorderError(
                f"window={self.window!r}: expected an int >= 2 (a pair needs two consecutive steps)"
            )

    def __call__(self, step: int) -> bool:
        return step % self.every < self.window

    def to_json(self) -> dict[str, Any]:
        return {"kind": "every", "every": self.every, "window": self.window}
