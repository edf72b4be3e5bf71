"""Writing CTs and label maps atomically: a temporary file in the destination folder moved into place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scdlcore._atomic import atomic_write
from scdlcore.io.files import check_write_suffix
from scdlcore.io.read import itk_reason
from scdlcore.io.segnrrd import segmentation_header
from scdlcore.io.volume import Volume, to_sitk
from scdlcore.labels import SYNAPSE13, LabelTable, value_counts

if TYPE_CHECKING:
    import SimpleITK as sitk


__all__ = ["write_image", "write_label"]


def write_image(path: str | os.PathLike, volume: Volume) -> None:
    """Write a volume atomically (.nrrd, .nii.gz, .nii or .mha), keeping its geometry and dtype.

    NRRD and MetaImage store the geometry in double precision. NIfTI stores it in float32, so an
    oblique direction or a spacing like 0.7 mm comes back rounded to about 1e-7.

    Raises:
        ValueError: unsupported file extension.
    """
    path = Path(path)
    check_write_suffix(path, allow_segmentation=False)
    _write_sitk(path, to_sitk(volume))


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
    suffix = check_write_suffix(path, allow_segmentation=True)
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
    image = to_sitk(labels)
    if table is not None and suffix == ".seg.nrrd":
        segments = [label for label in table.labels if include_absent or label.value in present]
        for key, value in segmentation_header(segments, table, labels.shape).items():
            image.SetMetaData(key, value)
    _write_sitk(path, image)


def _write_sitk(path: Path, image: sitk.Image) -> None:
    """Write atomically; SimpleITK's RuntimeError (a folder that cannot be written, a full disk) becomes an
    OSError that names the file."""
    import SimpleITK as sitk

    try:
        atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))
    except RuntimeError as err:
        raise OSError(
            f"Could not write {path} ({itk_reason(err)}); check that the folder is writable and the disk has space."
        ) from err
