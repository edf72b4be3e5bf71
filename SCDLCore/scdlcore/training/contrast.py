"""Contrast phase augmentation: the labels say where each organ and vessel is, so each one's HU is moved to
a value drawn from a real contrast phase, with smooth borders.

A network trained on one non-contrast CT labels an arterial kidney (220 HU) or aorta (400 HU) background:
organs brighter than anything it saw are not organs to it (SCDLCore/docs/ACCURACY.md). Per labeled patch, with
probability ``prob``, one phase is drawn (non-contrast, arterial, portal venous, delayed), then for every
organ in the patch a target median HU uniformly from that phase's range for the organ
(:data:`PHASE_HU`); the organ's voxels are shifted by ``target - its median HU`` in the case (texture
kept), the shift map blurred so borders blend instead of stepping. Organs the table does not know keep
their HU.

Ranges are typical adult values of enhanced abdominal CT (the kidney as cortex + medulla mean): wide on
purpose, since scanners, injection protocols and timing vary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from scdlcore.labels import LabelTable

__all__ = ["PHASES", "PHASE_HU", "ContrastPhase", "class_hu_rows"]

PHASES = ("non-contrast", "arterial", "portal venous", "delayed")

#: Organ name -> (low, high) median HU in each of :data:`PHASES`, in that order.
PHASE_HU: dict[str, tuple[tuple[float, float], ...]] = {
    "liver": ((40, 65), (60, 95), (90, 135), (75, 110)),
    "spleen": ((35, 55), (90, 180), (95, 135), (80, 115)),
    "kidney_right": ((20, 45), (130, 250), (140, 220), (100, 170)),
    "kidney_left": ((20, 45), (130, 250), (140, 220), (100, 170)),
    "gallbladder": ((-5, 25), (-5, 25), (-5, 25), (-5, 25)),
    "esophagus": ((30, 50), (50, 90), (60, 100), (50, 90)),
    "stomach": ((20, 45), (50, 100), (60, 110), (50, 95)),
    "aorta": ((30, 50), (250, 450), (130, 200), (90, 140)),
    "inferior_vena_cava": ((30, 50), (60, 130), (110, 170), (90, 140)),
    "portal_vein_and_splenic_vein": ((30, 50), (90, 170), (150, 220), (100, 150)),
    "pancreas": ((30, 50), (90, 150), (80, 130), (60, 100)),
    "adrenal_gland_right": ((5, 35), (50, 110), (50, 100), (40, 80)),
    "adrenal_gland_left": ((5, 35), (50, 110), (50, 100), (40, 80)),
}

_BORDER_SIGMA = 1.0  # voxels: the shift map's blur, so an organ's border blends into its neighbours


class ContrastPhase:
    """Moves each labeled organ of a patch to the HU of a randomly drawn contrast phase.

    Args:
        table: the label table (class ``c`` is ``table.labels[c - 1]``).
        hu_window: the (low, high) HU that the images were windowed with to [0, 1].
        prob: chance per labeled patch.
    """

    def __init__(self, table: LabelTable, hu_window: Sequence[float], prob: float) -> None:
        self.prob = prob
        self.width = float(hu_window[1]) - float(hu_window[0])
        unknown = ((float("nan"), float("nan")),) * len(PHASES)
        # (C, phases, 2): background and organs the table lacks get NaN (no shift).
        self.ranges = torch.tensor([unknown] + [PHASE_HU.get(label.name, unknown) for label in table.labels])

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, class_hu: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Shifted copies of the labeled patches.

        Args:
            images: (B, 1, D, H, W) windowed to [0, 1]. labels: (B, D, H, W) class indices.
            class_hu: (B, C) median HU of each class in the patch's case (NaN where unknown).
            generator: the random draws (a CPU generator).

        Returns:
            (B, 1, D, H, W), clipped to [0, 1].
        """
        out = images.clone()
        for index in range(images.shape[0]):
            if float(torch.rand((), generator=generator)) >= self.prob:
                continue
            phase = int(torch.randint(len(PHASES), (), generator=generator))
            low, high = self.ranges[:, phase, 0], self.ranges[:, phase, 1]
            target = low + (high - low) * torch.rand(low.shape, generator=generator)
            shift = torch.nan_to_num((target - class_hu[index].cpu()) / self.width).to(images.device)
            present = torch.unique(labels[index])
            present = present[shift[present] != 0]
            if len(present) == 0:
                continue
            masks = (labels[index][None] == present[:, None, None, None]).float()  # (K, D, H, W)
            shift_map = (_blur(masks) * shift[present][:, None, None, None]).sum(0)
            out[index, 0] = (images[index, 0] + shift_map).clamp_(0.0, 1.0)
        return out


def _blur(masks: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur (sigma :data:`_BORDER_SIGMA`) of (K, D, H, W) masks, same shape."""
    radius = int(3 * _BORDER_SIGMA)
    x = torch.arange(-radius, radius + 1, dtype=masks.dtype, device=masks.device)
    kernel = torch.exp(-0.5 * (x / _BORDER_SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    out = masks[:, None]
    for axis in range(3):  # z, y, x; edges replicated, so an organ cut by the patch border keeps its shift there
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(kernel)
        pad = [0, 0, 0, 0, 0, 0]  # F.pad order: x, y, z
        pad[2 * (2 - axis) : 2 * (2 - axis) + 2] = [radius, radius]
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[:, 0]


def class_hu_rows(class_hu: Sequence[Mapping[int, float] | None], num_classes: int) -> torch.Tensor:
    """(B, C) median HU per class from per-case ``{class: HU}`` dicts (NaN where a class is absent)."""
    rows = torch.full((len(class_hu), num_classes), float("nan"))
    for row, values in enumerate(class_hu):
        for cls, hu in (values or {}).items():
            rows[row, cls] = hu
    return rows
