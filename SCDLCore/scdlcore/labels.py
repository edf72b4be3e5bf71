"""Label tables: organ names, label values, colors and terminology codes.

Every name and value used anywhere in SCDL Segment comes from here (the CLI, the model bundles,
the dataset store and the Slicer module). The default table is the 13 abdominal organs of the
Synapse multi-organ benchmark (BTCV), in the benchmark's own value order, so Synapse label maps
can be used as they are. Colors follow Slicer's GenericAnatomyColors; terminology codes are
SNOMED CT, as Slicer's terminology module expects them.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "Label",
    "LabelTable",
    "SYNAPSE13",
    "TOTALSEGMENTATOR_TO_SYNAPSE13",
    "check_builtin_name",
    "get_label_table",
    "map_label_values",
    "differences_text",
    "table_differences",
    "value_counts",
]

_COUNT_CHUNK = 1 << 20  # voxels per bincount pass: its int64 copy of them (8 MB) stays in cache


@dataclass(frozen=True)
class Label:
    """One organ class.

    Attributes:
        value: integer value in label maps (background is 0 and is not listed).
        name: machine name, snake_case (``"adrenal_gland_right"``).
        display_name: the segment name shown to people (``"Right adrenal gland"``).
        color: RGB in 0..255.
        snomed_code: SNOMED CT code of the structure (terminology ``type``).
        snomed_meaning: the code's meaning as SNOMED writes it.
    """

    value: int
    name: str
    display_name: str
    color: tuple[int, int, int]
    snomed_code: str
    snomed_meaning: str


@dataclass(frozen=True)
class LabelTable:
    """An ordered set of labels; class index ``c`` of a network is label value ``values[c-1]``."""

    name: str
    labels: tuple[Label, ...]
    description: str = ""
    _by_name: dict = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        values = [label.value for label in self.labels]
        names = [label.name for label in self.labels]
        if len(set(values)) != len(values) or 0 in values:
            raise ValueError(f"Label table {self.name!r}: values must be unique and non-zero, got {values}.")
        if len(set(names)) != len(names):
            raise ValueError(f"Label table {self.name!r}: names must be unique, got {names}.")
        object.__setattr__(self, "_by_name", {label.name: label for label in self.labels})

    @property
    def num_classes(self) -> int:
        """C, background included."""
        return len(self.labels) + 1

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def values(self) -> list[int]:
        return [label.value for label in self.labels]

    def __getitem__(self, name: str) -> Label:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(
                f"Unknown organ {name!r} in label table {self.name!r}; known: {', '.join(self.names)}."
            ) from None

    def __len__(self) -> int:
        return len(self.labels)

    def check_organs(self, names: Iterable[str], what: str = "organ") -> list[str]:
        """``names`` in table order, each checked to be an organ's machine name.

        Raises:
            ValueError: an unknown name; the message suggests the closest organ and lists them all.
        """
        names = list(names)
        unknown = [name for name in names if name not in self._by_name]
        if unknown:
            close = difflib.get_close_matches(unknown[0], self.names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown {what}(s) {', '.join(map(repr, unknown))} in label table {self.name!r}.{hint} "
                f"Organs: {', '.join(self.names)}."
            )
        return [name for name in self.names if name in names]

    def find(self, name: str) -> Label | None:
        """The organ a person's segment name means: its machine or display name, ignoring case and treating
        spaces, ``_`` and ``-`` alike ("Kidney right", "kidney_right" and "kidney-right" are one organ)."""
        wanted = _name_key(name)
        return next(
            (label for label in self.labels if wanted in (_name_key(label.name), _name_key(label.display_name))), None
        )

    def class_index(self, name: str) -> int:
        """Network channel of an organ (1..C-1; 0 is background)."""
        return self.names.index(self[name].name) + 1

    def unknown_values(self, labels: np.ndarray) -> list[int]:
        """The values of an integer label map that are neither background (0) nor in this table, sorted."""
        return sorted(set(value_counts(labels)) - {0} - set(self.values))

    def values_to_classes(self, labels: np.ndarray) -> np.ndarray:
        """Map label values to class indices 0..C-1 (uint8). Unknown values raise ValueError."""
        lut_size = max(self.values) + 1
        present = value_counts(labels)
        unknown = [int(v) for v in present if v < 0 or v >= lut_size or (v != 0 and v not in self.values)]
        if unknown:
            raise ValueError(f"Label values {unknown} are not in label table {self.name!r} (values {self.values}).")
        lut = np.zeros(lut_size, dtype=np.uint8)
        for index, value in enumerate(self.values, start=1):
            lut[value] = index
        return lut[labels.astype(np.int64)]

    def classes_to_values(self, classes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`values_to_classes` (uint8 when every value fits, else uint16)."""
        lut = np.array([0, *self.values], dtype=np.uint16)
        out = lut[classes.astype(np.int64)]
        return out.astype(np.uint8) if max(self.values) < 256 else out

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "labels": [asdict(label) for label in self.labels]}

    @classmethod
    def from_dict(cls, data: Mapping) -> LabelTable:
        try:
            labels = tuple(
                Label(**{**entry, "color": tuple(int(c) for c in entry["color"]), "value": int(entry["value"])})
                for entry in data["labels"]
            )
            return cls(name=str(data["name"]), labels=labels, description=str(data.get("description", "")))
        except (KeyError, TypeError) as err:
            raise ValueError(f"Not a label table: {err!r} in {json.dumps(data)[:200]}") from err

    def slicer_terminology(self) -> dict:
        """The table as a Slicer terminology context (``.term.json``, schema of Slicer 5)."""
        types = [
            {
                "CodingSchemeDesignator": "SCT",
                "CodeValue": label.snomed_code,
                "CodeMeaning": label.snomed_meaning,
                "recommendedDisplayRGBValue": list(label.color),
                "cid": "7151",
                "contextGroupName": "Segmentation Property Type",
                "3dSlicerLabel": label.display_name,
                "3dSlicerLabelValue": label.value,
            }
            for label in self.labels
        ]
        return {
            "SegmentationCategoryTypeContextName": f"SCDL Segment {self.name}",
            "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#",
            "SegmentationCodes": {
                "Category": [
                    {
                        "CodingSchemeDesignator": "SCT",
                        "CodeValue": "123037004",
                        "CodeMeaning": "Anatomical Structure",
                        "showAnatomy": "false",
                        "Type": types,
                    }
                ]
            },
        }

    def terminology_string(self, label: Label) -> str:
        """Slicer's segment terminology tag string (``vtkSegment`` "TerminologyEntry" tag)."""
        context = f"SCDL Segment {self.name}"
        return (
            f"{context}~SCT^123037004^Anatomical Structure~SCT^{label.snomed_code}^{label.snomed_meaning}~^^"
            f"~Anatomic codes - DICOM master list~^^~^^"
        )


