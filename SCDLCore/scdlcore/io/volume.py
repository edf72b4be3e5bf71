"""A CT or label map with its exact geometry (:class:`Volume`), the geometry conventions, resampling.

The package :mod:`scdlcore.io` is the only one that imports SimpleITK (lazily, inside functions); this
module is the one place where geometry conventions live:

- arrays are (D, H, W) = (z, y, x), as SimpleITK and Slicer return them;
- ``spacing`` is (x, y, z) in mm, ``origin`` is the centre of the first voxel in LPS mm, and
  ``direction`` is the 3x3 direction-cosine matrix (row-major, 9 floats) in ITK's LPS convention;
- ``ijk_to_lps`` maps a voxel index (i, j, k) = (x, y, z) to LPS mm (DICOM, ITK); ``ijk_to_ras`` maps it
  to RAS mm (Slicer, NIfTI), RAS = diag(-1, -1, 1) * LPS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk


__all__ = [
    "LPS_TO_RAS_44",
    "ImageError",
    "NotCTWarning",
    "Volume",
    "resample_label_to",
    "resample_onto",
    "resample_volume",
]


#: LPS <-> RAS flip of a 4x4 affine (its own inverse).
LPS_TO_RAS_44 = np.diag([-1.0, -1.0, 1.0, 1.0])


_DIRECTION_SNAP = 1e-12  # ITK's NRRD reader leaves cosines like 0.9999999999999999


class ImageError(ValueError):
    """Bad input image or label file; the message names the file and the problem."""


class NotCTWarning(UserWarning):
    """The image's intensities do not look like CT Hounsfield units."""


