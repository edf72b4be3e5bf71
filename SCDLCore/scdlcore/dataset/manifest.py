"""Dataset folders: CT images and label maps described by a versioned ``dataset.json`` manifest.

The trainer reads a dataset folder with :func:`load_dataset`; the Slicer panel and ``scdl dataset`` write
it through :class:`scdlcore.dataset.store.DatasetStore`.

Layout (paths in the manifest are relative to the folder)::

    my_dataset/
      dataset.json               the manifest: the only source of truth
      dataset.json.lock          taken by every writer
      images/case0001.nii.gz     labels/case0001.nii.gz     (a case without a label is unlabeled)

``dataset.json``::

    {"format": "scdl-dataset", "version": 1, "labels": "synapse13",
     "cases": [{"id": "case0001", "image": "images/case0001.nii.gz", "label": "labels/case0001.nii.gz",
                "reviewed": ["liver", "spleen"], "source": "slicer", "added": "2026-11-27T10:00:00+00:00",
                "model": "abdomen@3"}, ...]}

``reviewed`` lists the organs a person checked on a partially corrected case; ``null`` means every organ of
the label table is reviewed (a fully labeled case). ``source`` is free text, ``added`` the UTC time the case
was stored, ``model`` the model version that first segmented it (or null), ``voxels_sha256`` the digest of
the CT's voxels in the canonical orientation (so a CT stored in another axis order, as Slicer re-orders a
left-handed one, is still the same CT). Case ids are opaque (never a patient name): letters, digits, ``-``, ``_`` and
``.``. The store re-writes every image with :mod:`scdlcore.io` as NIfTI, which keeps the geometry and the
voxels only, so no DICOM tag (patient name, dates, ...) enters the folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scdlcore.labels import LabelTable, get_label_table

if TYPE_CHECKING:
    pass


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "CTAlreadyStored",
    "Case",
    "Dataset",
    "DatasetError",
    "load_dataset",
    "validate_case_id",
]


MANIFEST_NAME = "dataset.json"


LOCK_NAME = MANIFEST_NAME + ".lock"


FORMAT = "scdl-dataset"


FORMAT_VERSION = 1


IMAGES_DIR, LABELS_DIR = "images", "labels"


CASE_SUFFIX = ".nii.gz"


_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DatasetError(ValueError):
    """A dataset folder or manifest that cannot be used; the message names the folder/file and the problem."""


class CTAlreadyStored(DatasetError):
    """An add brought, without a label map, a CT the store holds already (as ``case``); nothing was stored."""

    def __init__(self, message: str, case: Case) -> None:
        super().__init__(message)
        self.case = case


@dataclass
class Case:
    """One case of a dataset; ``image``/``label`` are relative to the dataset folder.

    Attributes:
        id: opaque case id. image: image path. label: label-map path, or None (unlabeled).
        reviewed: organ names a person checked (partial correction), or None (all organs: fully labeled).
        extra: further recorded fields (``source``, ``added``, ``model``...), kept as they are.
    """

    id: str
    image: str
    label: str | None = None
    reviewed: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_labeled(self) -> bool:
        return self.label is not None and (self.reviewed is None or len(self.reviewed) > 0)

    @property
    def status(self) -> str:
        """``"labeled"`` (every organ reviewed), ``"partial"`` (some organs reviewed) or ``"unlabeled"``."""
        if not self.is_labeled:
            return "unlabeled"
        return "labeled" if self.reviewed is None else "partial"

    @property
    def source(self) -> str:
        return str(self.extra.get("source") or "")

    @property
    def added(self) -> str:
        """UTC ISO 8601 time the case was stored ("" when not recorded)."""
        return str(self.extra.get("added") or "")

    @property
    def model(self) -> str | None:
        """The model version (``name@N``) that first segmented the case, or None."""
        return self.extra.get("model")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        return {**data, **{key: value for key, value in extra.items() if key not in data}}

    @classmethod
    def from_dict(cls, data: Any) -> Case:
        """A case from its manifest entry.

        Raises:
            ValueError: saying in words which field is missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError(f'a case must be a JSON object with "id" and "image", got {json.dumps(data)[:80]}')
        where = f"case {json.dumps(data.get('id'))[:40]}" if isinstance(data.get("id"), str) else "a case"
        for name, what in (("id", "the case id"), ("image", "the CT's path inside the dataset folder")):
            if not isinstance(data.get(name), str):
                found = "lacks it" if name not in data else f"has {json.dumps(data[name])[:60]}"
                raise ValueError(f"{where}: the field {name!r} must be a string, {what}; it {found}")
        if data.get("label") is not None and not isinstance(data["label"], str):
            raise ValueError(
                f"{where}: the field 'label' must be the label map's path or null, got {json.dumps(data['label'])[:60]}"
            )
        reviewed = data.get("reviewed")
        if reviewed is not None and not (
            isinstance(reviewed, list) and all(isinstance(name, str) for name in reviewed)
        ):
            raise ValueError(
                f"{where}: the field 'reviewed' must be a list of organ names (e.g. [\"liver\"]) or null, "
                f"got {json.dumps(reviewed)[:60]}"
            )
        known = {"id", "image", "label", "reviewed"}
        return cls(
            id=data["id"],
            image=data["image"],
            label=data.get("label"),
            reviewed=reviewed,
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclass
class Dataset:
    """A loaded dataset folder (read-only snapshot of its manifest)."""

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
        known = ", ".join(c.id for c in self.cases) or "none"
        raise DatasetError(f"Dataset {self.root} has no case {case_id!r}; cases: {known}.")

    def counts(self) -> dict[str, int]:
        """Number of cases per status: ``{"labeled": n, "partial": n, "unlabeled": n}``."""
        counts = dict.fromkeys(("labeled", "partial", "unlabeled"), 0)
        for case in self.cases:
            counts[case.status] += 1
        return counts

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the label table, every case entry and the sizes of its files.

        It changes when the data does.
        """
        digest = hashlib.sha256(self.table.name.encode())
        for case in self.cases:
            sizes = [_size(self.path(relative)) for relative in filter(None, (case.image, case.label))]
            digest.update(json.dumps([case.to_dict(), sizes], sort_keys=True).encode())
        return digest.hexdigest()

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "labels": self.table.name,
            "cases": [c.to_dict() for c in self.cases],
        }


def load_dataset(root: str | Path) -> Dataset:
    """Read and validate a dataset folder (the manifest and that every referenced file exists).

    Raises:
        DatasetError: not a folder, no manifest, a foreign or damaged manifest, or a case whose files are missing.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist or is not a folder.")
    if not manifest_path.is_file():
        raise DatasetError(
            f"{root} is not an SCDL dataset folder: it has no {MANIFEST_NAME}. "
            f"Create one with `scdl dataset init {root}` and add cases with `scdl dataset add`, "
            "or write the manifest as the README's 'Dataset folders' section shows."
        )
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"Cannot read dataset manifest {manifest_path}: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DatasetError(
            f'{manifest_path} is not an SCDL dataset manifest (expected "format": "{FORMAT}"); it belongs to another '
            "program, so SCDL leaves this folder alone. Choose another folder for an SCDL dataset."
        )
    if data.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{manifest_path} has manifest version {data.get('version')!r}; this SCDL reads version {FORMAT_VERSION}."
        )
    try:
        table = get_label_table(data.get("labels", "synapse13"))
        if not isinstance(data.get("cases", []), list):
            raise ValueError(f"the field 'cases' must be a list of cases, got {json.dumps(data['cases'])[:60]}")
        cases = [Case.from_dict(entry) for entry in data.get("cases", [])]
    except ValueError as err:
        raise DatasetError(f"Malformed dataset manifest {manifest_path}: {str(err).rstrip('.')}.") from err
    dataset = Dataset(root=root, table=table, cases=cases)
    _check_cases(dataset, manifest_path)
    return dataset


def validate_case_id(case_id: str) -> str:
    """Return ``case_id`` if it is a safe opaque id, else raise DatasetError saying why."""
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id):
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
        try:
            dataset.table.check_organs(case.reviewed or [], "reviewed organ")
        except ValueError as err:
            raise DatasetError(f"{manifest_path}: case {case.id!r}: {err}") from None


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder (a DICOM series)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
