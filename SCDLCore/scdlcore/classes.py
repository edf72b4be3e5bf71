"""Per-voxel class decisions from class scores, fast on the CPU as well as on the GPU."""

from __future__ import annotations

import torch

__all__ = ["class_argmax"]


def class_argmax(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``scores.argmax(dim)`` (first maximum wins) as int64, by one pass per class.

    torch's strided reduction over a class axis that is not the last one is slow on the CPU; the passes are
    plain elementwise work (Testing/Benchmarks/results/train_step_cpu.md measures the training step with them).

    Args:
        scores: class scores (logits or probabilities), classes along ``dim``, e.g. (B, C, D, H, W) with ``dim=1``.
        dim: the class axis.

    Returns:
        The class indices, ``scores.shape`` without ``dim``.
    """
    scores = scores.movedim(dim, 0)
    best = scores[0].clone()
    index = torch.zeros(scores.shape[1:], dtype=torch.int64, device=scores.device)
    for c in range(1, scores.shape[0]):
        better = scores[c] > best
        best = torch.maximum(best, scores[c], out=best)
        index.masked_fill_(better, c)
    return index
