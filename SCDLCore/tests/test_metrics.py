"""Tests of scdlcore.evaluation.metrics: Dice, HD95 and ASD against hand-computed values and MONAI."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from scipy import ndimage

from scdlcore.evaluation.metrics import (
    PAPER_GRID_SHAPE,
    PAPER_MISSED_PENALTY,
    EvaluationResult,
    OrganScores,
    dice,
    evaluate_files,
    evaluate_labels,
    mean_case_results,
    surface_distances,
)
from scdlcore.io.volume import ImageError, Volume
from scdlcore.io.write import write_label
from scdlcore.labels import Label, LabelTable

# Three organs with non-consecutive values, so value != class index is exercised.
TABLE = LabelTable(
    name="test3",
    labels=(
        Label(1, "liver", "Liver", (221, 130, 101), "10200004", "Liver"),
        Label(3, "kidney", "Kidney", (185, 102, 83), "64033007", "Kidney"),
        Label(7, "adrenal", "Adrenal gland", (244, 217, 154), "23451007", "Adrenal gland"),
    ),
)
SPACING_ZYX = (3.0, 1.0, 0.5)  # mm, anisotropic so a swapped axis order changes every distance


def _cube(shape, start, size=4, value=1, dtype=np.uint8):
    labels = np.zeros(shape, dtype=dtype)
    labels[tuple(slice(s, s + size) for s in start)] = value
    return labels


def _blob(rng, shape, threshold):
    """A smooth random blob (a few connected components) as a boolean mask."""
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0) > threshold


def _monai_scores(pred, ref, spacing_zyx):
    """MONAI's HD95 and symmetric ASD of two binary masks (D, H, W)."""
    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))  # (B=1, C=1, D, H, W)
    y = torch.from_numpy(ref[None, None].astype(np.float32))
    kwargs = {"include_background": True, "spacing": list(spacing_zyx)}
    hd95 = compute_hausdorff_distance(y_pred, y, percentile=95, **kwargs).item()
    asd = compute_average_surface_distance(y_pred, y, symmetric=True, **kwargs).item()
    return hd95, asd


# --- dice ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ([1, 1, 0, 0], [1, 0, 0, 0], 2 * 1 / 3),  # |A&B| = 1, |A| + |B| = 3
        ([1, 1, 1, 0], [0, 1, 1, 1], 2 * 2 / 6),
        ([1, 0, 0, 0], [0, 0, 0, 1], 0.0),  # disjoint
        ([0, 1, 1, 0], [0, 1, 1, 0], 1.0),
        ([[1, 1], [0, 1]], [[1, 0], [0, 1]], 2 * 2 / 5),  # 2D (H, W)
    ],
)
def test_dice_matches_hand_computed_values(pred, ref, expected):
    assert dice(np.array(pred), np.array(ref)) == pytest.approx(expected)


def test_dice_of_two_empty_masks_is_nan():
    assert math.isnan(dice(np.zeros((2, 3, 4)), np.zeros((2, 3, 4))))


def test_dice_rejects_masks_of_different_shapes():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\).*\(3, 2\)"):
        dice(np.ones((2, 3)), np.ones((3, 2)))


# --- surface distances ---------------------------------------------------------------------------


def test_shifted_cubes_have_the_analytic_surface_distances_in_mm():
    # Two 4^3 cubes, the prediction one voxel (3 mm) further along z. Per direction, of the 56
    # surface voxels: 36 lie on the other cube's surface (0 mm); the 4 face-centre voxels of the
    # overlapping end face are inside the other cube, 1 voxel along x from its side (0.5 mm); the
    # 16 voxels of the far end face are one z step from the other cube's end face (3 mm).
    ref = _cube((10, 9, 8), (2, 2, 2))
    pred = _cube((10, 9, 8), (3, 2, 2))
    expected = np.sort(np.r_[np.zeros(36), np.full(4, 0.5), np.full(16, 3.0)])

    pred_to_ref, ref_to_pred = surface_distances(pred, ref, SPACING_ZYX)

    np.testing.assert_allclose(np.sort(pred_to_ref), expected)
    np.testing.assert_allclose(np.sort(ref_to_pred), expected)


def test_shifted_cubes_scores_in_mm():
    ref = _cube((10, 9, 8), (2, 2, 2), value=3)
    pred = _cube((10, 9, 8), (3, 2, 2), value=3)

    kidney = evaluate_labels(pred, ref, SPACING_ZYX, TABLE).organs["kidney"]

    assert kidney.dice == pytest.approx(2 * 48 / 128)  # 3 of 4 slices overlap
    assert kidney.hd95_mm == pytest.approx(3.0)  # the shift along z, in mm
    assert kidney.asd_mm == pytest.approx((8 * 0.5 + 32 * 3.0) / 112)  # pooled over both directions
    assert (kidney.reference_voxels, kidney.predicted_voxels) == (64, 64)


