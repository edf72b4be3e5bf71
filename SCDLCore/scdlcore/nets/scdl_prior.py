"""VNet with SCDL's prior path: the class-prior features join the embedding before the output convolution."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from scdlcore.nets.scdl import SCDLModule
from scdlcore.nets.vnet import VNet

__all__ = ["SCDLPriorVNet"]


class SCDLPriorVNet(nn.Module):
    """A :class:`VNet` whose logits see ``scdl.prior(feat)`` (SCDLCore/docs/METHOD.md section 3, item 10).

    The SCDL module (projection MLP, class proxies, prior projection) is part of this network, so it is
    exported with it; the trainer uses the same module for the SCDL losses.

    Args:
        in_channels, num_classes, width, norm: as :class:`VNet`.
        scdl: keyword arguments of :class:`scdlcore.nets.scdl.SCDLModule` (grid, hidden, embed_dim...).

    Shapes:
        input ``(B, in_channels, D, H, W)``; returns ``logits (B, C, D, H, W)`` and the embedding before the
        prior, ``feat (B, width, D, H, W)`` (what SCDL's losses work on).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 14,
        width: int = 16,
        norm: str = "batch",
        scdl: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = VNet(in_channels, num_classes, width, norm)
        self.scdl_kwargs = dict(scdl or {})
        self.scdl = SCDLModule(width, num_classes, prior=True, **self.scdl_kwargs)

    def description(self) -> dict:
        return {**self.backbone.description(), "scdl": self.scdl_kwargs}

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.backbone.features(image)
        return self.backbone.head(self.scdl.prior(feat)), feat
