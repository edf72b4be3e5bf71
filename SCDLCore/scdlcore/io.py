"""CT and label-map reading and writing with exact geometry.

This is the only module that imports SimpleITK (lazily, inside functions), and the one place where
geometry conventions live:

- arrays are (D, H, W) = (z, y, x), as SimpleITK and Slicer return them;
- ``spacing`` is (x, y, z) in mm, ``origin`` is the centre of the first voxel in LPS mm, and
  ``direction`` is the 3x3 direction-cosine matrix (row-major, 9 floats) in ITK's LPS convention;
- ``ijk_to_lps`` maps a voxel index (i, j, k) = (x, y, z) to LPS mm (DICOM, ITK); ``ijk_to_ras`` maps it
  to RAS mm (Slicer, NIfTI), RAS = diag(-1, -1, 1) * LPS.

Readers check their input and raise :class:`ImageError` with a message that names the file, the
problem and what to do. Writers are atomic: they write a temporary file in the destination folder and
move it into place, so a crash never leaves a half-written file under the final name.

Example::

    ct = read_image("case01.nii.gz")                 # float32 HU, (D, H, W)
    labels = read_label("case01_labels.nii.gz", reference=ct)
    write_label("case01.seg.nrrd", labels, SYNAPSE13)  # opens in 3D Slicer with names and colors
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scdlcore._atomic import atomic_write
from scdlcore.labels import SYNAPSE13, Label, LabelTable, value_counts

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = [
    "LPS_TO_RAS_44",
    "ImageError",
    "NotCTWarning",
    "WRITE_SUFFIXES",
    "Volume",
    "case_name",
    "check_label_output",
    "check_writable_folder",
    "files_by_case",
    "match_by_case",
    "not_ct_reason",
    "is_dicom_folder",
    "read_image",
    "read_label",
    "read_label_map",
    "read_segmentation_labels",
    "resample_label_to",
    "resample_onto",
    "resample_volume",
    "write_image",
    "write_label",
]

logger = logging.getLogger(__name__)

#: LPS <-> RAS flip of a 4x4 affine (its own inverse).
LPS_TO_RAS_44 = np.diag([-1.0, -1.0, 1.0, 1.0])

_READ_FORMATS = "NRRD (.nrrd), NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd) or a DICOM series folder"
#: File types the writers take; ``.seg.nrrd`` (3D Slicer segmentation) for label maps only.
WRITE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
_FILE_SUFFIXES = (*WRITE_SUFFIXES, ".mhd")  # longest first where one ends another (.seg.nrrd, .nrrd)
_NNUNET_CHANNEL = "_0000"  # nnU-Net names the (only) CT channel of case X "X_0000"
_MIN_CT_HU = -500.0  # every CT with air in view has voxels far below this; MR and normalised images do not
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
        return not _grid_differences(self, other, tol)

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


def case_name(path: str | os.PathLike) -> str:
    """An image's name without its suffix: ``ct_001.nii.gz`` -> ``ct_001``; a DICOM folder's own name."""
    path = Path(path)
    lower = path.name.lower()
    for suffix in _FILE_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return path.name


def is_dicom_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` itself holds a DICOM image series (its subfolders are not searched)."""
    import SimpleITK as sitk

    return Path(folder).is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def files_by_case(folder: str | os.PathLike, *, cts: bool = False) -> dict[str, Path]:
    """The image and label-map files of a folder by :func:`case_name`, sorted by name.

    Args:
        folder: the folder; hidden files and other file types are left out.
        cts: list the CTs only: the image files but not the ``.seg.nrrd`` segmentations, and each
            subfolder as one DICOM series.

    Raises:
        ImageError: not a folder, or two entries with one case name (``case01.nii.gz`` and ``case01.nrrd``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: no such folder.")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        lower = path.name.lower()
        wanted_file = lower.endswith(_FILE_SUFFIXES) and not (cts and lower.endswith(".seg.nrrd"))
        if path.name.startswith(".") or not ((path.is_file() and wanted_file) or (cts and path.is_dir())):
            continue
        name = case_name(path)
        if name in found:
            raise ImageError(f"{folder}: {found[name].name} and {path.name} are both case {name!r}; keep one.")
        found[name] = path
    return found


def match_by_case(firsts: Mapping[str, Path], seconds: Mapping[str, Path]) -> dict[str, str | None]:
    """For each case name of ``firsts`` (as :func:`files_by_case` lists them), the case name of ``seconds`` that
    belongs to it: the same name or, for nnU-Net's channel names (``case01_0000``), the name without
    ``_0000``; None when there is none."""
    return {name: next((n for n in (name, name.removesuffix(_NNUNET_CHANNEL)) if n in seconds), None) for name in firsts}


def read_image(path: str | os.PathLike) -> Volume:
    """Read a CT volume as float32 Hounsfield units.

    Args:
        path: an image file (.nrrd, .nii, .nii.gz, .mha, .mhd) or a folder holding a DICOM series.
            In a folder with several series, the CT series with the most slices is read and a warning
            is logged naming the others.

    Returns:
        The volume; ``array`` is float32 (D, H, W). DICOM rescale slope/intercept are applied.

    Raises:
        ImageError: missing, empty, truncated or unreadable file; 2D, 4D or multi-component image;
            NaN or infinite voxels; a folder without DICOM images.

    Warns:
        NotCTWarning: no voxel below -500 HU (normalised intensities, MR, ...).
    """
    import SimpleITK as sitk

    path = Path(path)
    image = _read_scalar_3d(path)
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise _nonfinite_error(path, bad)
    reason = not_ct_reason(array, str(path))
    if reason:
        warnings.warn(f"{reason} Segmentation of non-CT images is unreliable.", NotCTWarning, stacklevel=2)
    return _volume(image, array)


def not_ct_reason(array: np.ndarray, name: str) -> str | None:
    """Why an image (finite voxels) does not look like a CT in HU, in one sentence naming it; None if it does.

    Every CT with air in view has voxels far below -500 HU; MR and normalised images have none.
    """
    low, high = float(array.min()), float(array.max())
    if low <= _MIN_CT_HU:
        return None
    return (f"{name}: intensities range from {low:g} to {high:g}, with no voxel below {_MIN_CT_HU:g} HU; this does "
            "not look like a CT in Hounsfield units (air is about -1000 HU).")


def read_label(path: str | os.PathLike, reference: Volume | None = None) -> Volume:
    """Read an integer label map.

    Args:
        path: a label-map file (.nrrd, .nii, .nii.gz, .mha, .mhd). Values are kept as they are in the
            file; use :func:`scdlcore.labels.map_label_values` to convert between label tables.
        reference: the image the labels belong to. When given, the label map must lie on its grid.

    Returns:
        The label map; ``array`` is uint8 (D, H, W), or uint16 when a value exceeds 255.

    Raises:
        ImageError: the reasons of :func:`read_image`; negative, non-integer or too large values; a
            grid that differs from ``reference`` (the message lists size/spacing/origin/direction).
    """
    import SimpleITK as sitk

    path = Path(path)
    image = _read_scalar_3d(path)
    labels = _to_label_array(sitk.GetArrayFromImage(image), path)
    volume = _volume(image, labels)
    if reference is not None:
        differences = _grid_differences(volume, reference, 1e-4)
        if differences:
            raise ImageError(
                f"{path}: the label map is not on the grid of its image ({'; '.join(differences)}). "
                "Pair it with the image it was drawn on, or resample it onto the image with "
                "scdlcore.io.resample_label_to."
            )
    return volume


def read_segmentation_labels(path: str | os.PathLike, table: LabelTable) -> Volume:
    """Read a 3D Slicer segmentation (``.seg.nrrd``) into a label map with ``table``'s values.

    Segments are matched to organs by the SNOMED code of their terminology type, then by name
    (``"Right kidney"``, ``"kidney_right"``, ``"kidney right"`` all match, case-insensitive).
    Overlapping segments (several layers) are merged, later segments winning.

    Args:
        path: the ``.seg.nrrd`` file. Its grid is the segmentation's own, which Slicer may crop; use
            :func:`resample_label_to` to bring it onto an image.
        table: the label table whose values the output uses.

    Returns:
        The label map, uint8 (D, H, W) (uint16 when a table value exceeds 255).

    Raises:
        ImageError: unreadable file, not a Slicer segmentation, or no segment matches the table.

    Warns:
        UserWarning: segments that match no organ of the table (they are left out).
    """
    import SimpleITK as sitk

    path = Path(path)
    image = _read_checked(path)
    fields = _segment_fields(image)
    if not fields:
        raise ImageError(
            f"{path}: not a 3D Slicer segmentation file (no Segment0_* header fields). "
            "Read plain label maps with scdlcore.io.read_label."
        )
    layers = sitk.GetArrayFromImage(image)
    if layers.ndim == 3:
        layers = layers[..., np.newaxis]  # (D, H, W, layers)
    dtype = np.uint8 if max(table.values) < 256 else np.uint16
    labels = np.zeros(layers.shape[:3], dtype=dtype)
    unmatched = []
    for index in sorted(fields):
        segment = fields[index]
        label = _match_segment(segment, table)
        if label is None:
            unmatched.append(segment.get("Name", f"Segment{index}"))
            continue
        layer = int(segment.get("Layer", index if layers.shape[3] > 1 else 0))
        labels[layers[..., layer] == int(segment.get("LabelValue", 1))] = label.value
    if len(unmatched) == len(fields):
        raise ImageError(
            f"{path}: none of its segments ({', '.join(unmatched)}) matches an organ of label table "
            f"{table.name!r} ({', '.join(table.names)}). Rename the segments or pick another table."
        )
    if unmatched:
        warnings.warn(
            f"{path}: segments {', '.join(unmatched)} match no organ of label table {table.name!r} "
            "and were left out.",
            stacklevel=2,
        )
    return _volume(image, labels)


def read_label_map(path: str | os.PathLike, table: LabelTable) -> Volume:
    """Read organ labels with ``table``'s values from a plain label map or a 3D Slicer segmentation.

    A ``.seg.nrrd`` file numbers its segments in the order they were made, so it is read with
    :func:`read_segmentation_labels` (organs matched by terminology and name); any other file with
    :func:`read_label`, its values taken as they are.

    Raises:
        ImageError: the reasons of those two readers.
    """
    if Path(path).name.lower().endswith(".seg.nrrd"):
        return read_segmentation_labels(path, table)
    return read_label(path)


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
        source = _to_sitk(volume)
    else:
        resampler.SetInterpolator(sitk.sitkLinear)
        resampler.SetDefaultPixelValue(float(volume.array.min()))
        source = _to_sitk(volume.with_array(volume.array.astype(np.float32, copy=False)))
    array = sitk.GetArrayFromImage(resampler.Execute(source))
    return Volume(array, tuple(spacing), tuple(origin), tuple(direction))  # type: ignore[arg-type]


def write_image(path: str | os.PathLike, volume: Volume) -> None:
    """Write a volume atomically (.nrrd, .nii.gz, .nii or .mha), keeping its geometry and dtype.

    NRRD and MetaImage store the geometry in double precision. NIfTI stores it in float32, so an
    oblique direction or a spacing like 0.7 mm comes back rounded to about 1e-7.

    Raises:
        ValueError: unsupported file extension.
    """
    path = Path(path)
    _check_write_suffix(path, allow_segmentation=False)
    _write_sitk(path, _to_sitk(volume))


def write_label(
    path: str | os.PathLike,
    labels: Volume,
    table: LabelTable | None = None,
    *,
    include_absent: bool = False,
) -> None:
    """Write a label map atomically: a plain map (.nii.gz, .nii, .nrrd, .mha) or a 3D Slicer segmentation.

    A ``.seg.nrrd`` file holds one segment per organ present in the map (or per organ of the table
    with ``include_absent``), each with its display name, color, label value and SNOMED terminology,
    so that Slicer (and ``slicerio``) show the organs by name.

    Args:
        path: output file.
        labels: integer label map, (D, H, W), values from ``table``.
        table: the label table of the values. Defaults to Synapse-13 for ``.seg.nrrd``; for plain
            maps, when given, the values are checked against it.
        include_absent: ``.seg.nrrd`` only; also list organs with no voxel (empty segments).

    Raises:
        ValueError: unsupported extension, non-integer array, or values missing from the table.
    """
    path = Path(path)
    suffix = _check_write_suffix(path, allow_segmentation=True)
    if not np.issubdtype(labels.array.dtype, np.integer):
        raise ValueError(f"{path}: a label map must hold integers, got dtype {labels.array.dtype}.")
    if table is None and suffix == ".seg.nrrd":
        table = SYNAPSE13
    present = [value for value in value_counts(labels.array) if value != 0]
    if table is not None:
        unknown = sorted(set(present) - set(table.values))
        if unknown:
            raise ValueError(
                f"{path}: label values {unknown} are not in label table {table.name!r} "
                f"(values {table.values}); convert them with scdlcore.labels.map_label_values first."
            )
    image = _to_sitk(labels)
    if table is not None and suffix == ".seg.nrrd":
        segments = [label for label in table.labels if include_absent or label.value in present]
        for key, value in _segmentation_header(segments, table, labels.shape).items():
            image.SetMetaData(key, value)
    _write_sitk(path, image)


def _write_sitk(path: Path, image: sitk.Image) -> None:
    """Write atomically; SimpleITK's RuntimeError (a folder that cannot be written, a full disk) becomes an
    OSError that names the file."""
    import SimpleITK as sitk

    try:
        atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))
    except RuntimeError as err:
        raise OSError(f"Could not write {path} ({_itk_reason(err)}); check that the folder is writable and the disk "
                      "has space.") from err


def _read_scalar_3d(path: Path) -> sitk.Image:
    """Read and check an image: 3D (at least 2 voxels along each axis), one component per voxel."""
    image = _read_checked(path)
    size = "x".join(str(n) for n in image.GetSize())
    if image.GetDimension() > 3:
        raise ImageError(
            f"{path}: the image is {image.GetDimension()}D (size {size}); SCDL needs one 3D CT volume. "
            "Extract a single time point or channel first."
        )
    if image.GetDimension() == 2 or min(image.GetSize()) < 2:
        raise ImageError(
            f"{path}: the image is 2D (size {size}); SCDL needs a 3D CT volume. "
            "For DICOM, give the folder of the series, not one slice."
        )
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise ImageError(
            f"{path}: the image has {components} components per voxel (color or vector image); "
            "SCDL needs a single-channel CT volume."
        )
    return image


def _read_checked(path: Path) -> sitk.Image:
    """Read an image file or DICOM folder, turning every failure into an ImageError."""
    import SimpleITK as sitk

    if not path.exists():
        raise ImageError(f"{path}: no such file or folder. Check the path.")
    if path.is_dir():
        return _read_dicom_folder(path)
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes). Copy or export the image again.")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ImageError(
            f"{path}: cannot be read as an image, the file may be truncated or damaged "
            f"({_itk_reason(err)}). Supported: {_READ_FORMATS}."
        ) from err
    return _clean_direction(image)


def _read_dicom_folder(folder: Path) -> sitk.Image:
    import SimpleITK as sitk

    series = {}
    for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
        series[series_id] = (files, _dicom_tag(files[0], "0008|0060"), _dicom_tag(files[0], "0008|103e"))
    if not series:
        raise ImageError(
            f"{folder}: no DICOM image series in this folder (subfolders are not searched). "
            "Give the folder that holds the DICOM slice files, or an image file."
        )
    # Largest CT series first; other modalities only when there is no CT at all.
    chosen = max(series, key=lambda uid: (series[uid][1] == "CT", len(series[uid][0])))
    if len(series) > 1:
        others = ", ".join(_describe_series(uid, *series[uid]) for uid in series if uid != chosen)
        logger.warning(
            "%s holds %d DICOM series; reading %s. Not read: %s.",
            folder,
            len(series),
            _describe_series(chosen, *series[chosen]),
            others,
        )
    files = series[chosen][0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's tags, read with its pixels
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise ImageError(f"{folder}: the DICOM series cannot be read ({_itk_reason(err)}).") from err
    _check_slice_positions(folder, files, reader)
    return _clean_direction(image)


def _check_slice_positions(folder: Path, files: Sequence[str], reader: sitk.ImageSeriesReader) -> None:
    """Raise ImageError when the slices ``reader`` read are not evenly spaced along the slice normal (a
    missing, damaged or repeated slice): ITK only warns and puts them on a wrong, evenly spaced grid."""
    tags = ("0020|0032", "0020|0037")  # Image Position, Image Orientation (Patient)
    try:
        positions = np.array([_dicom_numbers(reader.GetMetaData(index, tags[0])) for index in range(len(files))])
        cosines = _dicom_numbers(reader.GetMetaData(0, tags[1]))
    except (RuntimeError, ValueError):  # no positions (e.g. a secondary capture) or unreadable ones: nothing to check
        return
    if positions.shape != (len(files), 3) or cosines.shape != (6,) or len(files) < 3:
        return
    gaps = np.abs(np.diff(positions @ np.cross(cosines[:3], cosines[3:])))
    typical = float(np.median(gaps))
    if typical == 0:
        raise ImageError(f"{folder}: its {len(files)} slices lie at one position; it is not a volume (or every slice is "
                         "repeated). Copy or export the series again.")
    # A missing slice doubles a gap and a repeated one zeroes it; positions written with 2 decimals move it by ~2%.
    odd = np.flatnonzero(np.abs(gaps - typical) > 0.25 * typical)
    if odd.size:
        first = int(odd[0])
        raise ImageError(
            f"{folder}: the slices are not evenly spaced ({typical:g} mm apart, but {gaps[first]:g} mm between "
            f"{Path(files[first]).name} and {Path(files[first + 1]).name}): a slice is missing or repeated. "
            "Copy or export the whole series again."
        )


def _dicom_numbers(value: str) -> np.ndarray:
    return np.array([float(number) for number in value.split("\\")])


def _dicom_tag(file: str, tag: str) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def _describe_series(uid: str, files: Sequence[str], modality: str, description: str) -> str:
    return f"series {uid or '(no UID)'} ({modality or '?'}, {len(files)} files, {description or 'no description'!r})"


def _check_nifti_data(path: Path) -> None:
    """Raise ImageError if a NIfTI file holds less voxel data than its header declares, or NaN/infinite
    floats: ITK reads a truncated NIfTI without complaint (the missing voxels come back as zeros), and its
    NIfTI reader turns non-finite floats into zeros, so neither can be seen after reading.
    """
    compressed = path.name.lower().endswith(".gz")
    nonfinite = 0
    try:
        with (gzip.open if compressed else open)(path, "rb") as stream:
            header = stream.read(540)
            layout = _nifti_layout(header)
            if layout is None:
                return  # not NIfTI-1/2: let the reader report it
            expected, offset, float_dtype = layout
            if float_dtype is None and not compressed:
                actual = path.stat().st_size
            else:  # read to the end: gzip raises on a cut stream, the byte count shows a cut image
                scan, actual = _FloatScan(float_dtype, skip=offset - len(header)), len(header)
                scan.add(header[offset:])
                while chunk := stream.read(1 << 22):
                    scan.add(chunk)
                    actual += len(chunk)
                nonfinite = scan.nonfinite
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ImageError(
            f"{path}: the file is truncated or damaged ({err}). Copy or export the image again."
        ) from err
    if actual < expected:
        raise ImageError(
            f"{path}: the file is truncated ({actual} of {expected} bytes). Copy or export the image again."
        )
    if nonfinite:
        raise _nonfinite_error(path, nonfinite)


class _FloatScan:
    """Counts the NaN/infinite values of a float voxel stream fed in chunks (``dtype`` None: nothing to count)."""

    def __init__(self, dtype: np.dtype | None, skip: int) -> None:
        self.dtype, self.skip = dtype, max(skip, 0)  # bytes between the header read and the voxel data
        self.nonfinite, self._rest = 0, b""

    def add(self, chunk: bytes) -> None:
        if self.dtype is None or not chunk:
            return
        dropped = min(self.skip, len(chunk))
        self.skip -= dropped
        data = self._rest + chunk[dropped:]
        whole = len(data) - len(data) % self.dtype.itemsize
        self.nonfinite += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:whole], dtype=self.dtype))))
        self._rest = data[whole:]


def _nonfinite_error(path: Path, count: int) -> ImageError:
    return ImageError(
        f"{path}: {count} voxels are NaN or infinite; an image must hold finite values (a CT: Hounsfield units). "
        "Fix or re-export the image."
    )


def _nifti_layout(header: bytes) -> tuple[int, int, np.dtype | None] | None:
    """What a NIfTI-1 or NIfTI-2 header declares: (file size uncompressed, voxel data offset, the voxels' float
    dtype or None when they are integers); None if not NIfTI."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7:
        return None
    size = offset + int(np.prod([max(int(n), 1) for n in dims[1 : dims[0] + 1]])) * bitpix // 8
    floats = {16: "f4", 64: "f8"}.get(datatype)  # NIfTI DT_FLOAT32, DT_FLOAT64
    return size, offset, None if floats is None else np.dtype(endian + floats)


