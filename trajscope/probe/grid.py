"""The α grid along each step, and the bounds of its arguments.

Imports nothing heavy at module level (numpy is imported by :func:`alpha_grid` itself), so the
command line reads :data:`MAX_POINTS` and :data:`MAX_MARGIN` for its option ranges without paying
for numpy at ``trajscope --help``.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

from trajscope.errors import AnalysisError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["MAX_GRID", "MAX_MARGIN", "MAX_POINTS", "alpha_grid"]

MAX_POINTS = 10001
"""Upper bound of ``points``: each pair holds (points × layers) float64 arrays per field."""
MAX_MARGIN = 100.0
"""Upper bound of ``margin`` (in units of the step): beyond it the grid leaves any region where
the loss along the step says something about the step, and huge values overflow to inf."""
MAX_GRID = 2 * MAX_POINTS - 1
"""Upper bound of the grid's length, margins included (each α point is one model evaluation per
pair): the largest ``points`` with the default margin 0.5."""


def alpha_grid(points: int = 9, margin: float = 0.5) -> np.ndarray:
    """The α grid: ``points`` equally spaced points on [0, 1] extended by ``margin`` on each side.

    The spacing is h = 1/(points−1); the margin is rounded to whole steps, so 0 and 1 are always
    exact grid points: α_i = i·h for i = −n … points−1+n, n = round(margin·(points−1)). The
    default (9, 0.5) gives 17 points on [−0.5, 1.5].

    Raises:
        AnalysisError: ``points`` not an int in [2, :data:`MAX_POINTS`], ``margin`` not a
            finite number in [0, :data:`MAX_MARGIN`], or more than :data:`MAX_GRID` points in all.
    """
    import numpy as np

    if not isinstance(points, int) or isinstance(points, bool) or not 2 <= points <= MAX_POINTS:
        raise AnalysisError(
            f"points={points!r}: expected an int from 2 to {MAX_POINTS} (the grid needs α=0 and α=1)"
        )
    if (not isinstance(margin, numbers.Real) or isinstance(margin, bool) or not math.isfinite(margin)
            or not 0 <= margin <= MAX_MARGIN):
        raise AnalysisError(
            f"margin={margin!r}: expected a finite number from 0 to {MAX_MARGIN:g} (in units of the step)"
        )
    n = int(round(margin * (points - 1)))
    if points + 2 * n > MAX_GRID:
        raise AnalysisError(
            f"points={points}, margin={margin:g}: the grid would have {points + 2 * n} α points "
            f"(each one model evaluation per pair); expected at most {MAX_GRID}"
        )
    return np.arange(-n, points + n, dtype=np.float64) / (points - 1)