def _name_key(name: str) -> str:
    return " ".join(re.split(r"[\s_\-]+", name.strip().lower()))


def _label(value: int, name: str, display: str, color: Iterable[int], code: str, meaning: str) -> Label:
    return Label(value, name, display, tuple(color), code, meaning)  # type: ignore[arg-type]


SYNAPSE13 = LabelTable(
    name="synapse13",
    description="The 13 abdominal organs of the Synapse multi-organ CT benchmark (BTCV), in its value order.",
    labels=(
        _label(1, "spleen", "Spleen", (157, 108, 162), "78961009", "Spleen"),
        _label(2, "kidney_right", "Right kidney", (185, 102, 83), "9846003", "Right kidney"),
        _label(3, "kidney_left", "Left kidney", (185, 102, 83), "18639004", "Left kidney"),
        _label(4, "gallbladder", "Gallbladder", (139, 150, 98), "28231008", "Gallbladder"),
        _label(5, "esophagus", "Esophagus", (211, 171, 143), "32849002", "Esophagus"),
        _label(6, "liver", "Liver", (221, 130, 101), "10200004", "Liver"),
        _label(7, "stomach", "Stomach", (216, 132, 105), "69695003", "Stomach"),
        _label(8, "aorta", "Aorta", (224, 97, 76), "15825003", "Aorta"),
        _label(9, "inferior_vena_cava", "Inferior vena cava", (0, 151, 206), "64131007", "Inferior vena cava"),
        _label(
            10,
            "portal_vein_and_splenic_vein",
            "Portal vein and splenic vein",
            (0, 112, 165),
            "32764006",
            "Portal vein",
        ),
        _label(11, "pancreas", "Pancreas", (249, 180, 111), "15776009", "Pancreas"),
        _label(12, "adrenal_gland_right", "Right adrenal gland", (244, 217, 154), "281625000", "Right adrenal gland"),
        _label(13, "adrenal_gland_left", "Left adrenal gland", (244, 217, 154), "281624001", "Left adrenal gland"),
    ),
)

