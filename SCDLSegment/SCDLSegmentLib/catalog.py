"""Reading the engine's listings: installed models, dataset counts, the suggested next case.

The engine prints them as JSON (``scdl models list --json``, ``scdl dataset list DIR --json``,
``scdl dataset suggest DIR --json``). The readers accept the documented fields and ignore the
rest, so the engine can add fields without breaking the panel; a listing that lacks a required
field raises ValueError naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scdlcore.labels import SYNAPSE13, LabelTable

__all__ = [
    "DatasetSummary",
    "ModelEntry",
    "Suggestion",
    "parse_dataset",
    "parse_models",
    "parse_suggestion",
    "pick_model",
]


@dataclass(frozen=True)
class ModelEntry:
    """One installed model version.

    Attributes:
        ref: how to address it (``name@version``); passed to ``scdl worker --model``.
        name: model name.
        version: version number, or None if the listing has none.
        description: one line for people.
        builtin: shipped with the package (the starter model).
        labels: its label table (Synapse-13 when the listing does not include one).
        spacing: voxel size (x, y, z) in mm the model works at, or None.
        lineage: where it comes from, e.g. ``{"parent": "starter@1", "steps": 300}``.
        metrics: validation metrics recorded when it was trained.
    """

    ref: str
    name: str
    version: int | None = None
    description: str = ""
    builtin: bool = False
    labels: LabelTable = SYNAPSE13
    spacing: tuple[float, ...] | None = None
    lineage: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)

    def details(self) -> str:
        """Several lines for the panel: description, organs, spacing, lineage, metrics."""
        lines = [self.description] if self.description else []
        lines.append(f"Organs ({len(self.labels)}): {', '.join(label.display_name for label in self.labels.labels)}")
        if self.spacing:
            lines.append("Voxel size: " + " × ".join(f"{value:g}" for value in self.spacing) + " mm")
        lineage = ", ".join(f"{key} {value}" for key, value in self.lineage.items() if value not in (None, ""))
        if lineage:
            lines.append(f"Lineage: {lineage}")
        metrics = ", ".join(f"{key} {_number(value)}" for key, value in self.metrics.items() if _is_scalar(value))
        if metrics:
            lines.append(f"Metrics: {metrics}")
        return "\n".join(lines)


@dataclass(frozen=True)
class DatasetSummary:
    """How many cases the dataset holds: every organ reviewed, some organs reviewed (the organs the
    user ticked on submit), none (unlabeled)."""

    labeled: int
    partial: int
    unlabeled: int

    @property
    def reviewed(self) -> int:
        """Cases that train as labeled data (fine-tuning needs at least one)."""
        return self.labeled + self.partial

    def describe(self) -> str:
        part = f" ({self.partial} with some organs)" if self.partial else ""
        return f"{self.reviewed} reviewed{part}, {self.unlabeled} unlabeled"


@dataclass(frozen=True)
class Suggestion:
    """The case the engine suggests reviewing next.

    Attributes:
        image: path of the stored CT to load.
        case_id: its id in the dataset.
        reason: why it was chosen, for the panel.
    """

    image: str
    case_id: str
    reason: str


def parse_models(data: Any) -> list[ModelEntry]:
    """Read ``scdl models list --json``: a list of entries, or ``{"models": [...]}``. One entry of
    ``scdl models info NAME --json`` (the full model.json: labels, spacing, lineage, metrics) reads the same way.

    Raises:
        ValueError: not a list of objects, or an entry without a ``name``.
    """
    entries = data.get("models") if isinstance(data, Mapping) else data
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ValueError(f"The model listing is not a list of models: {str(data)[:200]}")
    return [_model(entry) for entry in entries]


def pick_model(models: Sequence[ModelEntry], wanted: str) -> ModelEntry | None:
    """The model ``wanted`` names (``name@version``, or ``name`` = its latest version), else the
    latest non-builtin model, else the first one; None if there are none."""
    for model in models:
        if wanted and model.ref == wanted:
            return model
    named = [model for model in models if wanted and model.name == wanted]
    trained = [model for model in models if not model.builtin]
    for candidates in (named, trained, list(models)):
        if candidates:
            return max(candidates, key=lambda model: model.version or 0)
    return None


def parse_dataset(data: Any) -> DatasetSummary:
    """Read ``scdl dataset list DIR --json``: ``{"counts": {"labeled", "partial", "unlabeled"}, ...}``.

    Raises:
        ValueError: no ``counts``.
    """
    counts = data.get("counts") if isinstance(data, Mapping) else None
    if not isinstance(counts, Mapping):
        raise ValueError(f"The dataset listing has no 'counts': {str(data)[:200]}")
    return DatasetSummary(*(int(counts.get(status, 0)) for status in ("labeled", "partial", "unlabeled")))


def parse_suggestion(data: Any) -> Suggestion | None:
    """Read ``scdl dataset suggest DIR --json``: ``{"model", "suggestions": [{"case_id", "image", "reason", ...}]}``,
    best first; None when there is no unlabeled case.

    Raises:
        ValueError: no ``suggestions`` list, or a suggestion without ``case_id`` or ``image``.
    """
    suggestions = data.get("suggestions") if isinstance(data, Mapping) else None
    if not isinstance(suggestions, Sequence) or isinstance(suggestions, str):
        raise ValueError(f"The engine's suggestion has no 'suggestions' list: {str(data)[:200]}")
    if not suggestions:
        return None
    best = suggestions[0]
    if not isinstance(best, Mapping) or not best.get("case_id") or not best.get("image"):
        raise ValueError(f"The engine's suggestion names no case and image: {str(best)[:200]}")
    return Suggestion(str(best["image"]), str(best["case_id"]), str(best.get("reason", "")))


def _model(entry: Any) -> ModelEntry:
    if not isinstance(entry, Mapping) or not entry.get("name"):
        raise ValueError(f"A model in the listing has no 'name': {str(entry)[:200]}")
    name = str(entry["name"])
    version = entry.get("version")
    version = None if version is None else int(version)
    ref = str(entry.get("ref") or (f"{name}@{version}" if version is not None else name))
    lineage = entry.get("lineage") or {}
    spacing = entry.get("spacing")
    return ModelEntry(
        ref=ref,
        name=name,
        version=version,
        description=str(entry.get("description", "")),
        builtin=bool(entry.get("builtin", False)),
        labels=_label_table(entry.get("labels")),
        spacing=None if not spacing else tuple(float(value) for value in spacing),
        lineage=lineage if isinstance(lineage, Mapping) else {"parent": lineage},
        metrics=entry.get("metrics") or {},
    )


def _label_table(data: Any) -> LabelTable:
    return LabelTable.from_dict(data) if isinstance(data, Mapping) else SYNAPSE13


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