def _itk_reason(err: RuntimeError) -> str:
    """The informative last line of an ITK exception message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _clean_direction(image: sitk.Image) -> sitk.Image:
    """Snap direction cosines within 1e-12 of -1, 0 or 1 (reader round-off), so that write -> read is exact."""
    direction = np.array(image.GetDirection())
    snapped = np.round(direction)
    image.SetDirection(tuple(np.where(np.abs(direction - snapped) < _DIRECTION_SNAP, snapped, direction)))
    return image


def _to_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer label values as uint8 (uint16 when needed), or ImageError."""
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ImageError(
                f"{path}: a label map must hold whole numbers, but it has fractional, NaN or infinite values. "
                "Is this an image rather than a label map?"
            )
    low, high = array.min(), array.max()
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise ImageError(
            f"{path}: label values must be within 0..65535, got {low:g}..{high:g}. Is this an image rather "
            "than a label map?"
        )
    return array.astype(np.uint8 if high < 256 else np.uint16)


def _grid_differences(volume: Volume, other: Volume, tol: float) -> list[str]:
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


def _volume(image: sitk.Image, array: np.ndarray) -> Volume:
    return Volume(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def _to_sitk(volume: Volume) -> sitk.Image:
    import SimpleITK as sitk

    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def check_label_output(path: str | os.PathLike) -> Path:
    """Check, before any work, that a label map can be written to ``path``: a known file type, and the
    nearest existing folder above it writable (missing folders are created on write).

    Raises:
        ValueError: an unsupported file type, or a file where a folder is needed.
        PermissionError: the folder cannot be written.
    """
    path = Path(path)
    _check_write_suffix(path, allow_segmentation=True)
    check_writable_folder(path.parent)
    return path


def check_writable_folder(folder: str | os.PathLike) -> None:
    """The folder (or, if missing, the nearest existing folder above it) can be written.

    Raises:
        ValueError: a file stands where the folder should be.
        PermissionError: it cannot be written.
    """
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"Cannot write into {folder}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write into {existing}: permission denied; choose another output folder.")


