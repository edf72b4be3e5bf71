"""What every semi-supervised base shares: the batch, the supervised GA loss, SCDL as a plug-in, the ramp."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import nn

from scdlcore.nets.scdl import SCDLModule
from scdlcore.training.losses import GACELoss, GADiceLoss

__all__ = ["Batch", "SSLBase", "sigmoid_rampup"]


@dataclass
class Batch:
    """One training batch, labeled samples first.

    Attributes:
        images: (B, 1, D, H, W) float, the first ``labels.shape[0]`` samples labeled.
        labels: (B_l, D, H, W) int64 class indices of the labeled samples.
        valid: (B_l, D, H, W) bool, voxels whose label is known (partial reviews), or None (all known).
    """

    images: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor | None = None

    @property
    def num_labeled(self) -> int:
        return self.labels.shape[0]


def sigmoid_rampup(progress: float) -> float:
    """exp(-5 (1 - t/T)^2) for progress t/T in [0, 1] (Laine and Aila's ramp, used for the CPS weight)."""
    progress = min(max(progress, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - progress) ** 2)


class SSLBase(nn.Module, abc.ABC):
    """A semi-supervised base: networks, an optional SCDL module per network, and ``training_losses``.

    Subclasses define ``networks`` (an ``nn.ModuleList``) and :meth:`training_losses`; the trainer only
    sees this interface. ``inference_networks`` are the networks a bundle exports.

    Args:
        scdl: one SCDL module per trained network, or None for the base without SCDL.
        scdl_weight: lambda, the weight of SCDL's total loss.
        top_k: GACE's kept fraction on labeled voxels.
    """

    def __init__(self, scdl: list[SCDLModule] | None, scdl_weight: float = 0.1, top_k: float = 0.1) -> None:
        super().__init__()
        self.scdl = nn.ModuleList(scdl) if scdl else None
        self.scdl_weight = scdl_weight
        self.dice_loss = GADiceLoss()
        self.ce_loss = GACELoss(top_k=top_k)
        self.pseudo_ce_loss = GACELoss(top_k=1.0)

    def forward(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        """The training losses (``forward`` so that DistributedDataParallel can wrap the base)."""
        return self.training_losses(batch, progress)

    def inference_networks(self) -> list[nn.Module]:
        return list(self.networks)  # type: ignore[attr-defined]

    @abc.abstractmethod
    def training_losses(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        """Losses of one step; ``progress`` = step / total steps. Returns a dict whose "total" is minimised."""

    def after_optimizer_step(self, step: int) -> None:
        """Hook for bases that keep state outside the optimiser (Mean Teacher's EMA).

        ``step`` counts steps taken (1 after the first).
        """

    def supervised_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """GACE(top-k) + GADice on the labeled part of ``logits (B, C, D, H, W)``."""
        labeled = logits[: batch.num_labeled]
        return self.ce_loss(labeled, batch.labels, batch.valid) + self.dice_loss(labeled, batch.labels, batch.valid)

    def scdl_loss(self, index: int, feat: torch.Tensor, batch: Batch, progress: float, losses: dict) -> torch.Tensor:
        """lambda * SCDL total for network ``index``; adds its parts to ``losses`` for logging (0 without SCDL)."""
        if self.scdl is None:
            return feat.new_zeros(())
        parts = self.scdl[index](feat, batch.labels, batch.valid, unlabeled_weight=sigmoid_rampup(progress))
        for name in ("proxy", "sac", "kl"):
            losses[f"scdl_{name}"] = losses.get(f"scdl_{name}", 0.0) + getattr(parts, name) / len(self.scdl)
        return self.scdl_weight * parts.total
