"""Real CT sample volumes for tests, demos and benchmarks, fetched from public Python packages.

The scans ship inside released packages: the TotalSegmentator 2.18.0 source archive (Apache-2.0)
and the slicerio 1.4.0 wheel (MIT). They are downloaded with the ordinary package client
(``python -m pip download``), checked against pinned SHA-256 digests, and only the needed files are
extracted into a cache folder, each sample with its licence next to it. Once cached, fetching works
offline: a sample whose files still match its manifest is used as it is.

The organ labels of the two abdominal samples are TotalSegmentator model outputs (a strong model,
not manual ground truth), converted to Synapse-13 values.

Environment variables:
    SCDL_CACHE_DIR: cache folder (default: the platform's user cache folder, ``~/.cache/scdl`` on Linux).
        Samples go to ``<cache>/samples/<name>/``.
    SCDL_SAMPLE_ARCHIVES: a folder already holding the archives (``totalsegmentator-2.18.0.tar.gz``,
        ``slicerio-1.4.0-py3-none-any.whl``), used instead of downloading them.

Example::

    sample = fetch_sample("ct_abdomen")
    ct = read_image(sample.image)
    labels = read_label(sample.label, reference=ct)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from scdlcore._checksum import sha256_file
from scdlcore.dataset.manifest import MANIFEST_NAME
from scdlcore.dataset.store import DatasetStore
from scdlcore.io.read import read_image, read_label
from scdlcore.io.volume import resample_label_to
from scdlcore.io.write import write_label
from scdlcore.labels import TOTALSEGMENTATOR_TO_SYNAPSE13, map_label_values
from scdlcore.userdirs import user_cache_dir

__all__ = [
    "SAMPLES",
    "Sample",
    "SampleDataError",
    "SampleInfo",
    "default_cache_dir",
    "fetch_all",
    "fetch_sample",
    "list_samples",
    "make_sample_dataset",
]

logger = logging.getLogger(__name__)


class SampleDataError(RuntimeError):
    """A sample archive cannot be obtained or does not match its pinned digest."""


@dataclass(frozen=True)
class Sample:
    """A fetched sample.

    Attributes:
        name: sample name (a key of :data:`SAMPLES`).
        image: CT file, or folder of a DICOM series.
        label: Synapse-13 label map on the image grid (.nii.gz), or None for unlabeled samples.
        description: what the scan shows, its grid and where it comes from.
        licence: SPDX licence of the source package; its notice is the ``LICENSE`` file beside the image.
    """

    name: str
    image: Path
    label: Path | None
    description: str
    licence: str


@dataclass(frozen=True)
class SampleInfo:
    """What a sample is, before fetching it.

    Attributes:
        name: sample name.
        description: what the scan shows, its grid and where it comes from.
        licence: SPDX licence of the source package.
        labeled: whether the sample comes with a Synapse-13 label map.
        archive: the package file it is extracted from.
    """

    name: str
    description: str
    licence: str
    labeled: bool
    archive: str


@dataclass(frozen=True)
class _Archive:
    filename: str
    sha256: str
    requirement: str
    pip_options: tuple[str, ...]
    licence: str
    licence_member: str


_TOTALSEGMENTATOR = _Archive(
    filename="totalsegmentator-2.18.0.tar.gz",
    sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    requirement="totalsegmentator==2.18.0",
    pip_options=("--no-binary", ":all:"),
    licence="Apache-2.0",
    licence_member="totalsegmentator-2.18.0/LICENSE",
)
_SLICERIO = _Archive(
    filename="slicerio-1.4.0-py3-none-any.whl",
    sha256="ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
    requirement="slicerio==1.4.0",
    pip_options=("--only-binary", ":all:"),
    licence="MIT",
    licence_member="slicerio-1.4.0.dist-info/licenses/LICENSE",
)
_TS_FILES = "totalsegmentator-2.18.0/tests/reference_files/"
_DICOM_FOLDER = _TS_FILES + "example_ct_dicom/"


@dataclass(frozen=True)
class _Recipe:
    info: SampleInfo
    archive: _Archive
    members: tuple[str, ...]  # archive members to extract; a trailing "/" takes a whole folder
    build: Callable[[Path], tuple[str, str | None]]  # extracted folder -> (image, label) relative paths


def _build_ct_abdomen(folder: Path) -> tuple[str, str | None]:
    image = read_image(folder / "example_ct.nii.gz")
    source = folder / "example_seg_fast_force_split.nii.gz"
    labels = read_label(source, reference=image)
    synapse = labels.with_array(map_label_values(labels.array, TOTALSEGMENTATOR_TO_SYNAPSE13))
    write_label(folder / "ct_abdomen_synapse13.nii.gz", synapse)
    source.unlink()
    return "example_ct.nii.gz", "ct_abdomen_synapse13.nii.gz"


def _build_ct_abdomen_dicom(folder: Path) -> tuple[str, str | None]:
    image = read_image(folder / "example_ct_dicom")
    source = folder / "example_seg_dicom.nii.gz"
    labels = read_label(source)
    synapse = labels.with_array(map_label_values(labels.array, TOTALSEGMENTATOR_TO_SYNAPSE13))
    # The label file's y axis is flipped relative to the DICOM read: align by physical position.
    write_label(folder / "ct_abdomen_dicom_synapse13.nii.gz", resample_label_to(synapse, image))
    source.unlink()
    return "example_ct_dicom", "ct_abdomen_dicom_synapse13.nii.gz"


_RECIPES: dict[str, _Recipe] = {
    recipe.info.name: recipe
    for recipe in (
        _Recipe(
            SampleInfo(
                "ct_abdomen",
                "Abdomen and lower chest CT, 122x101x112 voxels at 3.0 mm (NIfTI), with TotalSegmentator "
                "organ labels converted to Synapse-13 (esophagus absent). From the TotalSegmentator 2.18.0 "
                "source archive.",
                _TOTALSEGMENTATOR.licence,
                True,
                _TOTALSEGMENTATOR.filename,
            ),
            _TOTALSEGMENTATOR,
            (_TS_FILES + "example_ct.nii.gz", _TS_FILES + "example_seg_fast_force_split.nii.gz"),
            _build_ct_abdomen,
        ),
        _Recipe(
            SampleInfo(
                "ct_abdomen_dicom",
                "Upper abdomen CT from a PET/CT scanner, a DICOM series of 20 slices, 512x512 at "
                "0.977x0.977x2.0 mm, with TotalSegmentator organ labels converted to Synapse-13 and "
                "resampled onto the DICOM grid (kidneys, gallbladder, esophagus, left adrenal absent). "
                "From the TotalSegmentator 2.18.0 source archive.",
                _TOTALSEGMENTATOR.licence,
                True,
                _TOTALSEGMENTATOR.filename,
            ),
            _TOTALSEGMENTATOR,
            (_DICOM_FOLDER, _TS_FILES + "example_seg_dicom.nii.gz"),
            _build_ct_abdomen_dicom,
        ),
        _Recipe(
            SampleInfo(
                "ct_chest_cta",
                "Chest CT angiography, 233x167x191 voxels at 1.5 mm (NIfTI), unlabeled. From the "
                "TotalSegmentator 2.18.0 source archive.",
                _TOTALSEGMENTATOR.licence,
                False,
                _TOTALSEGMENTATOR.filename,
            ),
            _TOTALSEGMENTATOR,
            (_TS_FILES + "aorta_report/example_ct.nii.gz",),
            lambda folder: ("example_ct.nii.gz", None),
        ),
        _Recipe(
            SampleInfo(
                "ct_chest_nrrd",
                "Chest CT (a 3D Slicer sample), 128x128x34 voxels at 3.05x3.05x10 mm (NRRD), unlabeled "
                "for the abdominal organs. From the slicerio 1.4.0 wheel.",
                _SLICERIO.licence,
                False,
                _SLICERIO.filename,
            ),
            _SLICERIO,
            ("slicerio/data/CTChest4.nrrd",),
            lambda folder: ("CTChest4.nrrd", None),
        ),
    )
}

#: What each sample is, by name.
SAMPLES: dict[str, SampleInfo] = {name: recipe.info for name, recipe in _RECIPES.items()}

_MANIFEST = "manifest.json"


def list_samples() -> list[SampleInfo]:
    """What each sample is, without fetching anything."""
    return list(SAMPLES.values())


def default_cache_dir() -> Path:
    """``SCDL_CACHE_DIR``, else the platform's user cache folder for SCDL (:func:`scdlcore.userdirs.user_cache_dir`)."""
    if os.environ.get("SCDL_CACHE_DIR"):
        return Path(os.environ["SCDL_CACHE_DIR"]).expanduser()
    return user_cache_dir()


