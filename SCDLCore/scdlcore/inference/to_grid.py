"""From model-grid probabilities back to the input grid, label-aware (step 4 of the predictor).

The class probabilities are interpolated trilinearly at every input voxel and the argmax is taken there,
a few input slices at a time and only inside the box holding the classes found; where the eight model
voxels around an input voxel agree, their class is the answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from scdlcore.classes import class_argmax

_SLAB_ELEMENTS = 1 << 24  # floats per interpolation slab (64 MB): bounds memory at input resolution


# Linear interpolation along one axis at many points: lower index, upper index, weight of the upper one.
_Corners = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def probs_to_grid(
    probs: torch.Tensor, index_map: tuple[np.ndarray, np.ndarray], lut: torch.Tensor, out: np.ndarray
) -> None:
    """Fill ``out`` (the input-grid crop, (D, H, W)) with ``lut[argmax]`` of trilinearly interpolated ``probs``.

    Only the classes that win somewhere on the model grid take part, and only input voxels inside the
    box of the model grid's foreground (plus one voxel) are computed; the rest stays background.
    An input voxel whose eight surrounding model voxels share one winning class takes that class
    directly: a convex mix of probability vectors that all peak at class c peaks at c too, so this is
    exact, and only voxels near organ borders pay for the interpolation.
    """
    classes = class_argmax(probs)
    present = torch.unique(classes)
    if bool((lut[present] == 0).all()):
        return  # nothing (kept) was found
    axes = _foreground_axes(lut[classes] > 0, index_map, out.shape)
    if axes is None:
        return
    (z_out, z), (y_out, y), (x_out, x) = axes
    cell_values = _uniform_cell_values(classes, lut)
    values = lut[present]
    table = None  # voxel-major (D*H*W, C') copy, made when scattered border voxels first need it
    rows, cols = y_out.stop - y_out.start, x_out.stop - x_out.start
    step = max(1, _SLAB_ELEMENTS // (len(present) * rows * cols))
    dtype = torch.uint8 if out.dtype == np.uint8 else torch.int32
    for first in range(0, len(z[0]), step):
        z_slab = tuple(t[first : first + step] for t in z)
        labels = cell_values[z_slab[0]][:, y[0]][:, :, x[0]]  # (n, H', W'), -1 where the corners disagree
        mixed = labels < 0
        count = int(mixed.sum())
        if 3 * count > mixed.numel():  # mostly borders (a noisy model): interpolating all of it is cheaper
            labels = values[class_argmax(_interpolate_slab(probs, present, z_slab, y, x))]
        elif count:
            if table is None:  # gathering whole probability vectors per voxel needs them contiguous
                table = probs.flatten(1).T.index_select(1, present)
            at = torch.nonzero(mixed, as_tuple=True)
            points = [tuple(t[i] for t in axis) for axis, i in zip((z_slab, y, x), at)]
            labels[at] = values[_interpolate_points(table, probs.shape[1:], *points).argmax(1)]
        z_start = z_out.start + first
        out[z_start : z_start + labels.shape[0], y_out, x_out] = labels.to(dtype).cpu().numpy()


def _foreground_axes(
    foreground: torch.Tensor, index_map: tuple[np.ndarray, np.ndarray], out_shape: Sequence[int]
) -> list[tuple[slice, _Corners]] | None:
    """Per axis (z, y, x): the input indices whose model-grid coordinate lies within one model voxel of the
    ``foreground`` (D, H, W) box, and their interpolation corners; None when no input voxel does.

    Beyond the model grid's ends the coordinates clamp to its edge voxels, so foreground on an edge
    reaches the input's end.
    """
    scale, offset = index_map
    axes = []
    for axis, size in enumerate(foreground.shape):
        hits = torch.nonzero(_any_except(foreground, axis))[:, 0]
        low, high = int(hits.min()) - 1, int(hits.max()) + 1
        start = 0 if low < 0 else max(0, math.ceil((low - offset[axis]) / scale[axis]))
        stop = (
            out_shape[axis]
            if high >= size
            else min(out_shape[axis], math.floor((high - offset[axis]) / scale[axis]) + 1)
        )
        if start >= stop:
            return None
        coords = offset[axis] + scale[axis] * np.arange(start, stop)
        axes.append((slice(start, stop), _linear_weights(coords, size, foreground.device)))
    return axes


def _uniform_cell_values(classes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per model voxel (i, j, k): ``lut`` of the class shared by the corners (i..i+1, j..j+1, k..k+1), clamped
    at the far edges, or -1 where they differ. (D, H, W) int32."""
    low, high = classes.clone(), classes.clone()
    for axis, size in enumerate(classes.shape):
        after = torch.arange(1, size + 1, device=classes.device).clamp_max(size - 1)
        low = torch.minimum(low, low.index_select(axis, after))
        high = torch.maximum(high, high.index_select(axis, after))
    return torch.where(low == high, lut[low], -1)


def _interpolate_slab(
    probs: torch.Tensor, classes: torch.Tensor, z: _Corners, y: _Corners, x: _Corners
) -> torch.Tensor:
    """``probs`` (C, D, H, W) of ``classes`` (C',) interpolated on the grid of points z x y x x -> (C', n, H', W').

    Along z, then y, then x, like :func:`_interpolate_points`: the two give bit-identical probabilities.
    """
    rows = classes[:, None]
    slab = torch.lerp(probs[rows, z[0]], probs[rows, z[1]], z[2][:, None, None])  # (C', n, H, W)
    slab = torch.lerp(slab[:, :, y[0]], slab[:, :, y[1]], y[2][:, None])  # (C', n, H', W)
    return torch.lerp(slab[..., x[0]], slab[..., x[1]], x[2])


def _interpolate_points(
    table: torch.Tensor, grid: Sequence[int], z: _Corners, y: _Corners, x: _Corners
) -> torch.Tensor:
    """Probability vectors interpolated at M scattered points -> (M, C).

    Each of ``z``, ``y``, ``x`` holds (M,) tensors.

    Args:
        table: (D*H*W, C) vectors of the model grid ``grid`` = (D, H, W), in its raveled order.
    """
    plane, row = grid[1] * grid[2], grid[2]
    below, above = z[0] * plane, z[1] * plane

    def along_z(y_index: torch.Tensor, x_index: torch.Tensor) -> torch.Tensor:
        offset = y_index * row + x_index
        return torch.lerp(table[below + offset], table[above + offset], z[2][:, None])

    along_y_low = torch.lerp(along_z(y[0], x[0]), along_z(y[1], x[0]), y[2][:, None])
    along_y_high = torch.lerp(along_z(y[0], x[1]), along_z(y[1], x[1]), y[2][:, None])
    return torch.lerp(along_y_low, along_y_high, x[2][:, None])


def _any_except(mask: torch.Tensor, axis: int) -> torch.Tensor:
    """``mask.any()`` over every axis but ``axis`` -> 1D."""
    return mask.movedim(axis, 0).flatten(1).any(1)


def _linear_weights(coords: np.ndarray, size: int, device: torch.device) -> _Corners:
    """Lower/upper source indices and upper weights of linear interpolation at ``coords`` (clamped)."""
    coords = np.clip(coords, 0, size - 1)
    lower = np.floor(coords).astype(np.int64)
    upper = np.minimum(lower + 1, size - 1)
    return (
        torch.from_numpy(lower).to(device),
        torch.from_numpy(upper).to(device),
        torch.from_numpy((coords - lower).astype(np.float32)).to(device),
    )
