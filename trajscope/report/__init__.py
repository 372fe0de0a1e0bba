"""Presenting an analysis: the headline and the summary (:mod:`~trajscope.report.summary`), the
paper-style figures (:mod:`~trajscope.report.figures`) and the report page of PNGs and
``index.html`` (:mod:`~trajscope.report.page`). Everything here is a function of metrics Datasets:
nothing re-runs a model.

The names below are imported on first use: ``trajscope analyze`` prints its headline without
loading the figures.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "FIGURES": "trajscope.report.figures",
    "FigureSpec": "trajscope.report.figures",
    "fig_convexity_ratio": "trajscope.report.figures",
    "fig_inst_gap": "trajscope.report.figures",
    "fig_loss": "trajscope.report.figures",
    "fig_loss_line": "trajscope.report.figures",
    "fig_replay": "trajscope.report.figures",
    "fig_smoothness": "trajscope.report.figures",
    "fig_update_corr": "trajscope.report.figures",
    "figure_data": "trajscope.report.figures",
    "Report": "trajscope.report.page",
    "load_runs": "trajscope.report.page",
    "write_report": "trajscope.report.page",
    "convexity_ratio_by_epoch": "trajscope.report.summary",
    "convexity_ratio_ema": "trajscope.report.summary",
    "convexity_ratio_window": "trajscope.report.summary",
    "ema": "trajscope.report.summary",
    "format_headline": "trajscope.report.summary",
    "format_summary": "trajscope.report.summary",
    "headline": "trajscope.report.summary",
    "holds_fraction": "trajscope.report.summary",
    "stability_ratio": "trajscope.report.summary",
    "summarize": "trajscope.report.summary",
}

__all__ = [
    "FIGURES", "FigureSpec", "Report", "convexity_ratio_by_epoch", "convexity_ratio_ema", "convexity_ratio_window",
    "ema", "fig_convexity_ratio", "fig_inst_gap", "fig_loss", "fig_loss_line", "fig_replay", "fig_smoothness",
    "fig_update_corr", "figure_data", "format_headline", "format_summary", "headline", "holds_fraction", "load_runs",
    "stability_ratio", "summarize", "write_report"
]

if TYPE_CHECKING:
    from trajscope.report.figures import (
        FIGURES,
        FigureSpec,
        fig_convexity_ratio,
        fig_inst_gap,
        fig_loss,
        fig_loss_line,
        fig_replay,
        fig_smoothness,
        fig_update_corr,
        figure_data,
    )
    from trajscope.report.page import Report, load_runs, write_report
    from trajscope.report.summary import (
        convexity_ratio_by_epoch,
        convexity_ratio_ema,
        convexity_ratio_window,
        ema,
        format_headline,
        format_summary,
        headline,
        holds_fraction,
        stability_ratio,
        summarize,
    )


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value = getattr(importlib.import_module(_LAZY[name]), name)
    return value


def __dir__() -> list[str]:
    return __all__