def fetch_sample(name: str, cache_dir: str | os.PathLike | None = None) -> Sample:
    """Fetch one sample into the cache (downloading its archive only if it is not cached yet).

    Args:
        name: a sample name, see :func:`list_samples`.
        cache_dir: cache folder; default :func:`default_cache_dir`.

    Returns:
        The sample's paths and description.

    Raises:
        ValueError: unknown sample name.
        SampleDataError: the archive cannot be downloaded or does not match its SHA-256 digest.
    """
    return _fetch([name], cache_dir)[name]


def fetch_all(cache_dir: str | os.PathLike | None = None) -> dict[str, Sample]:
    """Fetch every sample (each archive is downloaded at most once). See :func:`fetch_sample`."""
    return _fetch(list(SAMPLES), cache_dir)


def make_sample_dataset(folder: str | os.PathLike, samples: dict[str, Sample] | None = None) -> Path:
    """Write a dataset folder (see :mod:`scdlcore.dataset`) made of the samples, for tests and demos.

    Labeled cases: ``ct_abdomen`` and ``ct_abdomen_dicom`` (read from its DICOM folder); unlabeled case:
    ``ct_chest_cta``. Case ids are the sample names; labels use the Synapse-13 table.

    Args:
        folder: the dataset folder to create (must not hold a dataset already).
        samples: fetched samples; default :func:`fetch_all` with the default cache.

    Returns:
        ``folder`` as a Path.

    Raises:
        FileExistsError: ``folder`` already holds a dataset.
    """
    root = Path(folder)
    if (root / MANIFEST_NAME).exists():
        raise FileExistsError(f"{root} already holds a dataset ({MANIFEST_NAME}); give a new or empty folder.")
    samples = samples if samples is not None else fetch_all()
    store = DatasetStore.init(root, labels="synapse13")
    for name in ("ct_abdomen", "ct_abdomen_dicom", "ct_chest_cta"):  # stored as any added case: NIfTI, voxel digest
        sample = samples[name]
        store.add(sample.image, sample.label, case_id=name, source=f"scdlcore sample {name}")
    return root


