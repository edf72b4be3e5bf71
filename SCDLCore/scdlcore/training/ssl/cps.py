"""Cross pseudo supervision (CPS) with GA losses: two networks teach each other on all samples."""

from __future__ import annotations

import torch
from torch import nn

from scdlcore.classes import class_argmax
from scdlcore.nets.scdl import SCDLModule
from scdlcore.training.ssl.base import Batch, SSLBase, sigmoid_rampup

__all__ = ["CPS"]


class CPS(SSLBase):
    """CPS + GA (SCDLCore/docs/METHOD.md section 2), the default base.

    total = sup(A) + sup(B) + w_cps(t) * (GACE(A, argmax B) + GACE(B, argmax A))
    [+ lambda * SCDL(A) + lambda * SCDL(B)], with w_cps(t) = cps_weight * exp(-5 (1 - t/T)^2).
    Inference averages both networks' logits.

    Args:
        network_a, network_b: two networks of the same architecture returning ``(logits, feat)``.
        cps_weight: the ramp's final weight of the cross pseudo supervision.
        scdl: two SCDL modules (one per network) or None. Other arguments: see :class:`SSLBase`.
    """

    def __init__(
        self,
        network_a: nn.Module,
        network_b: nn.Module,
        *,
        cps_weight: float = 0.1,
        scdl: list[SCDLModule] | None = None,
        scdl_weight: float = 0.1,
        top_k: float = 0.1,
    ) -> None:
        super().__init__(scdl, scdl_weight, top_k)
        if scdl is not None and len(scdl) != 2:
            raise ValueError(f"CPS needs one SCDL module per network (2), got {len(scdl)}.")
        self.networks = nn.ModuleList([network_a, network_b])
        self.cps_weight = cps_weight

    def training_losses(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        outputs = [network(batch.images) for network in self.networks]
        pseudo = [class_argmax(logits.detach(), dim=1) for logits, _ in outputs]
        supervised = sum(self.supervised_loss(logits, batch) for logits, _ in outputs)
        cross = self.pseudo_ce_loss(outputs[0][0], pseudo[1]) + self.pseudo_ce_loss(outputs[1][0], pseudo[0])
        scdl = sum(self.scdl_loss(index, feat, batch, progress, losses) for index, (_, feat) in enumerate(outputs))
        losses.update(supervised=supervised.detach(), cps=cross.detach())
        losses["total"] = supervised + self.cps_weight * sigmoid_rampup(progress) * cross + scdl
        return losses
