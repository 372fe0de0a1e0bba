"""The α grid along each step (trajscope.probe.grid): its points, and the bounds of its arguments (and the
command line's option ranges, which are those bounds)."""

from __future__ import annotations

import pytest

from trajscope.errors import (
    AnalysisError,
)


@pytest.mark.parametrize("points,margin,message", [
    (1, 0.5, "points=1: expected an int from 2 to 10001 (the grid needs α=0 and α=1)"),
    (10002, 0.5, "points=10002: expected an int from 2 to 10001 (the grid needs α=0 and α=1)"),
    (9.0, 0.5, "points=9.0: expected an int from 2 to 10001 (the grid needs α=0 and α=1)"),
    (True, 0.5, "points=True: expected an int from 2 to 10001 (the grid needs α=0 and α=1)"),
    (9, -0.25, "margin=-0.25: expected a finite number from 0 to 100 (in units of the step)"),
    (9, 100.01, "margin=100.01: expected a finite number from 0 to 100 (in units of the step)"),
    (9, float("inf"), "margin=inf: expected a finite number from 0 to 100 (in units of the step)"),
    (9, float("nan"), "margin=nan: expected a finite number from 0 to 100 (in units of the step)"),
    (9, "0.5", "margin='0.5': expected a finite number from 0 to 100 (in units of the step)"),
    (10001, 0.6, "points=10001, margin=0.6: the grid would have 22001 α points (each one model "
                 "evaluation per pair); expected at most 20001"),
    (10001, 100, "points=10001, margin=100: the grid would have 2010001 α points (each one model "
                 "evaluation per pair); expected at most 20001"),
])
def test_alpha_grid_bounds(points: object, margin: object, message: str) -> None:
    from trajscope.probe import alpha_grid

    with pytest.raises(AnalysisError) as e:
        alpha_grid(points, margin)  # type: ignore[arg-type]
    assert str(e.value) == message


def test_alpha_grid_at_its_bounds_and_the_cli_ranges() -> None:
    from trajscope.cli import analyze
    from trajscope.probe.grid import MAX_GRID, MAX_MARGIN, MAX_POINTS, alpha_grid

    grid = alpha_grid(MAX_POINTS, 0.5)  # h = 1e-4; 5000 extra points on each side
    assert len(grid) == MAX_GRID and grid[0] == -0.5 and grid[-1] == 1.5
    assert grid[5000] == 0.0 and grid[5000 + MAX_POINTS - 1] == 1.0
    grid = alpha_grid(3, MAX_MARGIN)  # h = 0.5; 200 extra points on each side
    assert len(grid) == 403 and grid[0] == -100.0 and grid[-1] == 101.0
    assert list(alpha_grid(2, 0.0)) == [0.0, 1.0]
    ranges = {p.name: p.type for p in analyze.params if p.name in ("points", "margin")}
    assert (ranges["points"].min, ranges["points"].max) == (2, MAX_POINTS)  # type: ignore[attr-defined]
    assert (ranges["margin"].min, ranges["margin"].max) == (0, MAX_MARGIN)  # type: ignore[attr-defined]