@dataclass(eq=False)  # arrays have no single truth value; compare geometry with same_grid
class Volume:
    """A 3D image or label map with its physical geometry.

    Attributes:
        array: voxels, (D, H, W) = (z, y, x). float32 HU for CT, uint8/uint16 for label maps.
        spacing: voxel size (x, y, z) in mm.
        origin: LPS position (mm) of the centre of the first voxel.
        direction: 3x3 direction cosines, row-major (9 floats), ITK/LPS convention; column ``n`` is
            the LPS direction of voxel axis ``n`` (x, y, z).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D (D, H, W), got shape {self.array.shape}.")
        self.spacing = _float_tuple(self.spacing, 3, "spacing")
        self.origin = _float_tuple(self.origin, 3, "origin")
        self.direction = _float_tuple(self.direction, 9, "direction")
        if min(self.spacing) <= 0:
            raise ValueError(f"Volume spacing must be positive (x, y, z) mm, got {self.spacing}.")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (D, H, W)."""
        return self.array.shape  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in array order (z, y, x), mm."""
        return self.spacing[::-1]

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 affine from voxel index (i, j, k) = (x, y, z) to LPS mm."""
        affine = np.eye(4)
        affine[:3, :3] = np.array(self.direction).reshape(3, 3) @ np.diag(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 affine from voxel index (i, j, k) = (x, y, z) to RAS mm (Slicer's frame)."""
        return LPS_TO_RAS_44 @ self.ijk_to_lps

    def same_grid(self, other: Volume, tol: float = 1e-4) -> bool:
        """Whether both volumes sample the same voxel grid.

        Args:
            other: the volume to compare with.
            tol: tolerance, relative to the voxel size for spacing and origin, absolute for the
                direction cosines.
        """
        return not grid_differences(self, other, tol)

    def describe_grid(self) -> str:
        """The grid for messages: size (x, y, z) in voxels, spacing, origin, direction."""
        return (
            f"size {_xyz(self.shape[::-1])} voxels, spacing {_xyz(self.spacing)} mm, "
            f"origin {_xyz(self.origin)} mm (LPS), direction {_xyz(self.direction)}"
        )

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume with the same geometry and a new array of the same shape."""
        if array.shape != self.shape:
            raise ValueError(f"with_array needs an array of shape {self.shape}, got {array.shape}.")
        return Volume(array, self.spacing, self.origin, self.direction)


def resample_label_to(label: Volume, reference: Volume) -> Volume:
    """Resample a label map onto ``reference``'s grid by physical (LPS) position, nearest neighbour.

    Voxels of the reference grid outside the label map become background (0). Use it when a label
    map and its image share physical space but not the voxel grid (a flipped axis, a cropped
    segmentation).

    Returns:
        The label map on the reference grid, same dtype as ``label.array``, shape ``reference.shape``.
    """
    return resample_onto(label, reference, is_label=True)


def resample_onto(volume: Volume, reference: Volume, *, is_label: bool) -> Volume:
    """``volume`` resampled by physical position onto exactly ``reference``'s grid (shape, spacing, origin, direction).

    Nearest neighbour and the input dtype for labels (voxels outside become 0), linear float32 for images.
    """
    return resample_volume(
        volume,
        shape=reference.shape,
        spacing=reference.spacing,
        origin=reference.origin,
        direction=reference.direction,
        is_label=is_label,
    )


def resample_volume(
    volume: Volume,
    *,
    shape: Sequence[int],
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    is_label: bool,
) -> Volume:
    """Resample a volume onto any grid by physical position.

    Args:
        volume: the input volume.
        shape: output array shape (D, H, W).
        spacing: output voxel size (x, y, z) mm.
        origin: output first-voxel centre, LPS mm.
        direction: output direction cosines, row-major 3x3.
        is_label: nearest neighbour, dtype kept, background 0 outside the input (labels); otherwise
            linear, float32, the input's minimum outside it (air for CT).

    Returns:
        The resampled volume with exactly the requested geometry.
    """
    import SimpleITK as sitk

    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in shape[::-1]])
    resampler.SetOutputSpacing([float(s) for s in spacing])
    resampler.SetOutputOrigin([float(o) for o in origin])
    resampler.SetOutputDirection([float(d) for d in direction])
    if is_label:
        resampler.SetInterpolator(sitk.sitkNearestNeighbor)
        resampler.SetDefaultPixelValue(0)
        source = to_sitk(volume)
    else:
        resampler.SetInterpolator(sitk.sitkLinear)
        resampler.SetDefaultPixelValue(float(volume.array.min()))
        source = to_sitk(volume.with_array(volume.array.astype(np.float32, copy=False)))
    array = sitk.GetArrayFromImage(resampler.Execute(source))
    return Volume(array, tuple(spacing), tuple(origin), tuple(direction))  # type: ignore[arg-type]


def clean_direction(image: sitk.Image) -> sitk.Image:
    """Snap direction cosines within 1e-12 of -1, 0 or 1 (reader round-off), so that write -> read is exact."""
    direction = np.array(image.GetDirection())
    snapped = np.round(direction)
    image.SetDirection(tuple(np.where(np.abs(direction - snapped) < _DIRECTION_SNAP, snapped, direction)))
    return image


def grid_differences(volume: Volume, other: Volume, tol: float) -> list[str]:
    """Human-readable differences between two grids (empty if they match)."""
    differences = []
    if volume.shape != other.shape:
        differences.append(f"size {_xyz(volume.shape[::-1])} vs {_xyz(other.shape[::-1])} voxels")
    voxel = min(min(volume.spacing), min(other.spacing))
    if not np.allclose(volume.spacing, other.spacing, rtol=tol, atol=0):
        differences.append(f"spacing {_xyz(volume.spacing)} vs {_xyz(other.spacing)} mm")
    if not np.allclose(volume.origin, other.origin, rtol=0, atol=tol * voxel):
        differences.append(f"origin {_xyz(volume.origin)} vs {_xyz(other.origin)} mm (LPS)")
    if not np.allclose(volume.direction, other.direction, rtol=0, atol=tol):
        differences.append(f"direction {_xyz(volume.direction)} vs {_xyz(other.direction)}")
    return differences


def _xyz(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def volume_from_sitk(image: sitk.Image, array: np.ndarray) -> Volume:
    return Volume(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def to_sitk(volume: Volume) -> sitk.Image:
    import SimpleITK as sitk

    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def _float_tuple(values: Sequence[float], length: int, what: str) -> tuple[float, ...]:
    result = tuple(float(v) for v in values)
    if len(result) != length:
        raise ValueError(f"Volume {what} must have {length} values, got {len(result)}: {result}.")
    return result
