"""Training data: cached preprocessing, two-stream patch sampling that favours rare classes, augmentation.

Every case is read once, cropped to the body, resampled to the model spacing and HU-windowed, then kept
in a cache folder (``.npz``, keyed by the source files and the preprocessing settings) and in memory, so a
run never re-reads or re-resamples a volume. Batches hold ``labeled_batch`` labeled patches first, then
``unlabeled_batch`` unlabeled ones (a two-stream sampler: labeled cases are drawn as often as the whole
unlabeled pool, however few they are). Sampling is a pure function of (seed, rank, step), so a resumed
run draws exactly the patches the uninterrupted run would have drawn and DDP ranks draw different ones.

Partially reviewed cases (``reviewed`` lists some organs): voxels of a reviewed organ supervise; so does
background within ``PARTIAL_BAND_MM`` of a reviewed organ (the person fixed that boundary); every other
voxel, unreviewed organs included, is unknown (``valid`` False) and takes no part in the losses or in
SCDL's token targets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._atomic import atomic_write
from .config import AugmentConfig, DataConfig
from .contrast import ContrastPhase
from .dataset import Case, Dataset
from .labels import LabelTable

__all__ = ["PreparedCase", "prepare_case", "prepare_dataset", "PatchSampler", "Augmenter"]

_log = logging.getLogger(__name__)
_CACHE_VERSION = 3  # 2: body crop searched on 4 mm blocks; 3: canonical orientation, organ HU
_MAX_INDICES_PER_CLASS = 20000
PARTIAL_BAND_MM = 10.0  # background this close to a reviewed organ counts as reviewed


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


class PatchSampler:
    """Draws training batches from prepared cases.

    Args:
        labeled: prepared labeled cases (at least one). unlabeled: prepared unlabeled cases; when empty the
            unlabeled stream draws from the labeled images (their labels unused).
        patch_size: (D, H, W) voxels. labeled_batch / unlabeled_batch: patches per stream.
        rare_class_prob: chance that a labeled patch is centred on a voxel of a class drawn uniformly among the
            classes present in the case (so a 166-voxel adrenal is picked as often as the liver); else uniform.
        seed, rank: with the step, they fix every random draw.
        num_classes: C, background included (the width of the batch's ``class_hu``).
    """

    def __init__(
        self,
        labeled: Sequence[PreparedCase],
        unlabeled: Sequence[PreparedCase],
        patch_size: Sequence[int],
        labeled_batch: int,
        unlabeled_batch: int,
        rare_class_prob: float,
        seed: int,
        rank: int = 0,
        num_classes: int = 14,
    ) -> None:
        if not labeled:
            raise ValueError("The patch sampler needs at least one labeled case.")
        self.labeled, self.unlabeled = list(labeled), list(unlabeled) or list(labeled)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.labeled_batch, self.unlabeled_batch = labeled_batch, unlabeled_batch
        self.rare_class_prob, self.seed, self.rank, self.num_classes = rare_class_prob, seed, rank, num_classes

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Patches of ``step``: image (B, 1, D, H, W) float32, labels (B_l, D, H, W) int64, valid (B_l, D, H, W) bool,
        class_hu (B_l, C) float32: each labeled patch's case's median HU per class (NaN where absent)."""
        rng = np.random.default_rng([self.seed, self.rank, step])
        images, labels, valid = [], [], []
        class_hu = np.full((self.labeled_batch, self.num_classes), np.nan, np.float32)
        for row in range(self.labeled_batch):
            case = self.labeled[rng.integers(len(self.labeled))]
            for cls, hu in (case.class_hu or {}).items():
                class_hu[row, cls] = hu
            centre = self._centre(case, rng, rare=rng.random() < self.rare_class_prob)
            images.append(_crop(case.image, centre, self.patch_size, 0.0))
            labels.append(_crop(case.classes, centre, self.patch_size, 0))
            valid.append(np.ones(self.patch_size, bool) if case.valid is None else _crop(case.valid, centre, self.patch_size, True))
        for _ in range(self.unlabeled_batch):
            case = self.unlabeled[rng.integers(len(self.unlabeled))]
            images.append(_crop(case.image, self._centre(case, rng, rare=False), self.patch_size, 0.0))
        return {
            "image": np.stack(images)[:, None].astype(np.float32),
            "labels": np.stack(labels).astype(np.int64),
            "valid": np.stack(valid),
            "class_hu": class_hu,
        }

    def _centre(self, case: PreparedCase, rng: np.random.Generator, *, rare: bool) -> np.ndarray:
        shape = np.array(case.image.shape)
        foreground = [c for c in (case.class_indices or {}) if c != 0]
        if rare and foreground:
            indices = case.class_indices[foreground[rng.integers(len(foreground))]]  # type: ignore[index]
            centre = np.array(np.unravel_index(indices[rng.integers(len(indices))], case.image.shape))
            jitter = rng.integers(-np.array(self.patch_size) // 4, np.array(self.patch_size) // 4 + 1)
            return np.clip(centre + jitter, 0, shape - 1)
        return np.array([rng.integers(0, s) for s in shape])


class Augmenter:
    """Random patch augmentation with MONAI dictionary transforms, run on the patches' device.

    The contrast phase shift (:mod:`scdlcore.contrast`) comes first, on labeled patches: it needs their labels
    where they are. Spatial transforms move image, labels and valid together (labels and valid with nearest
    interpolation); intensity transforms touch the image only. Random draws are seeded per (seed, rank, step).

    Args:
        config: the augmentation settings. table, hu_window: the label table and the window of the images
            (the phase shift works in HU). seed, rank: with the step, they fix every random draw.
    """

    def __init__(self, config: AugmentConfig, table: LabelTable, hu_window: Sequence[float], seed: int,
                 rank: int = 0) -> None:
        from monai import transforms as mt

        self.config, self.seed, self.rank = config, seed, rank
        self.phase = ContrastPhase(table, hu_window, config.phase_prob)
        spatial_keys = ["image", "labels", "valid"]
        rotate = np.deg2rad(config.rotate_deg)
        steps: list = [
            mt.RandAffined(
                keys=spatial_keys,
                prob=config.spatial_prob,
                rotate_range=(rotate, rotate, rotate),
                scale_range=tuple((config.scale[0] - 1.0, config.scale[1] - 1.0) for _ in range(3)),
                mode=("bilinear", "nearest", "nearest"),
                padding_mode="zeros",
            ),
            *[mt.RandFlipd(keys=spatial_keys, prob=0.5, spatial_axis=axis) for axis in config.flip_axes],
            mt.RandScaleIntensityd(keys="image", factors=config.intensity_scale, prob=config.intensity_prob),
            mt.RandShiftIntensityd(keys="image", offsets=config.intensity_shift, prob=config.intensity_prob),
            mt.RandAdjustContrastd(keys="image", gamma=config.gamma, prob=config.gamma_prob),
            mt.RandGaussianNoised(keys="image", std=config.noise_std, prob=config.noise_prob),
            mt.RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=config.blur_prob),
            mt.RandSimulateLowResolutiond(keys="image", zoom_range=config.lowres_zoom, prob=config.lowres_prob),
        ]
        self.transform = mt.Compose(steps)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, step: int,
                 class_hu: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """images (B, 1, D, H, W), labels and valid (B_l, D, H, W); labeled samples are the first B_l.
        class_hu (B_l, C): their cases' median HU per class (the phase shift is skipped without it)."""
        if not self.config.enabled:
            return images, labels, valid
        seeds = np.random.default_rng([self.seed, self.rank, step, 7]).integers(2**31, size=2)
        if class_hu is not None and self.config.phase_prob > 0 and labels.shape[0]:
            generator = torch.Generator().manual_seed(int(seeds[1]))
            shifted = self.phase(images[: labels.shape[0]], labels, class_hu, generator)
            images = torch.cat([shifted, images[labels.shape[0] :]])
        self.transform.set_random_state(seed=int(seeds[0]))
        out_images, out_labels, out_valid = [], [], []
        for index in range(images.shape[0]):
            sample = {"image": images[index]}
            if index < labels.shape[0]:
                sample["labels"] = labels[index : index + 1].float()
                sample["valid"] = valid[index : index + 1].float()
            else:  # unlabeled: spatial transforms still need the keys; they are dropped afterwards
                sample["labels"] = torch.zeros_like(images[index])
                sample["valid"] = torch.zeros_like(images[index])
            result = self.transform(sample)
            out_images.append(torch.as_tensor(result["image"]).float())
            if index < labels.shape[0]:
                out_labels.append(torch.as_tensor(result["labels"])[0].round().long())
                out_valid.append(torch.as_tensor(result["valid"])[0] > 0.5)
        return torch.stack(out_images), torch.stack(out_labels), torch.stack(out_valid)


def _crop(array: np.ndarray, centre: np.ndarray, size: tuple[int, int, int], fill) -> np.ndarray:
    """A ``size`` window of ``array`` centred at ``centre``, padded with ``fill`` where it leaves the volume."""
    start = np.asarray(centre) - np.asarray(size) // 2
    out = np.full(size, fill, dtype=array.dtype)
    src = tuple(slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, size, array.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    out[dst] = array[src]
    return out


def _preprocess(dataset: Dataset, case: Case, config: DataConfig) -> PreparedCase:
    """Read a case and bring it to the model grid through the same path as ``scdl segment``."""
    from . import io

    image = io.read_image(dataset.path(case.image))
    prepared_image = config.preprocessing.prepare(image)
    prepared = PreparedCase(id=case.id, image=prepared_image.image().astype(np.float16))
    if case.label and case.is_labeled:
        label = io.read_label(dataset.path(case.label), reference=image)
        try:
            classes = dataset.table.values_to_classes(prepared_image.labels(label))
        except ValueError as err:
            raise ValueError(f"Label map {dataset.path(case.label)} of case {case.id!r}: {err}") from err
        prepared.classes = classes
        if case.reviewed is not None:
            prepared.valid = _partial_valid(classes, [dataset.table.class_index(n) for n in case.reviewed], config.spacing)
        prepared.class_indices = _class_indices(classes, prepared.valid, case.id)
        prepared.class_hu = _class_hu(prepared_image.grid.array, classes, prepared.class_indices)
    return prepared


def _class_hu(hu: np.ndarray, classes: np.ndarray, class_indices: dict[int, np.ndarray]) -> dict[int, float]:
    """Median HU of each labeled class (its sampled voxels), background left out."""
    flat = hu.ravel()
    return {cls: float(np.median(flat[indices])) for cls, indices in class_indices.items() if cls != 0 and len(indices)}


def _partial_valid(classes: np.ndarray, reviewed: list[int], spacing: Sequence[float]) -> np.ndarray:
    from scipy import ndimage

    reviewed_mask = np.isin(classes, reviewed)
    band = np.ceil(PARTIAL_BAND_MM / np.array(spacing[::-1])).astype(int)
    structure = np.ones(tuple(2 * b + 1 for b in band), bool)
    near = ndimage.binary_dilation(reviewed_mask, structure=structure) if reviewed_mask.any() else reviewed_mask
    return reviewed_mask | (near & (classes == 0))


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
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (sorted(path.iterdir()) if path.is_dir() else [path])]
        files.append([relative, stats])
    description = {
        "v": _CACHE_VERSION, "files": files, "reviewed": case.reviewed, "labels": dataset.table.name,
        "spacing": list(config.spacing), "window": list(config.hu_window), "orientation": config.orientation,
        "band": PARTIAL_BAND_MM,
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
