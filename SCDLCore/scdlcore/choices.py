"""The named values that the configuration, model.json and the networks all accept, listed once.

Each layer checks its own input against these (the configuration when it is loaded, a bundle when it is
read, a network or predictor when it is built), so the lists cannot drift apart.
"""

from __future__ import annotations

__all__ = ["ANCHOR_MODES", "ARCHS", "BASES", "ENSEMBLES", "NORMS", "P2E_MODES", "UNREVIEWED_MODES"]

#: Semi-supervised bases (``ssl.base``, model.json ``base``).
BASES = ("cps", "mean_teacher", "supervised")
#: How the predictor combines a bundle's networks: the mean of their logits or the first network only.
ENSEMBLES = ("mean", "first")
#: Network architectures (``network.arch``).
ARCHS = ("vnet",)
#: Normalisation layers of the VNet (``network.norm`` also takes "auto").
NORMS = ("batch", "instance")
#: SCDL's proxy-to-embedding alignment: over voxel tokens or class means.
P2E_MODES = ("tokens", "classes")
#: SCDL's semantic anchors: from the batch or an exponential moving average.
ANCHOR_MODES = ("batch", "ema")
#: What training makes of the organs a partial review left as drawn: labels as drawn, or unknown voxels.
UNREVIEWED_MODES = ("kept", "unknown")