def _check_write_suffix(path: Path, *, allow_segmentation: bool) -> str:
    suffixes = WRITE_SUFFIXES if allow_segmentation else WRITE_SUFFIXES[1:]
    name = path.name.lower()
    for suffix in suffixes:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: cannot write this file type; use one of {', '.join(suffixes)}.")


def _segmentation_header(segments: Sequence[Label], table: LabelTable, shape: Sequence[int]) -> dict[str, str]:
    """Slicer segmentation header fields (``Segment{i}_*``, ``Segmentation_*``) for a single-layer map."""
    depth, height, width = shape
    header = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for index, label in enumerate(segments):
        prefix = f"Segment{index}_"
        header.update(
            {
                prefix + "ID": label.name,
                prefix + "Name": label.display_name,
                prefix + "NameAutoGenerated": "0",
                prefix + "Color": " ".join(f"{c / 255:.6g}" for c in label.color),
                prefix + "ColorAutoGenerated": "0",
                prefix + "LabelValue": str(label.value),
                prefix + "Layer": "0",
                prefix + "Extent": f"0 {width - 1} 0 {height - 1} 0 {depth - 1}",
                # Slicer requires the trailing "|".
                prefix + "Tags": f"TerminologyEntry:{table.terminology_string(label)}|",
            }
        )
    return header


