"""The patch augmenter hands the network plain tensors, whatever MONAI's transforms return."""

from __future__ import annotations

import torch

from scdlcore.labels import SYNAPSE13
from scdlcore.training.augment import Augmenter
from scdlcore.training.config import AugmentConfig


def test_every_output_is_a_plain_tensor_with_every_transform_on():
    """MONAI returns MetaTensors; a MetaTensor batch sends every operation of the forward and backward pass
    through MetaTensor.__torch_function__ (bench_train_pipeline.py measures the cost)."""
    on = {name: 1.0 for name in ("spatial_prob", "intensity_prob", "gamma_prob", "noise_prob", "blur_prob")}
    config = AugmentConfig(**on, lowres_prob=1.0, phase_prob=1.0, slab_prob=1.0)
    augmenter = Augmenter(config, SYNAPSE13, (-150.0, 450.0), spacing_z_mm=3.0, seed=0)
    images = torch.rand(3, 1, 16, 16, 16)
    labels = torch.randint(0, 3, (2, 16, 16, 16))
    class_hu = torch.full((2, SYNAPSE13.num_classes), float("nan"))
    class_hu[:, 1:3] = 40.0
    out = augmenter(images, labels, torch.ones_like(labels, dtype=torch.bool), step=0, class_hu=class_hu)
    assert [type(tensor) for tensor in out] == [torch.Tensor] * 3
    assert out[0].shape == images.shape and out[1].dtype == torch.long and out[2].dtype == torch.bool
