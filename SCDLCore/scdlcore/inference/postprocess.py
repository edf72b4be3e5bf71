"""Postprocessing on the model grid: each organ keeps its largest connected region."""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch

from scdlcore.classes import class_argmax

__all__ = ["POSTPROCESSING", "keep_largest_components"]


#: What ``largest_component`` does, in words: benchmarks and model.json record it beside the scores it produced.
POSTPROCESSING = "largest connected region per organ"


_NEIGHBOURS_26 = np.ones((3, 3, 3), dtype=bool)


def keep_largest_components(probs: torch.Tensor) -> None:
    """Make every voxel outside its winning class's largest 26-connected region background, in place.

    Args:
        probs: class probabilities (C, D, H, W) on the model grid, class 0 background. Voxels of a class's smaller
            regions get probability 1 for background and 0 for the rest, so the interpolation to the input grid
            treats them as background throughout.
    """
    classes = class_argmax(probs).cpu().numpy()
    stray = np.zeros(classes.shape, dtype=bool)
    for c in np.unique(classes[classes > 0]):
        regions, count = scipy.ndimage.label(classes == c, structure=_NEIGHBOURS_26)
        if count > 1:
            sizes = np.bincount(regions.ravel())
            sizes[0] = 0
            stray |= (regions > 0) & (regions != sizes.argmax())
    if stray.any():
        mask = torch.from_numpy(stray).to(probs.device)
        probs[:, mask] = 0.0
        probs[0, mask] = 1.0
