"""Two-stream patch sampling that favours rare classes.

Batches hold ``labeled_batch`` labeled patches first, then ``unlabeled_batch`` unlabeled ones: labeled cases
are drawn as often as the whole unlabeled pool, however few they are. Sampling is a pure function of
(seed, rank, step), so a resumed run draws exactly the patches the uninterrupted run would have drawn and
DDP ranks draw different ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scdlcore.training.cache import PreparedCase

__all__ = ["PatchSampler"]


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
            valid.append(
                np.ones(self.patch_size, bool)
                if case.valid is None
                else _crop(case.valid, centre, self.patch_size, True)
            )
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


def _crop(array: np.ndarray, centre: np.ndarray, size: tuple[int, int, int], fill) -> np.ndarray:
    """A ``size`` window of ``array`` centred at ``centre``, padded with ``fill`` where it leaves the volume."""
    start = np.asarray(centre) - np.asarray(size) // 2
    out = np.full(size, fill, dtype=array.dtype)
    src = tuple(slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, size, array.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    out[dst] = array[src]
    return out
