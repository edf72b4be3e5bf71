"""Cached preprocessing of the training cases.

Every case is read once, cropped to the body, resampled to the model spacing and HU-windowed, then kept
in a cache folder (``.npz``, keyed by the source files and the preprocessing settings) and in memory, so a
run never re-reads or re-resamples a volume.

Partially reviewed cases (``reviewed`` lists some organs): voxels of a reviewed organ supervise; so does
background within ``PARTIAL_BAND_MM`` of a reviewed organ (the person fixed that boundary). The organs the
review left as the model drew them train as drawn, with the background in their band (``data.unreviewed =
"kept"``: without them a fine-tune forgets those organs on the corrected CT), or are unknown (``"unknown"``).
Every other voxel is unknown (``valid`` False) and takes no part in the losses or in SCDL's token targets:
background far from every drawn organ may hide an organ the model missed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scdlcore._atomic import atomic_write
from scdlcore.dataset.manifest import Case, Dataset
from scdlcore.io.read import read_image, read_label
from scdlcore.training.config import DataConfig

__all__ = ["PreparedCase", "prepare_case", "prepare_dataset"]


_CACHE_VERSION = 3  # 2: body crop searched on 4 mm blocks; 3: canonical orientation, organ HU


_MAX_INDICES_PER_CLASS = 20000


PARTIAL_BAND_MM = 10.0  # background this close to a reviewed (or kept) organ is known


@dataclass
class PreparedCase:
    """A case on the model grid.

    Attributes:
        image: (D, H, W) float16, HU-windowed to [0, 1].
        classes: (D, H, W) uint8 class indices, or None (unlabeled).
        valid: (D, H, W) bool, voxels whose label is known, or None (all known).
        class_indices: per class present, a sample of flat voxel indices (for rare-class centred patches).
        class_hu: per class present, the median HU inside it (the contrast phase augmentation moves it).
    """

    id: str
    image: np.ndarray
    classes: np.ndarray | None = None
    valid: np.ndarray | None = None
    class_indices: dict[int, np.ndarray] | None = None
    class_hu: dict[int, float] | None = None


def prepare_case(dataset: Dataset, case: Case, config: DataConfig, cache_dir: Path | None) -> PreparedCase:
    """Preprocess one case, from the cache when its key matches."""
    key = _cache_key(dataset, case, config)
    cache_file = None if cache_dir is None else cache_dir / f"{case.id}-{key}.npz"
    if cache_file is not None and cache_file.is_file():
        return _load_cached(case.id, cache_file)
    prepared = _preprocess(dataset, case, config)
    if cache_file is not None:
        _save_cached(prepared, cache_file)
    return prepared


def prepare_dataset(
    dataset: Dataset, cases: Sequence[Case], config: DataConfig, cache_dir: Path | None
) -> list[PreparedCase]:
    return [prepare_case(dataset, case, config, cache_dir) for case in cases]


def _preprocess(dataset: Dataset, case: Case, config: DataConfig) -> PreparedCase:
    """Read a case and bring it to the model grid through the same path as ``scdl segment``."""

    image = read_image(dataset.path(case.image))
    prepared_image = config.preprocessing.prepare(image)
    prepared = PreparedCase(id=case.id, image=prepared_image.image().astype(np.float16))
    if case.label and case.is_labeled:
        label = read_label(dataset.path(case.label), reference=image)
        try:
            classes = dataset.table.values_to_classes(prepared_image.labels(label))
        except ValueError as err:
            raise ValueError(f"Label map {dataset.path(case.label)} of case {case.id!r}: {err}") from err
        prepared.classes = classes
        if case.reviewed is not None:
            known = None if config.unreviewed == "kept" else [dataset.table.class_index(n) for n in case.reviewed]
            prepared.valid = _partial_valid(classes, known, config.spacing)
        prepared.class_indices = _class_indices(classes, prepared.valid, case.id)
        prepared.class_hu = _class_hu(prepared_image.grid.array, classes, prepared.class_indices)
    return prepared


def _class_hu(hu: np.ndarray, classes: np.ndarray, class_indices: dict[int, np.ndarray]) -> dict[int, float]:
    """Median HU of each labeled class (its sampled voxels), background left out."""
    flat = hu.ravel()
    return {cls: float(np.median(flat[indices])) for cls, indices in class_indices.items() if cls != 0 and len(indices)}


def _partial_valid(classes: np.ndarray, known: Sequence[int] | None, spacing: Sequence[float]) -> np.ndarray:
    """(D, H, W) bool: the known voxels of a partially reviewed case (see the module docstring).

    Args:
        classes: (D, H, W) class indices. spacing: (x, y, z) mm.
        known: the classes known as drawn: the reviewed ones (``data.unreviewed = "unknown"``), or None for every
            drawn organ (``"kept"``).
    """
    from scipy import ndimage

    known_organs = classes > 0 if known is None else np.isin(classes, known)
    band = np.ceil(PARTIAL_BAND_MM / np.array(spacing[::-1])).astype(int)
    structure = np.ones(tuple(2 * b + 1 for b in band), bool)
    near = ndimage.binary_dilation(known_organs, structure=structure) if known_organs.any() else known_organs
    return known_organs | (near & (classes == 0))


def _class_indices(classes: np.ndarray, valid: np.ndarray | None, case_id: str) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(int(hashlib.sha1(case_id.encode()).hexdigest()[:8], 16))
    flat = classes.ravel()
    usable = np.ones_like(flat, bool) if valid is None else valid.ravel()
    result = {}
    for cls in np.unique(flat[usable]):
        indices = np.flatnonzero((flat == cls) & usable)
        if len(indices) > _MAX_INDICES_PER_CLASS:
            indices = rng.choice(indices, _MAX_INDICES_PER_CLASS, replace=False)
        result[int(cls)] = indices.astype(np.int64)
    return result


def _cache_key(dataset: Dataset, case: Case, config: DataConfig) -> str:
    files = []
    for relative in filter(None, (case.image, case.label)):
        path = dataset.path(relative)
        stats = [
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in (sorted(path.iterdir()) if path.is_dir() else [path])
        ]
        files.append([relative, stats])
    description = {
        "v": _CACHE_VERSION,
        "files": files,
        "reviewed": case.reviewed,
        "labels": dataset.table.name,
        "spacing": list(config.spacing),
        "window": list(config.hu_window),
        "orientation": config.orientation,
        "band": PARTIAL_BAND_MM,
        "unreviewed": config.unreviewed,
    }
    return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _save_cached(prepared: PreparedCase, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"image": prepared.image}
    if prepared.classes is not None:
        arrays["classes"] = prepared.classes
        for cls, indices in (prepared.class_indices or {}).items():
            arrays[f"indices_{cls}"] = indices
        for cls, hu in (prepared.class_hu or {}).items():
            arrays[f"hu_{cls}"] = np.float32(hu)
    if prepared.valid is not None:
        arrays["valid"] = prepared.valid

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.savez would add ".npz" to a name
            np.savez(handle, **arrays)

    atomic_write(path, write)


def _load_cached(case_id: str, path: Path) -> PreparedCase:
    with np.load(path, allow_pickle=False) as data:
        indices = {int(k.split("_")[1]): data[k] for k in data.files if k.startswith("indices_")}
        class_hu = {int(k.split("_")[1]): float(data[k]) for k in data.files if k.startswith("hu_")}
        return PreparedCase(
            id=case_id,
            image=data["image"],
            classes=data["classes"] if "classes" in data.files else None,
            valid=data["valid"] if "valid" in data.files else None,
            class_indices=indices or None,
            class_hu=class_hu or None,
        )
