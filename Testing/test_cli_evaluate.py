"""``scdl evaluate`` end to end on the real labeled sample: table, JSON and CSV, paper mode, segment-first mode."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import slicerio

from scdlcore.cli import main
from scdlcore.io.read import read_label
from scdlcore.io.write import write_label
from scdlcore.labels import SYNAPSE13


def test_a_reference_scored_against_itself_is_perfect(samples, tmp_path, capsys):
    label = samples["ct_abdomen"].label
    assert (
        main(["evaluate", str(label), str(label), "--json", str(tmp_path / "s.json"), "--csv", str(tmp_path / "s.csv")])
        == 0
    )
    table = capsys.readouterr().out
    assert "liver" in table and "minority mean" in table
    summary = json.loads((tmp_path / "s.json").read_text())["summary"]
    assert summary["mean_dice"] == 1.0 and summary["mean_hd95"] == 0.0
    assert summary["organs"]["esophagus"]["dice"] is None, "absent from both: undefined, not 0 or 1"
    assert "adrenal_gland_right" in summary["minority_organs"]
    rows = {row["organ"]: row for row in csv.DictReader((tmp_path / "s.csv").read_text().splitlines())}
    assert float(rows["liver"]["dice"]) == 1.0 and rows["liver"]["distance_unit"] == "mm"


def test_a_shifted_prediction_loses_dice_and_gains_distance_in_mm(samples, tmp_path, capsys):
    reference = read_label(samples["ct_abdomen"].label)
    moved = np.zeros_like(reference.array)
    moved[2:] = reference.array[:-2]  # two 3 mm slices along z
    shifted = reference.with_array(moved)
    write_label(tmp_path / "shifted.nii.gz", shifted)
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "shifted.nii.gz"),
                str(samples["ct_abdomen"].label),
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    liver = json.loads((tmp_path / "s.json").read_text())["summary"]["organs"]["liver"]
    assert 0.8 < liver["dice"] < 1.0
    assert 3.0 <= liver["hd95_mm"] <= 6.0 + 1e-6, "a 6 mm shift: no surface point moves further"

    assert main(["evaluate", "--paper", str(tmp_path / "shifted.nii.gz"), str(samples["ct_abdomen"].label)]) == 0
    assert "paper-compatible mode" in capsys.readouterr().out


def test_model_mode_segments_each_image_first(samples, threshold_bundle, tmp_path, monkeypatch):
    sample = samples["ct_abdomen"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(threshold_bundle),
                "--device",
                "cpu",
                str(sample.image),
                str(sample.label),
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "s.json").read_text())
    assert (scores["cases"][0]["image"], scores["cases"][0]["reference"]) == (str(sample.image), str(sample.label))
    assert not any((tmp_path / "temp").iterdir()), "the predictions made for scoring are deleted"
    assert 0.0 <= scores["summary"]["organs"]["spleen"]["dice"] <= 1.0


def test_pairs_must_come_in_twos(samples, capsys):
    assert main(["evaluate", str(samples["ct_abdomen"].label)]) == 2
    assert "takes files in pairs" in capsys.readouterr().err


def test_a_slicer_segmentation_is_matched_by_segment_name_not_by_its_label_values(samples, tmp_path, capsys):
    """A .seg.nrrd saved by 3D Slicer numbers its segments 1, 2, 3... in the order they were made, not by
    the label table's values; its organs are found by terminology and name."""
    reference = read_label(samples["ct_abdomen"].label)
    segmentation = slicerio.create_segmentation(reference.shape[::-1], reference.ijk_to_lps)
    for label in reversed(SYNAPSE13.labels):  # the last organ of the table gets value 1
        mask = reference.array == label.value
        if mask.any():
            slicerio.add_segment(segmentation, mask.transpose(2, 1, 0), {"name": label.display_name})
    slicerio.write_segmentation(str(tmp_path / "slicer.seg.nrrd"), segmentation)
    assert not np.array_equal(read_label(tmp_path / "slicer.seg.nrrd").array, reference.array)  # really renumbered

    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "slicer.seg.nrrd"),
                str(samples["ct_abdomen"].label),
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "s.json").read_text())["summary"]
    assert summary["mean_dice"] == 1.0 and summary["mean_hd95"] == 0.0


