"""Mean Teacher with GA losses: a student and its exponential-moving-average teacher."""

from __future__ import annotations

import copy

import torch
from torch import nn

from scdlcore.classes import class_argmax
from scdlcore.nets.scdl import SCDLModule
from scdlcore.training.ssl.base import Batch, SSLBase, sigmoid_rampup

__all__ = ["MeanTeacher"]


class MeanTeacher(SSLBase):
    """Mean Teacher + GA (SCDLCore/docs/METHOD.md section 2).

    The teacher sees the images with Gaussian noise (std ``noise_std``, clipped to +-2 std); its argmax is the
    pseudo-label of a GADice consistency loss on all samples, weighted by ``consistency_weight * ramp(t)``.
    After each optimiser step the teacher follows the student with alpha = min(1 - 1/(step+1), ema_decay).
    Bundles export the teacher (the steadier network).

    Args:
        student: network returning ``(logits, feat)``; the teacher starts as its copy.
        consistency_weight: the ramp's final weight.
        ema_decay: the cap of the EMA coefficient alpha.
        noise_std: std of the teacher's input noise, in windowed intensity units ([0, 1] = the HU window).
        scdl: one SCDL module (for the student) or None. Other arguments: see :class:`SSLBase`.
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        consistency_weight: float = 0.1,
        ema_decay: float = 0.99,
        noise_std: float = 0.1,
        scdl: list[SCDLModule] | None = None,
        scdl_weight: float = 0.1,
        top_k: float = 0.1,
    ) -> None:
        super().__init__(scdl, scdl_weight, top_k)
        if scdl is not None and len(scdl) != 1:
            raise ValueError(f"Mean Teacher takes one SCDL module (the student's), got {len(scdl)}.")
        self.networks = nn.ModuleList([student])
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.consistency_weight, self.ema_decay, self.noise_std = consistency_weight, ema_decay, noise_std

    def inference_networks(self) -> list[nn.Module]:
        return [self.teacher]

    def training_losses(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        logits, feat = self.networks[0](batch.images)
        with torch.no_grad():
            noise = (torch.randn_like(batch.images) * self.noise_std).clamp(-2 * self.noise_std, 2 * self.noise_std)
            pseudo = class_argmax(self.teacher(batch.images + noise)[0], dim=1)
        supervised = self.supervised_loss(logits, batch)
        consistency = self.dice_loss(logits, pseudo)
        scdl = self.scdl_loss(0, feat, batch, progress, losses)
        losses.update(supervised=supervised.detach(), consistency=consistency.detach())
        losses["total"] = supervised + self.consistency_weight * sigmoid_rampup(progress) * consistency + scdl
        return losses

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        alpha = min(1.0 - 1.0 / (step + 1), self.ema_decay)
        for teacher, student in zip(self.teacher.parameters(), self.networks[0].parameters()):
            teacher.lerp_(student.detach(), 1.0 - alpha)
        for teacher, student in zip(self.teacher.buffers(), self.networks[0].buffers()):
            teacher.copy_(student)
