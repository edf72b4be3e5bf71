"""Sliding-window geometry: where the windows start and the Gaussian weight of each window's voxels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_GAUSSIAN_SIGMA = 0.125  # of the patch size, as in nnU-Net and MONAI


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread window starts covering ``size`` (>= ``patch``) with at least ``overlap`` shared."""
    if size <= patch:
        return [0]
    stride = max(1, int(patch * (1 - overlap)))
    count = math.ceil((size - patch) / stride) + 1
    return [round(index * (size - patch) / (count - 1)) for index in range(count)]


def gaussian_map(patch_size: Sequence[int], device: torch.device) -> torch.Tensor:
    """Gaussian importance (d, h, w): 1 at the centre, sigma = patch / 8, floored at 1e-4 (no zero weight)."""
    axes = []
    for size in patch_size:
        position = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        axes.append(torch.exp(-0.5 * (position / (_GAUSSIAN_SIGMA * size)) ** 2))
    gaussian = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (gaussian / gaussian.max()).clamp_min(1e-4).to(device)
