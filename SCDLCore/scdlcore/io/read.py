"""Reading CTs and label maps (NRRD, NIfTI, MetaImage, DICOM series), checked.

A bad file raises :class:`ImageError` naming the file, the problem and what to do.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scdlcore.io.volume import ImageError, NotCTWarning, Volume, clean_direction, grid_differences, volume_from_sitk

if TYPE_CHECKING:
    import SimpleITK as sitk


__all__ = ["not_ct_reason", "read_image", "read_label"]

logger = logging.getLogger(__name__)


_READ_FORMATS = "NRRD (.nrrd), NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd) or a DICOM series folder"


_MIN_CT_HU = -500.0  # every CT with air in view has voxels far below this; MR and normalised images do not


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
    return volume_from_sitk(image, array)


def not_ct_reason(array: np.ndarray, name: str) -> str | None:
    """Why an image (finite voxels) does not look like a CT in HU, in one sentence naming it; None if it does.

    Every CT with air in view has voxels far below -500 HU; MR and normalised images have none.
    """
    low, high = float(array.min()), float(array.max())
    if low <= _MIN_CT_HU:
        return None
    return (
        f"{name}: intensities range from {low:g} to {high:g}, with no voxel below {_MIN_CT_HU:g} HU; this does "
        "not look like a CT in Hounsfield units (air is about -1000 HU)."
    )


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
    volume = volume_from_sitk(image, labels)
    if reference is not None:
        differences = grid_differences(volume, reference, 1e-4)
        if differences:
            raise ImageError(
                f"{path}: the label map is not on the grid of its image ({'; '.join(differences)}). "
                "Pair it with the image it was drawn on, or resample it onto the image with "
                "scdlcore.io.volume.resample_label_to."
            )
    return volume


def _read_scalar_3d(path: Path) -> sitk.Image:
    """Read and check an image: 3D (at least 2 voxels along each axis), one component per voxel."""
    image = read_checked(path)
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


def read_checked(path: Path) -> sitk.Image:
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
            f"({itk_reason(err)}). Supported: {_READ_FORMATS}."
        ) from err
    return clean_direction(image)


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
        raise ImageError(f"{folder}: the DICOM series cannot be read ({itk_reason(err)}).") from err
    _check_slice_positions(folder, files, reader)
    return clean_direction(image)


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
        raise ImageError(
            f"{folder}: its {len(files)} slices lie at one position; it is not a volume (or every slice is "
            "repeated). Copy or export the series again."
        )
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
        raise ImageError(f"{path}: the file is truncated or damaged ({err}). Copy or export the image again.") from err
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


def itk_reason(err: RuntimeError) -> str:
    """The informative last line of an ITK exception message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _to_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer label values as uint8 (uint16 when needed), or ImageError."""
    if not np.issubdtype(array.dtype, np.integer) and (
        not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array))
    ):
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
