"""Organ label table <-> segments of a segmentation: which segment is which organ, and fixed-value label maps.

The model writes a label map with the label table's values (Synapse-13: spleen 1 ... left adrenal
gland 13). In Slicer every organ becomes one segment that carries the organ's machine name in the
segment tag :data:`ORGAN_TAG`; segments without that tag are the user's and are never replaced.
For training, segments are turned back into a label map with the same fixed values, whatever
order, color or layer the segments have in Slicer.

Arrays are numpy in (D, H, W) = (K, J, I) order, as Slicer's ``arrayFromVolume`` returns them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scdlcore.labels import Label, LabelTable

__all__ = [
    "ORGAN_TAG",
    "ExistingSegment",
    "SegmentUpdate",
    "compose_label_map",
    "organs_to_segments",
    "plan_result_segments",
    "renumber",
    "reviewed_organs",
    "unit_color",
]

#: Segment tag holding the organ's machine name (``"liver"``) on segments this module created.
ORGAN_TAG = "SCDLSegment.Organ"


@dataclass(frozen=True)
class ExistingSegment:
    """A segment already in the segmentation.

    Attributes:
        segment_id: its id in the segmentation.
        name: its (display) name.
        organ: the value of its :data:`ORGAN_TAG` tag, or None for a segment the user made.
    """

    segment_id: str
    name: str
    organ: str | None = None


@dataclass(frozen=True)
class SegmentUpdate:
    """What to write for one organ of a model result.

    Attributes:
        label: the organ (value, names, color, codes) from the label table.
        segment_id: the segment to overwrite (one this module made earlier), or None to add a new one.
        terminology: the segment's terminology entry string.
    """

    label: Label
    segment_id: str | None
    terminology: str


def plan_result_segments(
    table: LabelTable, existing: Iterable[ExistingSegment], organs: Sequence[str] | None = None
) -> list[SegmentUpdate]:
    """One update per organ of a model result, in label-table order.

    An organ overwrites the segment this module made for it before (found by :data:`ORGAN_TAG`);
    otherwise a new segment is added. User segments are never touched, even one with the same name.

    Args:
        table: the model's label table.
        existing: the segments already in the target segmentation.
        organs: machine names of the organs that were segmented; None = every organ of the table.

    Raises:
        ValueError: an organ is not in the table (the message lists the known ones).
    """
    wanted = set(table.check_organs(organs)) if organs is not None else set(table.names)
    tagged = {segment.organ: segment.segment_id for segment in existing if segment.organ}
    return [
        SegmentUpdate(label=label, segment_id=tagged.get(label.name), terminology=table.terminology_string(label))
        for label in table.labels
        if label.name in wanted
    ]


def organs_to_segments(table: LabelTable, existing: Iterable[ExistingSegment]) -> dict[str, str]:
    """Which segment holds which organ, for exporting a corrected case.

    A segment is an organ's if it carries the organ's :data:`ORGAN_TAG`, or else if its name is the
    organ's display or machine name (case-insensitive), so organs the user painted into a segment
    named "Liver" count too. Other segments (lesions, notes) are not exported.

    Returns:
        ``{organ machine name: segment id}`` for the organs found.

    Raises:
        ValueError: two segments claim the same organ (the message names both and what to do).
    """
    found: dict[str, ExistingSegment] = {}
    segments = list(existing)
    for segment in sorted(segments, key=lambda s: s.organ is None):  # tagged segments win the name lookup
        label = table[segment.organ] if segment.organ in table.names else table.find(segment.name)
        if label is None:
            continue
        organ = label.name
        if organ in found:
            raise ValueError(
                f"Two segments are {table[organ].display_name!r}: {found[organ].name!r} and {segment.name!r}. "
                "Merge them or rename one, then submit again."
            )
        found[organ] = segment
    return {organ: segment.segment_id for organ, segment in found.items()}


def compose_label_map(
    table: LabelTable, masks: Mapping[str, np.ndarray], shape: Sequence[int]
) -> tuple[np.ndarray, int]:
    """Merge binary organ masks into one label map with the table's fixed values.

    Args:
        table: the label table that fixes each organ's value.
        masks: ``{organ machine name: mask}``, each (D, H, W) on the reference volume's grid,
            non-zero inside the organ.
        shape: (D, H, W) of the reference volume.

    Returns:
        ``(labels, overlap)``: labels is (D, H, W) uint8 (uint16 if a value exceeds 255), 0 = background;
        overlap is the number of voxels claimed by more than one organ (the organ later in the table
        keeps them).

    Raises:
        ValueError: an unknown organ, or a mask whose shape is not ``shape``.
    """
    shape = tuple(int(size) for size in shape)
    dtype = np.uint8 if max(table.values, default=0) < 256 else np.uint16
    labels = np.zeros(shape, dtype=dtype)
    claimed = np.zeros(shape, dtype=bool)
    overlap = 0
    for organ in table.check_organs(list(masks)):
        mask = np.asarray(masks[organ]) != 0
        if mask.shape != shape:
            raise ValueError(
                f"The {table[organ].display_name!r} mask has shape {mask.shape}, the reference volume {shape}: "
                "export it on the reference volume's grid."
            )
        overlap += int(np.count_nonzero(mask & claimed))
        claimed |= mask
        labels[mask] = table[organ].value
    return labels, overlap


def renumber(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """The label map with ``values[k]`` as ``k + 1`` and every other value as 0, uint8 (uint16 past 255 organs).

    Slicer imports label value ``k + 1`` into the ``k``-th of the segment ids it is given.
    """
    order = np.zeros(max([int(labels.max(initial=0)), *values]) + 1, dtype=np.uint8 if len(values) < 256 else np.uint16)
    order[list(values)] = np.arange(1, len(values) + 1)
    return order[labels]


def reviewed_organs(table: LabelTable, reviewed: Iterable[str]) -> list[str]:
    """Validate the organs the user ticked as reviewed; returns them in label-table order.

    Raises:
        ValueError: a name is not in the table.
    """
    chosen = set(table.check_organs(list(reviewed)))
    return [name for name in table.names if name in chosen]


def unit_color(label: Label) -> tuple[float, float, float]:
    """The organ's color as RGB in 0..1, as Slicer's segment colors are."""
    red, green, blue = label.color
    return red / 255.0, green / 255.0, blue / 255.0
