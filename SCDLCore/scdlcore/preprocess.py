"""Preprocessing of CT volumes: HU window, resampling to a working spacing, body crop.

Arrays are (D, H, W) = (z, y, x); ``spacing`` is (x, y, z) mm (see :mod:`scdlcore.io`). Resampling
goes through :func:`scdlcore.io.resample_volume`, so all geometry handling stays in one module.

Example::

    ct = read_image("case01.nii.gz")                                  # 0.7 x 0.7 x 2.5 mm
    work = resample_to_spacing(ct, (1.5, 1.5, 1.5), is_label=False)   # network input grid
    x = hu_window(work.array)                                         # float32 in [0, 1]
    labels = resample_onto(predicted, ct, is_label=True)              # back onto the input grid (scdlcore.io)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from scdlcore.io import Volume, resample_volume

__all__ = ["BODY_SEARCH_MM", "body_bbox", "crop", "hu_window", "resample_to_spacing"]

#: body_bbox looks for the body on voxels about this far apart (mm).
BODY_SEARCH_MM = 4.0


def hu_window(array: np.ndarray, window: tuple[float, float] = (-125.0, 275.0)) -> np.ndarray:
    """Clip Hounsfield units to a window and scale it linearly to [0, 1].

    Args:
        array: CT intensities in HU, any shape.
        window: (low, high) HU; ``low`` maps to 0 and ``high`` to 1. The default (-125, 275) is the
            abdominal soft-tissue window: fat at -100 HU gives 0.0625, liver at 60 HU 0.4625.

    Returns:
        float32 array of the input's shape, values in [0, 1].

    Raises:
        ValueError: ``low >= high``.
    """
    low, high = (float(v) for v in window)
    if not low < high:
        raise ValueError(f"hu_window needs low < high HU, got window={window}.")
    scaled = (np.asarray(array, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def resample_to_spacing(volume: Volume, spacing: Sequence[float], *, is_label: bool) -> Volume:
    """Resample to a new voxel size, covering the same physical extent.

    The output grid keeps the direction and the outer corner of the first voxel; each axis gets
    ``round(size * old_spacing / new_spacing)`` voxels (at least 1). Because ``origin`` is the centre
    of the first voxel, it moves by half the spacing change along each axis.

    Args:
        volume: the input volume.
        spacing: output voxel size (x, y, z) mm.
        is_label: nearest neighbour for label maps (dtype kept), linear for images (float32).

    Returns:
        The resampled volume, or ``volume`` itself if it already has this spacing.

    Raises:
        ValueError: a spacing that is not three positive numbers.
    """
    new_spacing = tuple(float(s) for s in spacing)
    if len(new_spacing) != 3 or min(new_spacing) <= 0 or not all(map(math.isfinite, new_spacing)):
        raise ValueError(f"spacing must be three positive (x, y, z) mm values, got {tuple(spacing)}.")
    if new_spacing == volume.spacing:
        return volume
    old = np.array(volume.spacing)
    new = np.array(new_spacing)
    size_xyz = [max(1, round(n * o / s)) for n, o, s in zip(volume.shape[::-1], old, new)]
    direction = np.array(volume.direction).reshape(3, 3)
    origin = np.array(volume.origin) + direction @ ((new - old) / 2)
    return resample_volume(
        volume,
        shape=size_xyz[::-1],
        spacing=new_spacing,
        origin=tuple(origin),
        direction=volume.direction,
        is_label=is_label,
    )


def crop(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    """The sub-volume ``volume.array[box]`` (a view), its origin moved to the centre of its first voxel.

    Args:
        volume: any volume. box: slices in array order (z, y, x), as :func:`body_bbox` returns.
    """
    start_xyz = [axis.start or 0 for axis in reversed(box)]
    origin = volume.ijk_to_lps @ np.array([*start_xyz, 1.0])
    return Volume(volume.array[box], volume.spacing, tuple(origin[:3]), volume.direction)


def body_bbox(
    image: Volume, threshold_hu: float = -500.0, margin_mm: float = 10.0
) -> tuple[slice, slice, slice]:
    """Bounding box of the body: the largest connected region above ``threshold_hu``, plus a margin.

    The largest component leaves out the scanner table, clothes and noise when they do not touch the
    body. It is searched on blocks of about ``BODY_SEARCH_MM`` (a block counts when all its voxels are
    above the threshold, so gaps between body and table stay open; the full grid when no block counts):
    labelling a 512x512x300 CT voxel by voxel takes seconds, and the box needs only the margin's accuracy.
    The box may therefore reach up to ``BODY_SEARCH_MM`` further than the margin, and may leave out body
    parts thinner than a block (beyond the margin).

    Args:
        image: CT in HU, (D, H, W).
        threshold_hu: voxels above it are body (air is about -1000 HU, fat -100 HU).
        margin_mm: added on each side, clipped to the image.

    Returns:
        Slices in array order (z, y, x), usable as ``image.array[bbox]``.

    Raises:
        ValueError: no voxel above the threshold.
    """
    steps = [max(1, int(BODY_SEARCH_MM // s)) for s in image.spacing_zyx]
    box = _largest_component_box(_all_above(image.array, steps, threshold_hu))
    if box is None:
        steps = [1, 1, 1]
        box = _largest_component_box(image.array > threshold_hu)
    if box is None:
        raise ValueError(
            f"No voxel above {threshold_hu:g} HU: the image holds no body. Is it a CT in Hounsfield units?"
        )
    margins = [math.ceil(margin_mm / s) for s in image.spacing_zyx]
    # The body can reach into the partly-body block beside the outermost whole-body block (none when step = 1).
    return tuple(  # type: ignore[return-value]
        slice(max(0, (axis.start - (step > 1)) * step - m), min(n, (axis.stop + (step > 1)) * step + m))
        for axis, step, m, n in zip(box, steps, margins, image.shape)
    )


def _all_above(array: np.ndarray, steps: list[int], threshold: float) -> np.ndarray:
    """Per block of ``steps`` voxels (z, y, x): are all its voxels above ``threshold``? (Partial edge blocks dropped.)

    One block axis at a time, slices first: each pass then takes the minimum of whole rows at once, which is
    faster than one reduction over the three scattered block axes.
    """
    counts = [n // step for n, step in zip(array.shape, steps)]
    blocks = array[: counts[0] * steps[0], : counts[1] * steps[1], : counts[2] * steps[2]]
    blocks = blocks.reshape(counts[0], steps[0], counts[1], steps[1], counts[2], steps[2])
    lowest = np.minimum.reduce(blocks, axis=1)  # over a block's slices -> (z, y, step y, x, step x)
    lowest = np.minimum.reduce(lowest, axis=2)  # over its rows -> (z, y, x, step x)
    return (lowest > threshold).all(axis=3)


def _largest_component_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box (in ``mask``'s indices) of its largest connected component; None for an empty mask."""
    components, count = ndimage.label(mask)
    if count == 0:
        return None
    largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    return ndimage.find_objects(components)[largest - 1]