def _fetch(names: Sequence[str], cache_dir: str | os.PathLike | None) -> dict[str, Sample]:
    unknown = [name for name in names if name not in SAMPLES]
    if unknown:
        raise ValueError(f"Unknown sample {unknown[0]!r}; samples: {', '.join(SAMPLES)}.")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = root / "samples"
    samples = {name: _cached(root / name, name) for name in names}
    missing = [name for name, sample in samples.items() if sample is None]
    archives = {_RECIPES[name].archive.filename: _RECIPES[name].archive for name in missing}
    for archive in archives.values():
        with _archive_file(archive, root) as archive_path:
            for name in missing:
                if _RECIPES[name].archive is archive:
                    samples[name] = _build(name, archive_path, root)
    return samples  # type: ignore[return-value]


def _cached(folder: Path, name: str) -> Sample | None:
    """The cached sample if its manifest lists files that all exist with their recorded digests."""
    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return None
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
        intact = all(sha256_file(folder / rel) == digest for rel, digest in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        logger.warning("Cached sample %s in %s is damaged; fetching it again.", name, folder)
        return None
    return _sample(name, folder, record["image"], record["label"])


def _build(name: str, archive_path: Path, root: Path) -> Sample:
    """Extract and convert a sample in a staging folder, then move it into place."""
    recipe = _RECIPES[name]
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{name}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        _extract(archive_path, (*recipe.members, recipe.archive.licence_member), staging)
        image, label = recipe.build(staging)
        files = {
            path.relative_to(staging).as_posix(): sha256_file(path)
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        record = {"sample": name, "archive": recipe.archive.filename, "image": image, "label": label, "files": files}
        (staging / _MANIFEST).write_text(json.dumps(record, indent=1), encoding="utf-8")
        final = root / name
        if final.exists():
            shutil.rmtree(final)  # damaged earlier copy
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Sample %s ready in %s.", name, final)
    return _sample(name, final, image, label)


def _extract(archive_path: Path, members: Sequence[str], folder: Path) -> None:
    """Copy the named members (files, or folders ending in "/") flat into ``folder``."""

    def target(member: str) -> Path | None:
        for wanted in members:
            if member == wanted:
                return folder / Path(member).name
            if wanted.endswith("/") and member.startswith(wanted) and "/" not in member[len(wanted) :]:
                return folder / Path(wanted).name / Path(member).name
        return None

    found = set()
    if archive_path.name.endswith(".whl"):
        with zipfile.ZipFile(archive_path) as archive:
            for member in archive.namelist():
                if (path := target(member)) is not None and not member.endswith("/"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(archive.read(member))
                    found.add(member)
    else:
        with tarfile.open(archive_path, "r:gz") as archive:
            for entry in archive:  # one pass over the compressed stream
                if entry.isfile() and (path := target(entry.name)) is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(archive.extractfile(entry).read())  # type: ignore[union-attr]
                    found.add(entry.name)
    lost = [m for m in members if not any(f == m or (m.endswith("/") and f.startswith(m)) for f in found)]
    if lost:
        raise SampleDataError(f"{archive_path}: the archive lacks {', '.join(lost)}; is it the expected release?")


@contextmanager
def _archive_file(archive: _Archive, root: Path) -> Iterator[Path]:
    """The verified archive: from SCDL_SAMPLE_ARCHIVES, else downloaded with pip into a temporary folder."""
    folder = os.environ.get("SCDL_SAMPLE_ARCHIVES")
    if folder and (Path(folder) / archive.filename).is_file():
        path = Path(folder) / archive.filename
        _verify(path, archive)
        yield path
        return
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as download:
        path = _pip_download(archive, Path(download))
        _verify(path, archive)
        yield path


def _pip_download(archive: _Archive, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *archive.pip_options]
    command += [archive.requirement, "--dest", str(folder), "--disable-pip-version-check", "--quiet"]
    logger.info("Downloading %s (sample data) with pip.", archive.requirement)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    path = folder / archive.filename
    if result.returncode != 0 or not path.is_file():
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise SampleDataError(
            f"Could not download {archive.requirement} with pip (exit code {result.returncode}): "
            f"{' '.join(detail) or 'no output'}. Without network access, put {archive.filename} "
            f"(sha256 {archive.sha256}) in a folder and set SCDL_SAMPLE_ARCHIVES to it."
        )
    return path


def _verify(path: Path, archive: _Archive) -> None:
    digest = sha256_file(path)
    if digest != archive.sha256:
        raise SampleDataError(
            f"{path}: SHA-256 is {digest}, expected {archive.sha256} for {archive.requirement}. "
            "The file is damaged or not the pinned release; delete it and fetch again."
        )


def _sample(name: str, folder: Path, image: str, label: str | None) -> Sample:
    info = SAMPLES[name]
    return Sample(
        name=name,
        image=folder / image,
        label=folder / label if label else None,
        description=info.description,
        licence=info.licence,
    )
