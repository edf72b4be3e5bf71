"""Patch augmentation: the contrast phase shift, then MONAI spatial and intensity transforms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from scdlcore.labels import LabelTable
from scdlcore.training.config import AugmentConfig
from scdlcore.training.contrast import ContrastPhase
from scdlcore.training.slab import ShortScan

__all__ = ["Augmenter"]


class Augmenter:
    """Random patch augmentation with MONAI dictionary transforms, run on the patches' device.

    The contrast phase shift (:mod:`scdlcore.training.contrast`) comes first, on labeled patches: it needs their labels
    where they are. Spatial transforms move image, labels and valid together (labels and valid with nearest
    interpolation); intensity transforms touch the image only. The short-scan cut (:mod:`scdlcore.training.slab`)
    comes last, so that the padding it leaves is the exact 0 the sliding window pads with. Random draws are seeded
    per (seed, rank, step).

    Args:
        config: the augmentation settings. table, hu_window: the label table and the window of the images
            (the phase shift works in HU). spacing_z_mm: the model grid's slice spacing (the short-scan cut works
            in mm). seed, rank: with the step, they fix every random draw.
    """

    def __init__(
        self,
        config: AugmentConfig,
        table: LabelTable,
        hu_window: Sequence[float],
        spacing_z_mm: float,
        seed: int,
        rank: int = 0,
    ) -> None:
        from monai import transforms as mt

        self.config, self.seed, self.rank = config, seed, rank
        self.phase = ContrastPhase(table, hu_window, config.phase_prob)
        self.short_scan = ShortScan(config.slab_prob, config.slab_mm, spacing_z_mm)
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
            mt.RandGaussianSmoothd(
                keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=config.blur_prob
            ),
            mt.RandSimulateLowResolutiond(keys="image", zoom_range=config.lowres_zoom, prob=config.lowres_prob),
        ]
        self.transform = mt.Compose(steps)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor,
        step: int,
        class_hu: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """images (B, 1, D, H, W), labels and valid (B_l, D, H, W); labeled samples are the first B_l.
        class_hu (B_l, C): their cases' median HU per class (the phase shift is skipped without it)."""
        if not self.config.enabled:
            return images, labels, valid
        seeds = np.random.default_rng([self.seed, self.rank, step, 7]).integers(2**31, size=3)
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
            out_images.append(_plain(result["image"]).float())
            if index < labels.shape[0]:
                out_labels.append(_plain(result["labels"])[0].round().long())
                out_valid.append(_plain(result["valid"])[0] > 0.5)
        images, labels, valid = torch.stack(out_images), torch.stack(out_labels), torch.stack(out_valid)
        if self.config.slab_prob > 0 and labels.shape[0]:
            images, valid = self.short_scan(images, valid, torch.Generator().manual_seed(int(seeds[2])))
        return images, labels, valid


def _plain(array) -> torch.Tensor:
    """A MONAI result as a plain tensor. MONAI returns MetaTensors, and every later operation on one (the whole
    forward and backward pass) goes through its ``__torch_function__``, which cost 20-30% of a CPU training step."""
    from monai.utils import convert_to_tensor

    return convert_to_tensor(array, track_meta=False)
