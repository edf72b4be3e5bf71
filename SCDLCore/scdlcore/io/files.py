"""File names and folders: the suffixes read and written, case names, pairing images with labels, output checks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from scdlcore.io.volume import ImageError

if TYPE_CHECKING:
    pass


__all__ = [
    "WRITE_SUFFIXES",
    "case_name",
    "check_label_output",
    "check_writable_folder",
    "files_by_case",
    "match_by_case",
    "is_dicom_folder",
]


#: File types the writers take; ``.seg.nrrd`` (3D Slicer segmentation) for label maps only.
WRITE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


_FILE_SUFFIXES = (*WRITE_SUFFIXES, ".mhd")  # longest first where one ends another (.seg.nrrd, .nrrd)


_NNUNET_CHANNEL = "_0000"  # nnU-Net names the (only) CT channel of case X "X_0000"


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
    return {
        name: next((n for n in (name, name.removesuffix(_NNUNET_CHANNEL)) if n in seconds), None) for name in firsts
    }


def check_label_output(path: str | os.PathLike) -> Path:
    """Check, before any work, that a label map can be written to ``path``: a known file type, and the
    nearest existing folder above it writable (missing folders are created on write).

    Raises:
        ValueError: an unsupported file type, or a file where a folder is needed.
        PermissionError: the folder cannot be written.
    """
    path = Path(path)
    check_write_suffix(path, allow_segmentation=True)
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


def check_write_suffix(path: Path, *, allow_segmentation: bool) -> str:
    suffixes = WRITE_SUFFIXES if allow_segmentation else WRITE_SUFFIXES[1:]
    name = path.name.lower()
    for suffix in suffixes:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: cannot write this file type; use one of {', '.join(suffixes)}.")
