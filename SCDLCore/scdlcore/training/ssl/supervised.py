"""Supervised only: one network, labeled samples only (the floor every semi-supervised base must beat)."""

from __future__ import annotations

import torch
from torch import nn

from scdlcore.nets.scdl import SCDLModule
from scdlcore.training.ssl.base import Batch, SSLBase

__all__ = ["Supervised"]


class Supervised(SSLBase):
    """GACE + GADice on labeled samples; unlabeled samples in the batch are ignored, except by SCDL if enabled.

    Args:
        network: network returning ``(logits, feat)``. Other arguments: see :class:`SSLBase`.
    """

    def __init__(
        self, network: nn.Module, *, scdl: list[SCDLModule] | None = None, scdl_weight: float = 0.1, top_k: float = 0.1
    ) -> None:
        super().__init__(scdl, scdl_weight, top_k)
        self.networks = nn.ModuleList([network])

    def training_losses(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        logits, feat = self.networks[0](batch.images)
        supervised = self.supervised_loss(logits, batch)
        scdl = self.scdl_loss(0, feat, batch, progress, losses)
        losses["supervised"] = supervised.detach()
        losses["total"] = supervised + scdl
        return losses