#: TotalSegmentator (v2) class ids of the Synapse-13 organs -> Synapse-13 values.
TOTALSEGMENTATOR_TO_SYNAPSE13: dict[int, int] = {
    1: 1,  # spleen
    2: 2,  # kidney_right
    3: 3,  # kidney_left
    4: 4,  # gallbladder
    15: 5,  # esophagus
    5: 6,  # liver
    6: 7,  # stomach
    52: 8,  # aorta
    63: 9,  # inferior_vena_cava
    64: 10,  # portal_vein_and_splenic_vein
    7: 11,  # pancreas
    8: 12,  # adrenal_gland_right
    9: 13,  # adrenal_gland_left
}

_TABLES = {SYNAPSE13.name: SYNAPSE13}


def get_label_table(name: str) -> LabelTable:
    """Look up a built-in label table by name."""
    if not isinstance(name, str):
        raise ValueError(f"a label table is named by a string, got {json.dumps(name)[:60]}")
    try:
        return _TABLES[name]
    except KeyError:
        raise ValueError(f"Unknown label table {name!r}; built-in tables: {', '.join(_TABLES)}.") from None


def table_differences(table: LabelTable, reference: LabelTable) -> list[str]:
    """How ``table``'s organs and values differ from ``reference``'s, in words (empty when they agree).

    Only what decides a label map's meaning counts (organ names, their values and their order, which is the
    network's class order); colors and display names do not.
    """
    ours = {label.name: label.value for label in table.labels}
    theirs = {label.name: label.value for label in reference.labels}
    where = f"{reference.name!r}"
    problems = [
        f"{name}: value {ours[name]} here, {theirs[name]} in {where}"
        for name in ours
        if name in theirs and ours[name] != theirs[name]
    ]
    problems += [f"{name} is not in {where}" for name in ours if name not in theirs]
    problems += [f"{name} of {where} is missing" for name in theirs if name not in ours]
    if not problems and table.names != reference.names:
        problems.append(f"the organs are in another class order than in {where}")
    return problems


def differences_text(table: LabelTable, reference: LabelTable, limit: int = 5) -> str:
    """:func:`table_differences` as one line for a message: the first ``limit``, then how many more ("" if none)."""
    problems = table_differences(table, reference)
    more = f"; +{len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def check_builtin_name(table: LabelTable) -> None:
    """Refuse a table that takes a built-in table's name but not its organs and values.

    Raises:
        ValueError: naming the differences (a "synapse13" with liver and spleen swapped would write label
            maps whose values mean other organs to every other tool).
    """
    builtin = _TABLES.get(table.name)
    if builtin is None:
        return
    differences = differences_text(table, builtin)
    if differences:
        raise ValueError(
            f"its label table is named {table.name!r}, a built-in table, but differs from it "
            f"({differences}). Give a custom table its own name."
        )


def map_label_values(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Relabel a label map; values not in ``mapping`` become background (0). Returns uint8 (D, H, W)."""
    lut = np.zeros(max(int(labels.max(initial=0)), max(mapping)) + 1, dtype=np.uint8)
    for source, target in mapping.items():
        lut[source] = target
    return lut[labels.astype(np.int64)]


def value_counts(labels: np.ndarray) -> dict[int, int]:
    """Voxels per value present in an integer label map (background included), ``{value: count}``.

    Unsigned 8- and 16-bit maps (every label map SCDL writes) are counted by ``np.bincount`` a slab at a
    time: several times faster than ``np.unique``, which sorts the whole map, and with bounded memory.
    """
    if labels.dtype not in (np.uint8, np.uint16) or labels.ndim == 0:
        values, counts = np.unique(labels, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))
    counts = np.zeros(np.iinfo(labels.dtype).max + 1, dtype=np.int64)
    rows = max(1, _COUNT_CHUNK // max(1, labels[0].size))
    for start in range(0, len(labels), rows):
        counts += np.bincount(labels[start : start + rows].ravel(), minlength=counts.size)
    return {int(value): int(counts[value]) for value in np.flatnonzero(counts)}
