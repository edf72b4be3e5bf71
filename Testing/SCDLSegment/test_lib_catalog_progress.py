"""Reading the engine's listings and turning its events into panel text."""

from __future__ import annotations

import pytest

from scdlcore.labels import SYNAPSE13, Label, LabelTable
from SCDLSegmentLib.catalog import DatasetSummary, Suggestion, parse_dataset, parse_models, parse_suggestion, pick_model
from SCDLSegmentLib.progress import (
    dice_rows,
    finetune_estimate,
    format_train_progress,
    format_validation,
    format_volumes,
    segment_progress,
)

STARTER = {"name": "starter", "version": 1, "ref": "starter@1", "builtin": True, "description": "Starter model"}
TUNED = {
    "name": "abdomen",
    "version": 2,
    "spacing": [1.5, 1.5, 3.0],
    "lineage": {"parent": "starter@1", "steps": 300, "data_fingerprint": None},
    "metrics": {"mean_dice": 0.8123, "per_organ": {"liver": 0.9}},
}


def test_models_listing_is_read_with_refs_and_details():
    models = parse_models([STARTER, TUNED])
    assert [model.ref for model in models] == ["starter@1", "abdomen@2"]
    details = models[1].details()
    assert "Organs (13): Spleen, Right kidney" in details
    assert "Voxel size: 1.5 × 1.5 × 3 mm" in details
    assert "Lineage: parent starter@1, steps 300" in details
    assert "Metrics: mean_dice 0.812" in details and "per_organ" not in details
    assert "Lineage" not in models[0].details()  # the short listing does not say; `models info` does


def test_models_listing_uses_the_model_label_table_when_given():
    table = LabelTable(
        "two",
        (
            Label(1, "liver", "Liver", (1, 2, 3), "10200004", "Liver"),
            Label(2, "spleen", "Spleen", (4, 5, 6), "78961009", "Spleen"),
        ),
    )
    (model,) = parse_models({"models": [{"name": "small", "labels": table.to_dict()}]})
    assert model.labels == table and model.ref == "small"


def test_bad_models_listing_is_reported():
    with pytest.raises(ValueError, match="not a list of models"):
        parse_models({"error": "x"})
    with pytest.raises(ValueError, match="has no 'name'"):
        parse_models([{"version": 1}])


def test_pick_model_prefers_the_wanted_one_then_the_latest_trained():
    models = parse_models([STARTER, TUNED, {**TUNED, "version": 3}])
    assert pick_model(models, "abdomen@2").ref == "abdomen@2"
    assert pick_model(models, "abdomen").ref == "abdomen@3"
    assert pick_model(models, "").ref == "abdomen@3"
    assert pick_model(parse_models([STARTER]), "gone@9").ref == "starter@1"
    assert pick_model([], "x") is None


def test_dataset_counts_are_read_from_the_engines_listing():
    listing = {"root": "/d", "counts": {"labeled": 4, "partial": 2, "unlabeled": 7}, "cases": []}
    assert parse_dataset(listing) == DatasetSummary(4, 2, 7)
    assert DatasetSummary(4, 2, 7).reviewed == 6
    assert DatasetSummary(4, 2, 7).describe() == "6 reviewed (2 with some organs), 7 unlabeled"
    assert DatasetSummary(1, 0, 0).describe() == "1 reviewed, 0 unlabeled"
    for bad in ("nope", {"cases": []}, None):
        with pytest.raises(ValueError, match="has no 'counts'"):
            parse_dataset(bad)