def _segment_fields(image: sitk.Image) -> dict[int, dict[str, str]]:
    """``Segment{i}_{field}`` header entries grouped by segment index."""
    fields: dict[int, dict[str, str]] = {}
    for key in image.GetMetaDataKeys():
        match = re.fullmatch(r"Segment(\d+)_(\w+)", key)
        if match:
            fields.setdefault(int(match[1]), {})[match[2]] = image.GetMetaData(key)
    return fields


def _match_segment(segment: dict[str, str], table: LabelTable) -> Label | None:
    """The table's organ of a Slicer segment: by terminology type code, then by name."""
    for tag in segment.get("Tags", "").split("|"):
        key, _, value = tag.partition(":")
        if key == "TerminologyEntry":
            items = value.split("~")
            type_code = items[2].split("^")[1] if len(items) > 2 and items[2].count("^") == 2 else ""
            for label in table.labels:
                if type_code and type_code == label.snomed_code:
                    return label
    name = _normalise_name(segment.get("Name", ""))
    for label in table.labels:
        if name in (_normalise_name(label.name), _normalise_name(label.display_name)):
            return label
    return None


def _normalise_name(name: str) -> str:
    return " ".join(re.split(r"[\s_\-]+", name.strip().lower()))


def _float_tuple(values: Sequence[float], length: int, what: str) -> tuple[float, ...]:
    result = tuple(float(v) for v in values)
    if len(result) != length:
        raise ValueError(f"Volume {what} must have {length} values, got {len(result)}: {result}.")
    return result
