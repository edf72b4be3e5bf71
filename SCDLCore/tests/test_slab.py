"""The short-scan augmentation: labeled patches cut down to a slab along z that holds their centre slice."""

from __future__ import annotations

import torch

from scdlcore.labels import SYNAPSE13
from scdlcore.training.augment import Augmenter
from scdlcore.training.config import AugmentConfig
from scdlcore.training.slab import ShortScan


def batch(labeled: int = 3, unlabeled: int = 1, depth: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand((labeled + unlabeled, 1, depth, 8, 8)) + 0.1  # no voxel is 0 before the cut
    return images, torch.ones((labeled, depth, 8, 8), dtype=torch.bool)


def slab_slices(image: torch.Tensor) -> list[int]:
    """The z indices of a (1, D, H, W) patch that were kept."""
    return [z for z in range(image.shape[1]) if bool((image[0, z] != 0).all())]


def test_each_labeled_patch_keeps_one_slab_around_its_centre_and_loses_validity_outside():
    images, valid = batch()
    cut = ShortScan(prob=1.0, thickness_mm=(9.0, 30.0), spacing_z_mm=3.0)  # 3 to 10 slices
    thicknesses = set()
    for seed in range(20):
        out, out_valid = cut(images, valid, torch.Generator().manual_seed(seed))
        for index in range(valid.shape[0]):
            kept = slab_slices(out[index])
            assert kept == list(range(kept[0], kept[-1] + 1))  # one contiguous slab
            assert 3 <= len(kept) <= 10
            assert 12 in kept  # the centre slice, where the sampler put the organ
            assert torch.equal(out[index, 0, kept], images[index, 0, kept])  # anatomy inside is untouched
            outside = [z for z in range(24) if z not in kept]
            assert not out[index, 0, outside].any()  # 0 outside: what the sliding window pads with
            assert torch.equal(out_valid[index].any(dim=(1, 2)), out[index, 0].ne(0).all(dim=(1, 2)))
            thicknesses.add(len(kept))
        assert torch.equal(out[3], images[3])  # the unlabeled patch is left whole
    assert len(thicknesses) >= 4  # the thickness is drawn, not fixed


def test_a_slab_thicker_than_the_patch_keeps_it_whole():
    images, valid = batch(depth=6)
    out, out_valid = ShortScan(1.0, (30.0, 120.0), 3.0)(images, valid, torch.Generator().manual_seed(0))
    assert torch.equal(out, images) and bool(out_valid.all())


def test_no_cut_without_probability():
    images, valid = batch()
    out, out_valid = ShortScan(0.0, (9.0, 30.0), 3.0)(images, valid, torch.Generator().manual_seed(0))
    assert out is images and out_valid is valid


def test_the_augmenter_cuts_last_and_its_draws_follow_the_step():
    """Every other transform is off, so what changes is the cut alone; the same step draws the same slabs."""
    off = {name: 0.0 for name in ("spatial_prob", "intensity_prob", "gamma_prob", "noise_prob", "blur_prob")}
    config = AugmentConfig(**off, lowres_prob=0.0, slab_prob=1.0, slab_mm=(9.0, 30.0))
    augmenter = Augmenter(config, SYNAPSE13, (-150.0, 450.0), spacing_z_mm=3.0, seed=0)
    images, valid = batch(labeled=2, unlabeled=2)
    labels = torch.zeros(valid.shape, dtype=torch.long)
    first = augmenter(images, labels, valid, step=5)
    again = augmenter(images, labels, valid, step=5)
    other = augmenter(images, labels, valid, step=6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[2], other[2])
    assert not bool(first[2].all()) and torch.equal(first[0][2:], images[2:])
