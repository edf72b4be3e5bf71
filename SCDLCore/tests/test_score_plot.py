"""The evaluation PNG (``scdl evaluate --plot``): bars are the summary's means, dots the cases' defined scores."""

from __future__ import annotations

import math

import numpy as np

from scdlcore.evaluation.metrics import EvaluationResult, OrganScores, mean_case_results
from scdlcore.visualize.score_plot import save_score_plot, score_figure


def _case(dice: dict[str, float], hd95: dict[str, float]) -> EvaluationResult:
    voxels = {"liver": 1000, "pancreas": 5, "esophagus": 0}  # pancreas: a minority organ; esophagus: absent
    organs = {name: OrganScores(dice[name], hd95[name], hd95[name] / 3, voxels[name], 10) for name in dice}
    return EvaluationResult.from_organs(organs, paper_mode=False)


def test_bars_are_the_means_and_dots_the_defined_scores_of_each_case(tmp_path) -> None:
    nan = math.nan
    cases = [
        (
            "a",
            _case(
                {"liver": 0.9, "pancreas": 0.2, "esophagus": nan}, {"liver": 4.0, "pancreas": 30.0, "esophagus": nan}
            ),
        ),
        (
            "b",
            _case({"liver": 0.7, "pancreas": nan, "esophagus": nan}, {"liver": 8.0, "pancreas": nan, "esophagus": nan}),
        ),
    ]
    summary = mean_case_results([result for _, result in cases])
    dice_axes, hd95_axes = score_figure(summary, cases).axes

    assert [bar.get_height() for bar in dice_axes.patches] == [0.8, 0.2, 0.0]  # esophagus: no score, no bar
    assert np.allclose([bar.get_height() for bar in hd95_axes.patches], [6.0, 30.0, 0.0])
    dots = [line.get_ydata().tolist() for line in dice_axes.lines]
    assert dots == [[0.9, 0.2], [0.7]]  # case b has no pancreas score: no dot
    assert [label.get_text() for label in hd95_axes.get_xticklabels()] == ["liver", "pancreas *", "esophagus"]
    assert save_score_plot(tmp_path / "s.png", summary, cases).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
