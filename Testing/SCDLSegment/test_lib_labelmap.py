"""Label table <-> segments: result planning, organ lookup for export, fixed-value label maps."""

from __future__ import annotations

import numpy as np
import pytest

from scdlcore.labels import SYNAPSE13
from SCDLSegmentLib.labelmap import (
    ExistingSegment,
    compose_label_map,
    organs_to_segments,
    plan_result_segments,
    renumber,
    reviewed_organs,
    unit_color,
)


def test_result_plan_has_one_segment_per_organ_in_table_order_with_codes():
    plan = plan_result_segments(SYNAPSE13, [])
    assert [update.label.name for update in plan] == SYNAPSE13.names
    assert all(update.segment_id is None for update in plan)
    liver = next(update for update in plan if update.label.name == "liver")
    assert liver.label.display_name == "Liver" and liver.label.value == 6
    assert liver.terminology == SYNAPSE13.terminology_string(SYNAPSE13["liver"])
    assert "SCT^10200004^Liver" in liver.terminology


def test_result_plan_reuses_only_segments_this_module_made():
    existing = [
        ExistingSegment("seg_liver", "Liver", organ="liver"),  # from an earlier run
        ExistingSegment("user_1", "Spleen"),  # drawn by the user: same name, no tag
        ExistingSegment("user_2", "Tumour"),
    ]
    plan = {update.label.name: update.segment_id for update in plan_result_segments(SYNAPSE13, existing)}
    assert plan["liver"] == "seg_liver"
    assert plan["spleen"] is None  # a new segment; the user's "Spleen" is kept
    assert "user_2" not in plan.values()


def test_result_plan_for_a_subset_of_organs():
    plan = plan_result_segments(SYNAPSE13, [], organs=["pancreas", "liver"])
    assert [update.label.name for update in plan] == ["liver", "pancreas"]  # table order
    with pytest.raises(ValueError, match="'kidney'.*spleen, kidney_right"):
        plan_result_segments(SYNAPSE13, [], organs=["kidney"])


def test_export_lookup_prefers_tags_then_names_and_ignores_other_segments():
    existing = [
        ExistingSegment("a", "Liver (edited)", organ="liver"),
        ExistingSegment("b", "spleen"),  # painted by the user, named like the organ
        ExistingSegment("c", "Left Kidney"),  # display name, other case
        ExistingSegment("d", "Tumour"),
    ]
    assert organs_to_segments(SYNAPSE13, existing) == {"liver": "a", "spleen": "b", "kidney_left": "c"}


def test_export_lookup_refuses_two_segments_for_one_organ():
    existing = [ExistingSegment("a", "Liver", organ="liver"), ExistingSegment("b", "liver")]
    with pytest.raises(ValueError, match="Two segments are 'Liver'.*Merge them or rename one"):
        organs_to_segments(SYNAPSE13, existing)


def test_label_map_uses_the_fixed_values_whatever_the_mask_order():
    shape = (3, 4, 5)  # (D, H, W), non-cubic
    liver = np.zeros(shape, dtype=np.uint8)
    liver[0, :2, :2] = 1
    adrenal = np.zeros(shape, dtype=bool)
    adrenal[2, 3, 4] = True
    labels, overlap = compose_label_map(SYNAPSE13, {"adrenal_gland_left": adrenal, "liver": liver}, shape)
    assert labels.dtype == np.uint8 and labels.shape == shape
    assert overlap == 0
    assert np.count_nonzero(labels == 6) == 4 and labels[2, 3, 4] == 13
    assert np.count_nonzero(labels) == 5


def test_label_map_counts_overlaps_and_the_later_organ_keeps_them():
    shape = (2, 2, 2)
    spleen = np.ones(shape, dtype=np.uint8)
    liver = np.zeros(shape, dtype=np.uint8)
    liver[0] = 1
    labels, overlap = compose_label_map(SYNAPSE13, {"liver": liver, "spleen": spleen}, shape)
    assert overlap == 4
    assert (labels[0] == 6).all() and (labels[1] == 1).all()


def test_label_map_refuses_masks_on_another_grid():
    with pytest.raises(ValueError, match="'Liver' mask has shape \\(2, 2\\).*\\(3, 4, 5\\)"):
        compose_label_map(SYNAPSE13, {"liver": np.zeros((2, 2))}, (3, 4, 5))


def test_reviewed_organs_are_validated_and_ordered():
    assert reviewed_organs(SYNAPSE13, ["stomach", "spleen"]) == ["spleen", "stomach"]
    with pytest.raises(ValueError, match="'Liver'"):
        reviewed_organs(SYNAPSE13, ["Liver"])  # display names are not organ ids


def test_unit_color():
    assert unit_color(SYNAPSE13["spleen"]) == pytest.approx((157 / 255, 108 / 255, 162 / 255))


def test_renumber_puts_the_chosen_values_in_import_order_and_drops_the_rest():
    labels = np.array([[0, 6, 1], [8, 6, 13]], dtype=np.uint8)
    renumbered = renumber(labels, [6, 1])
    np.testing.assert_array_equal(renumbered, [[0, 1, 2], [0, 1, 0]])
    assert renumbered.dtype == np.uint8
