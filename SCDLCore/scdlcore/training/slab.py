"""Short-scan augmentation: a labeled patch cut down to a slab along z, as a CT that covers a few centimetres.

A network trained on whole abdomens meets the end of a volume along z only in the patches of its first and last
slices. Given a short scan (ct_abdomen_dicom is 20 slices, 40 mm), every window holds a thin slab of anatomy between
zero padding, a sight it never trained on (SCDLCore/docs/ACCURACY.md). Per labeled patch, with probability
``prob``, a thickness is drawn uniformly from ``thickness_mm`` and a slab of it placed at random so that it holds
the patch's centre slice (where the rare-class sampling put the organ). Outside the slab the image becomes 0, the
value the sliding window pads with, and the voxels stop being valid: the network is not asked to guess anatomy it
cannot see.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ShortScan"]


class ShortScan:
    """Cuts labeled patches down to a random slab along z (array axis 0).

    Args:
        prob: chance per labeled patch.
        thickness_mm: (low, high) slab thickness in mm.
        spacing_z_mm: the model grid's slice spacing in mm.
    """

    def __init__(self, prob: float, thickness_mm: Sequence[float], spacing_z_mm: float) -> None:
        self.prob = prob
        self.thickness = (max(1, round(thickness_mm[0] / spacing_z_mm)), max(1, round(thickness_mm[1] / spacing_z_mm)))

    def __call__(
        self, images: torch.Tensor, valid: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slabs of the first ``valid.shape[0]`` (labeled) patches; the others are returned as they are.

        Args:
            images: (B, 1, D, H, W). valid: (B_l, D, H, W) bool, B_l <= B.
            generator: the random draws (a CPU generator).

        Returns:
            images (B, 1, D, H, W) and valid (B_l, D, H, W), zero and False outside each drawn slab.
        """
        depth = images.shape[2]
        inside = torch.ones(valid.shape[0], depth, dtype=torch.bool)
        for index in range(valid.shape[0]):
            if float(torch.rand((), generator=generator)) >= self.prob:
                continue
            low, high = min(self.thickness[0], depth), min(self.thickness[1], depth)
            thickness = int(torch.randint(low, high + 1, (), generator=generator))
            centre = depth // 2
            first_start, last_start = max(0, centre - thickness + 1), min(centre, depth - thickness)
            start = int(torch.randint(first_start, last_start + 1, (), generator=generator))
            inside[index] = False
            inside[index, start : start + thickness] = True
        if bool(inside.all()):
            return images, valid
        inside = inside.to(images.device)[:, :, None, None]  # (B_l, D, 1, 1)
        images = images.clone()
        images[: valid.shape[0], 0] *= inside
        return images, valid & inside
