"""A PNG of evaluation scores: Dice and HD95 per organ, the mean over cases as bars, each case as a dot.

Organs absent from a case's reference and prediction have no score there and leave no dot; an organ
without any score has no bar. Minority organs (under 1% of the reference foreground) are starred, as
in :meth:`scdlcore.evaluation.metrics.EvaluationResult.format_table`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from scdlcore._atomic import atomic_write
from scdlcore.evaluation.metrics import EvaluationResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["save_score_plot", "score_figure"]

_DOT_JITTER = 0.25  # half-width (in bars) over which the cases' dots are spread


def save_score_plot(
    path: str | os.PathLike, summary: EvaluationResult, cases: Sequence[tuple[str, EvaluationResult]]
) -> Path:
    """Write :func:`score_figure` as a PNG (atomically)."""
    figure = score_figure(summary, cases)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def score_figure(summary: EvaluationResult, cases: Sequence[tuple[str, EvaluationResult]]) -> Figure:
    """Dice (top) and HD95 (bottom) per organ: ``summary``'s means as bars, each of ``cases`` as dots.

    Args:
        summary: the per-organ means (one case: that case's scores).
        cases: each case's name and scores.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    organs = list(summary.organs)
    labels = [name + (" *" if name in summary.minority_organs else "") for name in organs]
    unit = "voxels" if summary.paper_mode else "mm"
    figure = Figure(figsize=(max(8.0, 0.55 * len(organs) + 2), 7.5))
    FigureCanvasAgg(figure)
    panels = figure.subplots(2, 1, sharex=True)
    for axes, (key, title) in zip(panels, (("dice", "Dice"), ("hd95_mm", f"HD95 ({unit})"))):
        means = [getattr(summary.organs[name], key) for name in organs]
        axes.bar(range(len(organs)), [0.0 if math.isnan(m) else m for m in means], color="#4c72b0", alpha=0.75)
        for index, (_, result) in enumerate(cases):
            offset = _DOT_JITTER * (2 * index / (len(cases) - 1) - 1) if len(cases) > 1 else 0.0
            points = [
                (i + offset, getattr(result.organs[name], key))
                for i, name in enumerate(organs)
                if name in result.organs
            ]
            points = [(x, y) for x, y in points if not math.isnan(y)]
            axes.plot([x for x, _ in points], [y for _, y in points], "o", color="black", markersize=3)
        axes.set_ylabel(title)
        axes.grid(axis="y", alpha=0.3)
    panels[0].set_ylim(0, 1)
    panels[1].set_xticks(range(len(organs)), labels, rotation=45, ha="right")
    cases_text = f"{len(cases)} case{'s' if len(cases) != 1 else ''}"
    figure.suptitle(
        f"Mean Dice {summary.mean_dice:.3f}, minority mean Dice {summary.minority_mean_dice:.3f} "
        f"({cases_text}; bars: mean, dots: cases; * minority organ)"
    )
    figure.tight_layout()
    return figure