def test_single_voxels_are_as_far_apart_as_their_offset_in_mm():
    ref = np.zeros((6, 7, 8), dtype=bool)
    pred = np.zeros_like(ref)
    ref[1, 1, 1] = True
    pred[2, 3, 4] = True  # offset (1, 2, 3) voxels in (z, y, x)
    distance = math.sqrt((1 * 3.0) ** 2 + (2 * 1.0) ** 2 + (3 * 0.5) ** 2)

    pred_to_ref, ref_to_pred = surface_distances(pred, ref, SPACING_ZYX)

    np.testing.assert_allclose(pred_to_ref, [distance])
    np.testing.assert_allclose(ref_to_pred, [distance])


def test_surface_distances_reject_an_empty_mask_and_a_bad_spacing():
    mask = _cube((6, 6, 6), (1, 1, 1)).astype(bool)
    with pytest.raises(ValueError, match="pred is empty"):
        surface_distances(np.zeros_like(mask), mask, SPACING_ZYX)
    with pytest.raises(ValueError, match=r"spacing_zyx must be 3 positive"):
        surface_distances(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match=r"spacing_zyx must be 3 positive"):
        surface_distances(mask, mask, (1.0, 0.0, 1.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated internal argument
def test_scores_agree_with_monai_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (18, 26, 30)  # (D, H, W), non-cubic
    spacing_zyx = (2.5, 0.8, 0.7)
    ref_mask = _blob(rng, shape, 0.05)
    pred_mask = _blob(rng, shape, 0.05) | (ref_mask & (rng.random(shape) < 0.7))
    ref = np.where(ref_mask, 7, 0).astype(np.uint8)
    pred = np.where(pred_mask, 7, 0).astype(np.uint8)

    adrenal = evaluate_labels(pred, ref, spacing_zyx, TABLE).organs["adrenal"]
    monai_hd95, monai_asd = _monai_scores(pred_mask, ref_mask, spacing_zyx)

    assert adrenal.hd95_mm == pytest.approx(monai_hd95, rel=1e-4)
    assert adrenal.asd_mm == pytest.approx(monai_asd, rel=1e-4)


# --- evaluate_labels -----------------------------------------------------------------------------


def _three_organ_case():
    """Reference: liver (big cube), kidney (small cube), adrenal absent; prediction shifts the liver."""
    shape = (12, 30, 30)
    ref = np.zeros(shape, dtype=np.uint8)
    ref[1:11, 2:22, 2:22] = 1  # liver, 4000 voxels
    ref[4:6, 25:28, 25:28] = 3  # kidney, 18 voxels (< 1% of 4018)
    pred = np.zeros(shape, dtype=np.uint8)
    pred[1:11, 3:23, 2:22] = 1
    pred[4:6, 25:28, 25:28] = 3
    return pred, ref


def test_organ_absent_from_both_maps_is_nan_and_left_out_of_the_means():
    pred, ref = _three_organ_case()

    result = evaluate_labels(pred, ref, SPACING_ZYX, TABLE)

    adrenal = result.organs["adrenal"]
    assert math.isnan(adrenal.dice) and math.isnan(adrenal.hd95_mm) and math.isnan(adrenal.asd_mm)
    liver, kidney = result.organs["liver"], result.organs["kidney"]
    assert kidney.dice == 1.0 and kidney.hd95_mm == 0.0
    assert result.mean_dice == pytest.approx((liver.dice + 1.0) / 2)
    assert result.mean_hd95 == pytest.approx((liver.hd95_mm + 0.0) / 2)
    assert result.mean_asd == pytest.approx((liver.asd_mm + 0.0) / 2)


def test_predicted_organ_absent_from_reference_scores_dice_zero_and_no_distances():
    pred, ref = _three_organ_case()
    pred[8:10, 25:27, 25:27] = 7  # adrenal predicted, absent from the reference

    adrenal = evaluate_labels(pred, ref, SPACING_ZYX, TABLE).organs["adrenal"]

    assert adrenal.dice == 0.0
    assert math.isnan(adrenal.hd95_mm) and math.isnan(adrenal.asd_mm)
    assert (adrenal.reference_voxels, adrenal.predicted_voxels) == (0, 8)


def test_missed_organ_has_dice_zero_and_undefined_distances_on_the_native_grid():
    pred, ref = _three_organ_case()
    pred[pred == 3] = 0

    result = evaluate_labels(pred, ref, SPACING_ZYX, TABLE)

    kidney = result.organs["kidney"]
    assert kidney.dice == 0.0
    assert math.isnan(kidney.hd95_mm) and math.isnan(kidney.asd_mm)
    assert result.mean_hd95 == pytest.approx(result.organs["liver"].hd95_mm)


def test_paper_mode_penalises_a_missed_organ_with_128_voxels():
    pred, ref = _three_organ_case()
    pred[pred == 3] = 0

    result = evaluate_labels(pred, ref, SPACING_ZYX, TABLE, paper_mode=True)

    kidney = result.organs["kidney"]
    assert kidney.dice == 0.0
    assert kidney.hd95_mm == PAPER_MISSED_PENALTY == 128.0
    assert kidney.asd_mm == PAPER_MISSED_PENALTY
    assert math.isnan(result.organs["adrenal"].hd95_mm)  # absent from both: still excluded
    assert result.mean_hd95 == pytest.approx((result.organs["liver"].hd95_mm + 128.0) / 2)
    assert result.paper_mode and result.distance_unit == "voxel"


def test_paper_mode_resizes_to_160x160x80_and_measures_in_voxels():
    # (40, 80, 80) -> (80, 160, 160): every voxel becomes 2x2x2, so counts grow 8x and a shift of one
    # native voxel along z becomes 2 voxels whatever the spacing.
    assert PAPER_GRID_SHAPE == (80, 160, 160)
    ref = _cube((40, 80, 80), (10, 20, 20), size=6)
    pred = _cube((40, 80, 80), (11, 20, 20), size=6)

    liver = evaluate_labels(pred, ref, (5.0, 0.7, 0.7), TABLE, paper_mode=True).organs["liver"]

    assert (liver.reference_voxels, liver.predicted_voxels) == (8 * 216, 8 * 216)
    assert liver.dice == pytest.approx(5 / 6)
    assert liver.hd95_mm == pytest.approx(2.0)


def test_minority_organs_are_those_under_one_percent_of_reference_foreground():
    pred, ref = _three_organ_case()
    pred[4, 25:28, 25:28] = 0  # kidney prediction loses half its voxels

    result = evaluate_labels(pred, ref, SPACING_ZYX, TABLE)

    assert result.minority_organs == ["kidney"]  # 18 / 4018 voxels; the absent adrenal is not a minority
    assert result.minority_mean_dice == pytest.approx(2 * 9 / 27)


def test_no_minority_organ_gives_nan_minority_mean():
    ref = _cube((8, 8, 8), (1, 1, 1), value=1) + _cube((8, 8, 8), (4, 4, 4), size=3, value=3)

    result = evaluate_labels(ref, ref, (1.0, 1.0, 1.0), TABLE)

    assert result.minority_organs == []
    assert math.isnan(result.minority_mean_dice)


def test_evaluate_labels_rejects_different_shapes_and_fractional_labels():
    ref = _cube((6, 6, 6), (1, 1, 1))
    with pytest.raises(ValueError, match=r"same grid.*\(6, 6, 6\).*\(6, 6, 5\)"):
        evaluate_labels(ref, ref[..., :5], SPACING_ZYX, TABLE)
    with pytest.raises(ValueError, match="integer label map"):
        evaluate_labels(ref * 0.5, ref, SPACING_ZYX, TABLE)


def test_float_label_maps_with_whole_values_are_accepted():
    ref = _cube((6, 6, 6), (1, 1, 1), value=3)
    assert evaluate_labels(ref.astype(np.float32), ref, SPACING_ZYX, TABLE).organs["kidney"].dice == 1.0


def test_values_outside_the_table_are_ignored():
    ref = _cube((6, 6, 6), (1, 1, 1), value=1)
    pred = ref.copy()
    pred[0, 0, 0] = 200  # not an organ of the table
    result = evaluate_labels(pred, ref, SPACING_ZYX, TABLE)
    assert result.organs["liver"].dice == 1.0
    assert list(result.organs) == ["liver", "kidney", "adrenal"]


# --- reporting -----------------------------------------------------------------------------------


def test_reports_contain_every_organ_and_the_means():
    pred, ref = _three_organ_case()
    result = evaluate_labels(pred, ref, SPACING_ZYX, TABLE)

    as_dict = result.to_dict()
    assert set(as_dict["organs"]) == {"liver", "kidney", "adrenal"}
    assert as_dict["organs"]["kidney"]["reference_voxels"] == 18
    assert as_dict["mean_dice"] == result.mean_dice and as_dict["distance_unit"] == "mm"

    rows = result.to_csv_rows()
    assert [row["organ"] for row in rows] == ["liver", "kidney", "adrenal", "mean", "minority_mean"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    assert buffer.getvalue().count("\n") == 6

    table = result.format_table().splitlines()
    assert "HD95 (mm)" in table[0]
    kidney_line = next(line for line in table if line.startswith("kidney *"))
    assert kidney_line.split()[2:4] == ["1.0000", "0.00"]
    adrenal_line = next(line for line in table if line.startswith("adrenal"))
    assert adrenal_line.split()[1:4] == ["-", "-", "-"]
    assert len({len(line) for line in table[:6]}) == 1  # header, rule and organ rows aligned


def test_mean_case_results_averages_each_organ_over_the_cases_where_it_is_defined():
    first = EvaluationResult.from_organs(
        {"liver": OrganScores(0.9, 4.0, 1.0, 1000, 990), "kidney": OrganScores(0.6, 2.0, 0.5, 5, 4)},
        paper_mode=False,
    )
    second = EvaluationResult.from_organs(
        {"liver": OrganScores(0.7, 6.0, 3.0, 1000, 1010), "kidney": OrganScores(0.0, math.nan, math.nan, 30, 0)},
        paper_mode=False,
    )

    summary = mean_case_results([first, second])

    assert summary.num_cases == 2
    assert summary.organs["liver"] == OrganScores(pytest.approx(0.8), 5.0, 2.0, 2000, 2000)
    assert summary.organs["kidney"].dice == pytest.approx(0.3)
    assert summary.organs["kidney"].hd95_mm == 2.0  # NaN case skipped
    assert summary.mean_dice == pytest.approx(0.55)
    assert summary.minority_organs == []  # 35 of 2035 reference voxels = 1.7 %
    assert first.minority_organs == ["kidney"]  # 5 of 1005 = 0.5 %
    assert "mean of 2 cases" in summary.format_table()


def test_mean_case_results_rejects_no_cases_and_mixed_modes():
    native = EvaluationResult.from_organs({"liver": OrganScores(1.0, 0.0, 0.0, 8, 8)}, paper_mode=False)
    paper = EvaluationResult.from_organs({"liver": OrganScores(1.0, 0.0, 0.0, 8, 8)}, paper_mode=True)
    with pytest.raises(ValueError, match="at least one"):
        mean_case_results([])
    with pytest.raises(ValueError, match="native-grid"):
        mean_case_results([native, paper])


# --- evaluate_files ------------------------------------------------------------------------------


def _write_label(path, labels, spacing, origin=(0.0, 0.0, 0.0)):
    write_label(path, Volume(labels, spacing, origin, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)))


def test_evaluate_files_scores_nifti_files_in_mm(tmp_path):
    ref = _cube((10, 9, 8), (2, 2, 2), value=3)
    pred = _cube((10, 9, 8), (3, 2, 2), value=3)
    spacing_xyz = tuple(reversed(SPACING_ZYX))
    _write_label(tmp_path / "ref.nii.gz", ref, spacing_xyz)
    _write_label(tmp_path / "pred.nii.gz", pred, spacing_xyz)

    result = evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", TABLE)

    assert result.organs["kidney"].hd95_mm == pytest.approx(3.0)  # the z shift: spacing read in (x, y, z) order
    assert result.organs["kidney"].dice == pytest.approx(0.75)


def test_evaluate_files_names_both_files_when_grids_differ(tmp_path):
    ref = _cube((10, 9, 8), (2, 2, 2))
    _write_label(tmp_path / "ref.nii.gz", ref, (0.5, 1.0, 3.0))
    _write_label(tmp_path / "pred.nii.gz", ref, (0.5, 1.0, 3.0), origin=(0.0, 0.0, 12.0))

    with pytest.raises(ValueError, match=r"pred\.nii\.gz.*ref\.nii\.gz.*not on the same grid.*origin \(0, 0, 12\)"):
        evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", TABLE)


def test_evaluate_files_refuses_values_of_another_label_table(tmp_path):
    """A map with values the table lacks (another dataset's numbering) would be scored silently as if it matched."""
    ref = _cube((10, 9, 8), (2, 2, 2), value=3)
    _write_label(tmp_path / "ref.nii.gz", ref, (1.0, 1.0, 1.0))
    foreign = ref.copy()
    foreign[0, 0, 0] = 99
    _write_label(tmp_path / "foreign.nii.gz", foreign, (1.0, 1.0, 1.0))
    for pred, reference in (("ref", "foreign"), ("foreign", "ref")):
        with pytest.raises(
            ValueError, match=r"foreign\.nii\.gz holds label values \[99\] that are not in label table 'test3'"
        ):
            evaluate_files(tmp_path / f"{pred}.nii.gz", tmp_path / f"{reference}.nii.gz", TABLE)


def test_evaluate_files_reports_a_missing_file(tmp_path):
    _write_label(tmp_path / "ref.nii.gz", _cube((6, 6, 6), (1, 1, 1)), (1.0, 1.0, 1.0))

    with pytest.raises(ImageError, match=r"missing\.nii\.gz: no such file"):
        evaluate_files(tmp_path / "missing.nii.gz", tmp_path / "ref.nii.gz", TABLE)