def test_folders_pair_nnunet_channel_names_as_dataset_import_does(samples, tmp_path, capsys):
    """imagesTs/case_0000 with labelsTs/case: the same rule as `scdl dataset import` (io.match_by_case)."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    shutil.copy(samples["ct_abdomen"].label, first / "abdomen_0000.nii.gz")
    shutil.copy(samples["ct_abdomen"].label, second / "abdomen.nii.gz")
    assert main(["evaluate", str(first), str(second), "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert len(scores["cases"]) == 1 and scores["summary"]["mean_dice"] == pytest.approx(1.0)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_folder_of_predictions_is_scored_against_a_folder_of_references_by_case_name(
    samples, threshold_bundle, tmp_path, capsys
):
    """What a researcher runs after ``scdl segment CT... -o results/``.

    results/NAME.seg.nrrd scored against labels/NAME.nii.gz.
    """
    abdomen, dicom, chest = samples["ct_abdomen"], samples["ct_abdomen_dicom"], samples["ct_chest_nrrd"]
    results, labels = tmp_path / "results", tmp_path / "labels"
    assert (
        main(
            [
                "segment",
                str(abdomen.image),
                str(dicom.image),
                str(chest.image),
                "-o",
                str(results),
                "--model",
                str(threshold_bundle),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    labels.mkdir()
    shutil.copy(abdomen.label, labels / "example_ct.nii.gz")
    shutil.copy(dicom.label, labels / "example_ct_dicom.nii.gz")
    shutil.copy(dicom.label, labels / "lonely.nii.gz")
    capsys.readouterr()

    assert (
        main(
            [
                "evaluate",
                str(results),
                str(labels),
                "--json",
                str(tmp_path / "s.json"),
                "--plot",
                str(tmp_path / "s.png"),
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    height, width, _ = plt.imread(tmp_path / "s.png").shape  # a real PNG: Dice and HD95 panels, 13 organs
    assert (height, width) == (750, 915)
    scores = json.loads((tmp_path / "s.json").read_text())
    assert [(case["prediction"], case["reference"]) for case in scores["cases"]] == [
        (str(results / "example_ct.seg.nrrd"), str(labels / "example_ct.nii.gz")),
        (str(results / "example_ct_dicom.seg.nrrd"), str(labels / "example_ct_dicom.nii.gz")),
    ]
    assert f"1 case(s) of {labels} have no namesake in {results} and are not scored: lonely" in err
    assert f"1 case(s) of {results} have no namesake in {labels} and are not scored: CTChest4" in err
    case_lines = out.splitlines()[2:4]
    for line, case in zip(case_lines, scores["cases"]):
        name = Path(case["prediction"]).name.removesuffix(".seg.nrrd")
        printed, dice, hd95, minority = line.split()
        # The JSON holds rounded values: the printed digits match them up to one unit in the last place.
        assert printed == name
        assert float(dice) == pytest.approx(case["mean_dice"], abs=1.01e-4)
        assert float(hd95) == pytest.approx(case["mean_hd95"], abs=1.01e-2)
        assert float(minority) == pytest.approx(case["minority_mean_dice"], abs=1.01e-4)
    assert "mean of 2 cases, native grid (mm)" in out

    # The same scores as the two pairs given one by one.
    assert (
        main(
            ["evaluate", str(results / "example_ct.seg.nrrd"), str(abdomen.label), "--json", str(tmp_path / "one.json")]
        )
        == 0
    )
    assert json.loads((tmp_path / "one.json").read_text())["summary"]["mean_dice"] == scores["cases"][0]["mean_dice"]


@pytest.mark.slow
def test_model_mode_pairs_a_folder_of_cts_dicom_series_included_with_a_folder_of_references(
    samples, threshold_bundle, tmp_path, capsys
):
    dicom = samples["ct_abdomen_dicom"]
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(dicom.image, images / "patient2")  # a DICOM series subfolder is one CT
    labels.mkdir()
    shutil.copy(dicom.label, labels / "patient2.nii.gz")
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(threshold_bundle),
                "--device",
                "cpu",
                str(images),
                str(labels),
                "--json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    cases = json.loads((tmp_path / "s.json").read_text())["cases"]
    assert [(case["image"], case["reference"]) for case in cases] == [
        (str(images / "patient2"), str(labels / "patient2.nii.gz"))
    ]