def test_the_best_suggestion_is_read_from_the_engines_ranking():
    ranking = {
        "model": "starter@1",
        "suggestions": [
            {
                "case_id": "case0007",
                "image": "/d/case0007/image.nii.gz",
                "score": 0.4,
                "reason": "networks disagree on 40.0%",
            },
            {"case_id": "case0002", "image": "/d/case0002/image.nii.gz", "score": 0.1, "reason": "..."},
        ],
    }
    assert parse_suggestion(ranking) == Suggestion("/d/case0007/image.nii.gz", "case0007", "networks disagree on 40.0%")
    assert parse_suggestion({"model": "starter@1", "suggestions": []}) is None
    with pytest.raises(ValueError, match="no 'suggestions' list"):
        parse_suggestion({"case": {"image": "/x.nrrd"}})
    with pytest.raises(ValueError, match="names no case and image"):
        parse_suggestion({"suggestions": [{"case_id": "c1"}]})


@pytest.mark.parametrize(
    ("stage", "progress", "percent", "text"),
    [
        ("export", 0.0, 0, "Exporting the volume"),
        ("infer", 0.0, 25, "Segmenting"),
        ("infer", 0.5, 55, "Segmenting"),
        ("infer", 7.0, 85, "Segmenting"),  # clipped
        ("import", 1.0, 100, "Creating segments"),
        ("tta", 0.5, 55, "Tta"),  # an engine stage the panel does not know yet
        ("cancel", 0.3, -1, "Cancelling"),
    ],
)
def test_segment_progress_maps_stages_onto_one_forward_moving_bar(stage, progress, percent, text):
    assert segment_progress(stage, progress) == (percent, text)


def test_train_progress_line():
    event = {
        "event": "progress",
        "stage": "train",
        "step": 120,
        "total": 500,
        "losses": {"total": 0.4321, "dice": 0.31, "ce": 0.1222},
        "lr": 1e-4,
        "eta_s": 185,
    }
    assert format_train_progress(event) == (
        24,
        "Step 120/500 · loss 0.432 (dice 0.310, ce 0.122) · lr 1.0e-04 · 3 min left",
    )
    assert format_train_progress({"stage": "prepare"}) == (None, "Prepare")


def test_validation_line_and_before_after_table():
    event = {"event": "validation", "step": 100, "dice": {"liver": 0.91, "spleen": 0.853}, "mean_dice": 0.8816}
    assert format_validation(event, SYNAPSE13) == "Validation at step 100: mean Dice 0.882 (Spleen 0.85, Liver 0.91)"
    rows = dice_rows({"liver": 0.7, "spleen": 0.6, "aorta": 0.5}, {"liver": 0.9, "spleen": 0.55}, SYNAPSE13)
    assert rows == [
        ("Spleen", "0.600", "0.550", "-0.050"),
        ("Liver", "0.700", "0.900", "+0.200"),
        ("Aorta", "0.500", "–", "–"),
    ]


def test_volumes_line_lists_found_organs_in_table_order():
    assert format_volumes({"liver": 1520.4, "spleen": 210.0, "aorta": 0.0}, SYNAPSE13) == "Spleen 210 mL, Liver 1520 mL"


def test_finetune_estimate_names_the_steps_and_the_measured_cpu_time():
    from scdlcore.training.config import CPU_FINETUNE_SECONDS_PER_STEP, default_finetune_steps

    cpu_steps = default_finetune_steps("cpu")
    minutes = round(CPU_FINETUNE_SECONDS_PER_STEP * cpu_steps / 60)
    assert finetune_estimate(None, "cpu") == (
        f"Expected: {cpu_steps} steps, about {minutes} min on a 2-core CPU (measured; less on a faster one)."
    )
    assert finetune_estimate(None, "cuda") == f"Expected: {default_finetune_steps('cuda')} steps on the GPU."
    auto = finetune_estimate(None, "auto")
    assert auto.startswith(f"Expected: {default_finetune_steps('cuda')} steps on the GPU, or without a GPU ")
    assert f"{cpu_steps} steps, about {minutes} min" in auto
    # Steps asked for are the steps shown, and more steps take longer.
    assert "1000 steps" in finetune_estimate(1000, "cpu")
    assert round(CPU_FINETUNE_SECONDS_PER_STEP * 1000 / 60) > minutes
