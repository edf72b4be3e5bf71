"""Class-imbalance aware segmentation losses: GADice and GACE (GALoss, ECCV 2024; SCDLCore/docs/METHOD.md section 2).

Both take raw ``logits (B, C, D, H, W)`` and integer ``labels (B, D, H, W)``; an optional boolean
``valid (B, D, H, W)`` marks the voxels whose label is known (partially reviewed cases: the
others take no part in the loss). Everything is vectorised over voxels; only small per-class
reductions remain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GADiceLoss", "GACELoss"]


class GADiceLoss(nn.Module):
    """Soft Dice with a gradient-aware penalty for classes absent from a sample.

    For every sample and class present in its target: ``1 - (2 sum p t + eps) / (sum p^2 + sum t^2 + eps)``.
    For a class absent from the sample: ``sum_v (p_v / N).detach() * p_v`` with N the sample's (valid) voxels,
    which pushes down the predicted probability of that class in proportion to its mass. The loss is the mean
    over samples and classes, background included.

    Args:
        eps: smoothing term of the Dice ratio.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Args: logits (B, C, D, H, W); labels (B, D, H, W) int; valid (B, D, H, W) bool or None. Returns a scalar."""
        num_classes = logits.shape[1]
        probs = torch.softmax(logits.float(), dim=1).flatten(2)  # (B, C, V)
        onehot = F.one_hot(labels.long().flatten(1), num_classes).transpose(1, 2).float()  # (B, C, V)
        if valid is not None:
            mask = valid.flatten(1).unsqueeze(1).float()
            probs, onehot = probs * mask, onehot * mask
            voxels = mask.sum(dim=2).clamp_min(1.0)  # (B, 1)
        else:
            voxels = torch.full((probs.shape[0], 1), float(probs.shape[2]), device=probs.device)
        intersection = (probs * onehot).sum(dim=2)
        present = onehot.sum(dim=2) > 0  # (B, C)
        dice = 1.0 - (2.0 * intersection + self.eps) / ((probs**2).sum(dim=2) + onehot.sum(dim=2) + self.eps)
        absent_penalty = ((probs / voxels.unsqueeze(2)).detach() * probs).sum(dim=2)
        return torch.where(present, dice, absent_penalty).mean()


class GACELoss(nn.Module):
    """Top-k cross-entropy, balanced between classes.

    Voxel CE is computed, the ``top_k`` fraction hardest voxels (K of them) are kept, and the loss is
    ``sum_i CE_i / (n_i^(1 - gamma) * K^gamma)`` where ``CE_i`` sums the kept voxels of class i and ``n_i``
    counts them. ``gamma=1`` gives plain top-k mean CE; ``gamma=0`` a per-class mean, summed over classes.

    Args:
        top_k: fraction of voxels kept, in (0, 1] (0.1 supervised, 1.0 for pseudo-labels in CPS).
        gamma: balance exponent in [0, 1].
    """

    def __init__(self, top_k: float = 0.1, gamma: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < top_k <= 1.0:
            raise ValueError(f"top_k must be in (0, 1], got {top_k}.")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
        self.top_k, self.gamma = top_k, gamma

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Args: logits (B, C, D, H, W); labels (B, D, H, W) int; valid (B, D, H, W) bool or None. Returns a scalar."""
        num_classes = logits.shape[1]
        ce = F.cross_entropy(logits.float(), labels.long(), reduction="none").flatten()
        classes = labels.long().flatten()
        if valid is not None:
            keep = valid.flatten()
            ce, classes = ce[keep], classes[keep]
        if ce.numel() == 0:
            return logits.sum() * 0.0
        k = max(1, int(round(self.top_k * ce.numel())))
        if k < ce.numel():
            ce, index = torch.topk(ce, k, sorted=False)
            classes = classes[index]
        per_class = torch.zeros(num_classes, device=ce.device).index_add_(0, classes, ce)
        counts = torch.bincount(classes, minlength=num_classes).float().clamp_min(1.0)
        return (per_class / (counts ** (1.0 - self.gamma) * float(k) ** self.gamma)).sum()
