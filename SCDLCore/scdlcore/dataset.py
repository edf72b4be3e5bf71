"""Dataset folders: CT images and label maps described by a versioned ``dataset.json`` manifest.

Layout (paths in the manifest are relative to the folder)::

    my_dataset/
      dataset.json
      images/case001.nii.gz      labels/case001.nii.gz     (a case without a label is unlabeled)

``dataset.json``::

    {"format": "scdl-dataset", "version": 1, "labels": "synapse13",
     "cases": [{"id": "case001", "image": "images/case001.nii.gz", "label": "labels/case001.nii.gz",
                "reviewed": null}, ...]}

``reviewed`` lists the organs a person checked on a partially corrected case; ``null`` means every organ of
the label table is reviewed (a fully labeled case). Case ids are opaque (never a patient name): letters,
digits, ``-``, ``_`` and ``.``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .labels import LabelTable, get_label_table

__all__ = ["MANIFEST_NAME", "FORMAT", "FORMAT_VERSION", "Case", "Dataset", "DatasetError", "load_dataset", "validate_case_id"]

MANIFEST_NAME = "dataset.json"
FORMAT = "scdl-dataset"
FORMAT_VERSION = 1
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DatasetError(ValueError):
    """A dataset folder or manifest that cannot be used; the message names the folder/file and the problem."""


@dataclass
class Case:
    """One case of a dataset; ``image``/``label`` are relative to the dataset folder.

    Attributes:
        id: opaque case id. image: image path. label: label-map path, or None (unlabeled).
        reviewed: organ names a person checked (partial correction), or None (all organs: fully labeled).
        extra: further recorded fields (source, when added, segmenting model...), kept as they are.
    """

    id: str
    image: str
    label: str | None = None
    reviewed: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_labeled(self) -> bool:
        return self.label is not None and (self.reviewed is None or len(self.reviewed) > 0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {**data.pop("extra"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        known = {"id", "image", "label", "reviewed"}
        return cls(
            id=str(data["id"]),
            image=str(data["image"]),
            label=None if data.get("label") is None else str(data["label"]),
            reviewed=None if data.get("reviewed") is None else [str(name) for name in data["reviewed"]],
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclass
class Dataset:
    """A loaded dataset folder."""

    root: Path
    table: LabelTable
    cases: list[Case]

    def path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def labeled(self) -> list[Case]:
        return [case for case in self.cases if case.is_labeled]

    @property
    def unlabeled(self) -> list[Case]:
        return [case for case in self.cases if not case.is_labeled]

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.id == case_id:
                return case
        raise DatasetError(f"Dataset {self.root} has no case {case_id!r}; cases: {', '.join(c.id for c in self.cases)}.")

    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "labels": self.table.name, "cases": [c.to_dict() for c in self.cases]}


def load_dataset(root: str | Path) -> Dataset:
    """Read and validate a dataset folder (the manifest and that every referenced file exists)."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist or is not a folder.")
    if not manifest_path.is_file():
        raise DatasetError(
            f"{root} is not an SCDL dataset folder: it has no {MANIFEST_NAME}. Create one with `scdl dataset init {root}` "
            f"and add cases with `scdl dataset add`, or write the manifest as the README's 'Dataset folders' section shows."
        )
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"Cannot read dataset manifest {manifest_path}: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DatasetError(f"{manifest_path} is not an SCDL dataset manifest (expected \"format\": \"{FORMAT}\").")
    if data.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{manifest_path} has manifest version {data.get('version')!r}; this SCDL reads version {FORMAT_VERSION}.")
    try:
        table = get_label_table(data.get("labels", "synapse13"))
        cases = [Case.from_dict(entry) for entry in data.get("cases", [])]
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"Malformed dataset manifest {manifest_path}: {err!r}") from err
    dataset = Dataset(root=root, table=table, cases=cases)
    _check_cases(dataset, manifest_path)
    return dataset


def validate_case_id(case_id: str) -> str:
    """Return ``case_id`` if it is a safe opaque id, else raise DatasetError saying why."""
    if not _CASE_ID.match(case_id or ""):
        raise DatasetError(
            f"Invalid case id {case_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(no path separators, no spaces)."
        )
    return case_id


def _check_cases(dataset: Dataset, manifest_path: Path) -> None:
    seen: set[str] = set()
    for case in dataset.cases:
        validate_case_id(case.id)
        if case.id in seen:
            raise DatasetError(f"{manifest_path}: case id {case.id!r} appears twice.")
        seen.add(case.id)
        for relative in filter(None, (case.image, case.label)):
            resolved = (dataset.root / relative).resolve()
            if not resolved.is_relative_to(dataset.root.resolve()):
                raise DatasetError(f"{manifest_path}: case {case.id!r} points outside the dataset folder ({relative}).")
            if not resolved.exists():
                raise DatasetError(f"{manifest_path}: case {case.id!r} refers to {relative}, which does not exist.")
        for organ in case.reviewed or []:
            if organ not in dataset.table.names:
                raise DatasetError(f"{manifest_path}: case {case.id!r} lists unknown reviewed organ {organ!r}.")
