"""The dataset store: adds corrected cases to a dataset folder, lists, removes and ranks them.

One CT, one case: an add without a case id that brings a CT the store already holds (the same voxels,
e.g. a suggested case corrected in Slicer and submitted) updates that case when it brings a label map,
and is refused when it does not. A CT twice would weigh double in training and could put a validation
case into the training set.

Crash and concurrency safety: every write holds an exclusive lock on ``dataset.json.lock``; the case files
are written first (each atomically), the manifest last (a temporary file moved over it). Killing a writer at
any moment leaves the manifest as it was before or after the interrupted change, and every case it lists is
complete. A killed writer may leave files in ``images/``/``labels/`` that no case lists; the next add of the
same id, or its removal, deletes them.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scdlcore._atomic import TEMP_PREFIX, atomic_write_text, fsync_file
from scdlcore._filelock import file_lock
from scdlcore.dataset.manifest import (
    CASE_SUFFIX,
    IMAGES_DIR,
    LABELS_DIR,
    LOCK_NAME,
    MANIFEST_NAME,
    Case,
    CTAlreadyStored,
    Dataset,
    DatasetError,
    load_dataset,
    validate_case_id,
)
from scdlcore.dataset.suggestions import Suggestion, score_case
from scdlcore.io.files import files_by_case, match_by_case
from scdlcore.io.read import not_ct_reason, read_image
from scdlcore.io.segnrrd import read_label_map
from scdlcore.io.volume import NotCTWarning, Volume
from scdlcore.io.write import write_image, write_label
from scdlcore.labels import get_label_table
from scdlcore.preprocess import CANONICAL_ORIENTATION, Reorientation

if TYPE_CHECKING:
    import torch

    from scdlcore.bundle.format import ModelBundle


__all__ = ["DatasetStore", "pair_cases"]

_log = logging.getLogger(__name__)


LOCK_TIMEOUT_S = 120.0  # writing one large CT takes seconds; a minute's wait means something is stuck


_AUTO_ID = re.compile(r"^case(\d+)$")


def pair_cases(
    images: str | os.PathLike, labels: str | os.PathLike | None = None
) -> list[tuple[str, Path, Path | None]]:
    """The CTs of a folder with their label maps from another folder: ``(case name, image, label or None)``.

    Images are the folder's image files and its subfolders (each a DICOM series); a label map is the file of
    ``labels`` with the image's case name (``case01.nii.gz`` for ``case01.nrrd``), or for nnU-Net's channel
    names (``case01_0000.nii.gz``) the one without ``_0000``. An image without a label map is unlabeled.

    Raises:
        DatasetError: no image in ``images``, or label maps that belong to no image (they are named).
    """
    found = files_by_case(images, cts=True)
    if not found:
        raise DatasetError(f"{images}: no CT image files or DICOM series folders in this folder.")
    maps = files_by_case(labels) if labels is not None else {}
    matches = match_by_case(found, maps)
    pairs = [(name, image, maps[matches[name]] if matches[name] else None) for name, image in found.items()]
    maps = {name: path for name, path in maps.items() if name not in matches.values()}
    if maps:
        raise DatasetError(
            f"{labels}: label maps {', '.join(path.name for path in maps.values())} have no image of the same name in "
            f"{images}. Name each label map after its image (case01.nii.gz for case01.nrrd or case01_0000.nii.gz)."
        )
    return pairs


class DatasetStore:
    """A dataset folder that cases are added to and removed from, safely from several processes at once.

    Every read goes to the manifest on disk (another process may have changed it); every write holds the
    folder's lock. Open an existing store with ``DatasetStore(root)``, create one with :meth:`init`.

    Args:
        root: the dataset folder.

    Raises:
        DatasetError: the folder is not an SCDL dataset (no manifest, a foreign or damaged one).

    Example::

        store = DatasetStore.init("my_dataset")
        store.add("ct.nii.gz", "ct_fixed.seg.nrrd", reviewed=["liver", "spleen"], source="slicer", model="abdomen@3")
        store.add("other_ct_dicom/")                     # unlabeled
        print(store.counts())                            # {"labeled": 0, "partial": 1, "unlabeled": 1}
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        self.table = load_dataset(self.root).table

    @classmethod
    def init(cls, root: str | os.PathLike, labels: str = "synapse13") -> DatasetStore:
        """Create an empty store in ``root`` (created if missing), or open the store already there.

        Args:
            root: the folder.
            labels: name of the label table the label maps use (see :func:`scdlcore.labels.get_label_table`).

        Raises:
            DatasetError: an unknown label table; ``root`` is a file, holds a foreign ``dataset.json``, a store with
                another label table, or ``images/``/``labels/`` files without a manifest.
        """
        root = Path(root).expanduser()
        try:
            table = get_label_table(labels)
        except ValueError as err:
            raise DatasetError(str(err)) from err
        if root.exists() and not root.is_dir():
            raise DatasetError(f"{root} is a file; give a folder for the dataset.")
        if not (root / MANIFEST_NAME).exists():
            for sub in (IMAGES_DIR, LABELS_DIR):
                if (root / sub).is_dir() and any((root / sub).iterdir()):
                    raise DatasetError(
                        f"{root} has files in {sub}/ but no {MANIFEST_NAME}; an SCDL dataset manages its {IMAGES_DIR}/ "
                        f"and {LABELS_DIR}/ folders. Choose an empty or new folder."
                    )
            for sub in (IMAGES_DIR, LABELS_DIR):
                (root / sub).mkdir(parents=True, exist_ok=True)
            with _lock(root):
                if not (root / MANIFEST_NAME).exists():
                    _write_manifest(Dataset(root, table, []))
        store = cls(root)
        if store.table.name != table.name:
            raise DatasetError(
                f"{root} already holds a dataset with label table {store.table.name!r}, not {table.name!r}."
            )
        return store

    @classmethod
    @contextlib.contextmanager
    def created_for(cls, root: str | os.PathLike, labels: str = "synapse13") -> Iterator[DatasetStore]:
        """The store in ``root``, created when ``root`` is missing or empty, for adding to it (the Slicer panel's way).

        Unlike :meth:`init` (an explicit ``scdl dataset init``), it never turns a folder that holds other files
        into a dataset, and when the ``with`` body fails on a store it created, the store is removed again (the
        folder too, if it made it), so a failed first add leaves nothing behind.

        Raises:
            DatasetError: ``root`` holds files but no dataset (see also :meth:`init`).
        """
        root = Path(root).expanduser()
        created = not (root / MANIFEST_NAME).exists()
        made_folder = not root.exists()
        if created and root.is_dir() and any(not entry.name.startswith(".") for entry in root.iterdir()):
            raise DatasetError(
                f"{root} holds other files and no {MANIFEST_NAME}: it is not an SCDL dataset. Choose a new or "
                "empty folder for the dataset, or one that scdl dataset init made."
            )
        store = cls.init(root, labels=labels)
        try:
            yield store
        except BaseException:
            if created and not store.cases():
                store._delete_empty(remove_folder=made_folder)
            raise

    def _delete_empty(self, remove_folder: bool) -> None:
        """Remove an empty store's manifest, lock and folders (only what a store holds, nothing else)."""
        for name in (MANIFEST_NAME, LOCK_NAME):
            (self.root / name).unlink(missing_ok=True)
        for sub in (IMAGES_DIR, LABELS_DIR):
            with contextlib.suppress(OSError):  # not empty: a concurrent writer's file is not ours to delete
                (self.root / sub).rmdir()
        if remove_folder:
            with contextlib.suppress(OSError):
                self.root.rmdir()

    def dataset(self) -> Dataset:
        """The current content (see :func:`load_dataset`)."""
        return load_dataset(self.root)

    def cases(self) -> list[Case]:
        return self.dataset().cases

    def case(self, case_id: str) -> Case:
        return self.dataset().case(case_id)

    def counts(self) -> dict[str, int]:
        """``{"labeled": n, "partial": n, "unlabeled": n}``."""
        return self.dataset().counts()

    def fingerprint(self) -> str:
        """See :meth:`Dataset.fingerprint`."""
        return self.dataset().fingerprint()

    def add(
        self,
        image: str | os.PathLike | Volume,
        label: str | os.PathLike | Volume | None = None,
        *,
        case_id: str | None = None,
        reviewed: Sequence[str] | None = None,
        source: str = "",
        model: str | None = None,
        replace: bool = False,
        force: bool = False,
    ) -> Case:
        """Validate and store a case: the image (and label map) as NIfTI, then its manifest entry.

        Args:
            image: a CT file or DICOM series folder (anything :func:`scdlcore.io.read.read_image` reads), or a
                Volume in HU.
            label: the label map on the image's grid, with values of the store's label table: a plain map, a
                Slicer ``.seg.nrrd`` (segments matched by terminology or name), or a Volume; None stores an
                unlabeled case.
            case_id: opaque id (never a patient name); None takes the next free ``caseNNNN``.
            reviewed: organs a person checked (a partial correction, e.g. ``["liver", "spleen"]``); None or all
                organs = fully reviewed. Needs a label.
            source: free text saying where the case comes from (no patient names).
            model: the model version that first segmented the case (``name@N``), or None.
            replace: overwrite the case with this id if it exists (otherwise an existing id is refused).
            force: store an image that does not look like a CT in HU (no voxel below -500), refused otherwise.

        Returns:
            The stored case; without ``case_id``, for a CT the store holds already (same voxels), that case
            updated with the label map.

        Raises:
            DatasetError: a bad case id or organ name, an id that exists, an image that is not a CT (without
                ``force``), a label map off the image's grid or with values outside the label table, a CT the
                store holds already brought without a label map; nothing is stored then.
            ImageError: an unreadable image or label file.
        """
        if case_id is not None:
            validate_case_id(case_id)
            _check_free(self.dataset(), case_id, replace)  # fail before reading a large image
        reviewed = self._check_reviewed(reviewed, has_label=label is not None)
        volume, image_name = _read_image(image)
        reason = not_ct_reason(volume.array, image_name)
        if reason and not force:
            raise DatasetError(
                f"{reason} Nothing was stored: training on it would teach the model wrong intensities. "
                "Add it with --force (force=True) if it is a CT all the same."
            )
        labels = None if label is None else self._read_label(label, volume, image_name)
        stored = _compact(volume)
        digest = _voxels_sha256(stored)
        with _lock(self.root):
            dataset = self.dataset()
            if case_id is None:
                same_ct = next((c for c in dataset.cases if c.extra.get("voxels_sha256") == digest), None)
                if same_ct is not None and labels is None:
                    raise CTAlreadyStored(
                        f"Dataset {self.root} already holds {image_name} as case {same_ct.id} ({same_ct.status}); "
                        "nothing was added. A CT is one case: add it with its label map to update that case.",
                        same_ct,
                    )
                if same_ct is not None:
                    case_id, replace = same_ct.id, True
            case_id = case_id or _next_id(dataset.cases)
            _check_free(dataset, case_id, replace)
            image_file, label_file = (f"{sub}/{case_id}{CASE_SUFFIX}" for sub in (IMAGES_DIR, LABELS_DIR))
            try:
                write_image(self.root / image_file, stored)
                fsync_file(self.root / image_file)
                if labels is not None:
                    # The image's geometry, bit for bit, so the pair always lies on one grid.
                    write_label(self.root / label_file, volume.with_array(labels.array), self.table)
                    fsync_file(self.root / label_file)
                case = Case(
                    id=case_id,
                    image=image_file,
                    label=None if labels is None else label_file,
                    reviewed=reviewed,
                    extra={"source": source, "added": _now(), "model": model, "voxels_sha256": digest},
                )
                others = [c for c in dataset.cases if c.id != case_id]
                position = next((i for i, c in enumerate(dataset.cases) if c.id == case_id), len(others))
                _write_manifest(Dataset(self.root, self.table, [*others[:position], case, *others[position:]]))
            except BaseException:
                if all(c.id != case_id for c in dataset.cases):  # a new case's files, which no manifest lists
                    for relative in (image_file, label_file):
                        (self.root / relative).unlink(missing_ok=True)
                raise
            self._delete_unlisted(case_id, dataset)
        return case

    def remove(self, case_id: str) -> Case:
        """Remove a case and its files; returns the removed entry.

        Raises:
            DatasetError: no case with this id (files a killed add left for it are deleted all the same).
        """
        validate_case_id(case_id)
        with _lock(self.root):
            dataset = self.dataset()
            try:
                case = dataset.case(case_id)
            except DatasetError:
                self._delete_unlisted(case_id, dataset)
                raise
            _write_manifest(Dataset(self.root, self.table, [c for c in dataset.cases if c.id != case_id]))
            self._delete_unlisted(case_id, dataset)
        return case

    def suggest(
        self,
        bundle: ModelBundle,
        device: torch.device | str,
        *,
        top: int | None = None,
        overlap: float = 0.25,
    ) -> list[Suggestion]:
        """Rank the unlabeled cases by how much correcting them would help the model.

        Bundles with two or more networks (CPS) are scored by the disagreement of their first two networks'
        class maps; one-network bundles by the mean softmax entropy. Both are measured over the body voxels
        (above -500 HU) on the model grid.

        Args:
            bundle: the current model.
            device: where the networks run.
            top: keep the ``top`` best; None = all.
            overlap: sliding-window overlap in [0, 1); the ranking needs less than segmentation does.

        Returns:
            Suggestions, most useful first (ties by case id).
        """
        import torch

        from scdlcore.inference.predictor import Predictor

        dataset = self.dataset()
        cases = dataset.unlabeled
        predictor = Predictor(bundle, device, overlap=overlap, ensemble="mean")  # every network, each scored alone
        suggestions = []
        for index, case in enumerate(cases, start=1):
            _log.info("Scoring case %s (%d/%d)", case.id, index, len(cases))
            path = dataset.path(case.image)
            with torch.inference_mode():
                measure, score, organs, reason = score_case(read_image(path), predictor)
            suggestions.append(Suggestion(case.id, str(path.resolve()), score, measure, organs, reason))
        suggestions.sort(key=lambda s: (-s.score, s.case_id))
        return suggestions if top is None else suggestions[:top]

    def _check_reviewed(self, reviewed: Sequence[str] | None, *, has_label: bool) -> list[str] | None:
        """Reviewed organ names in table order; None when every organ is reviewed."""
        if reviewed is None:
            return None
        names = [reviewed] if isinstance(reviewed, str) else list(dict.fromkeys(reviewed))
        if not has_label:
            raise DatasetError("Reviewed organs were given without a label map; add the label map the person reviewed.")
        try:
            self.table.check_organs(names, "reviewed organ")
        except ValueError as err:
            raise DatasetError(str(err)) from None
        if not names:
            raise DatasetError(
                "The list of reviewed organs is empty; name the organs a person checked, or add the case unlabeled."
            )
        return None if set(names) == set(self.table.names) else [name for name in self.table.names if name in names]

    def _read_label(self, label: str | os.PathLike | Volume, image: Volume, image_name: str) -> Volume:
        """The label map, checked: on the image's grid, values from the table."""
        if isinstance(label, Volume):
            volume, name = label, "the label map volume"
            if not np.issubdtype(volume.array.dtype, np.integer):
                raise DatasetError(
                    f"The label map volume holds {volume.array.dtype} values; a label map holds integers."
                )
        else:
            name = str(label)
            volume = read_label_map(label, self.table)
        if not volume.same_grid(image):
            raise DatasetError(
                f"Label map {name} is not on the grid of image {image_name}: "
                f"the label map has {volume.describe_grid()}, the image {image.describe_grid()}. "
                "Export the label map on the image's grid, or resample it onto the image with "
                "scdlcore.io.volume.resample_label_to. Nothing was stored."
            )
        unknown = self.table.unknown_values(volume.array)
        if unknown:
            raise DatasetError(
                f"Label map {name} holds values {unknown} that are not in label table {self.table.name!r} "
                f"(values {self.table.values}); convert them with scdlcore.labels.map_label_values. Nothing was stored."
            )
        return volume

    def _delete_unlisted(self, case_id: str, before: Dataset) -> None:
        """After a manifest write (lock held): delete the files of ``case_id`` that the manifest no longer lists.

        These are the case's previous files (replaced or removed), its orphans from a killed add, and the
        temporary files killed writers left (hidden files; only a lock holder writes in these folders).
        """
        listed = {relative for case in self.dataset().cases for relative in (case.image, case.label) if relative}
        old = [
            relative for case in before.cases if case.id == case_id for relative in (case.image, case.label) if relative
        ]
        candidates = [*old, *(f"{sub}/{case_id}{CASE_SUFFIX}" for sub in (IMAGES_DIR, LABELS_DIR))]
        for sub in (IMAGES_DIR, LABELS_DIR):
            if (self.root / sub).is_dir():
                candidates += [f"{sub}/{p.name}" for p in (self.root / sub).iterdir() if p.name.startswith(".")]
        candidates += [p.name for p in self.root.glob(f"{TEMP_PREFIX}*")]
        for relative in set(candidates) - listed:
            path = self.root / relative
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _check_free(dataset: Dataset, case_id: str, replace: bool) -> None:
    if not replace and any(case.id == case_id for case in dataset.cases):
        raise DatasetError(
            f"Dataset {dataset.root} already has a case {case_id!r}; give another id, or replace it "
            "(--replace, replace=True). Nothing was stored."
        )


def _next_id(cases: Iterable[Case]) -> str:
    """``caseNNNN`` after the highest such id."""
    numbers = [int(match[1]) for case in cases if (match := _AUTO_ID.match(case.id))]
    return f"case{max(numbers, default=0) + 1:04d}"


def _read_image(image: str | os.PathLike | Volume) -> tuple[Volume, str]:
    """The CT volume and its name for messages."""
    if not isinstance(image, Volume):
        with warnings.catch_warnings():  # add() refuses a non-CT itself, with the reason
            warnings.simplefilter("ignore", NotCTWarning)
            return read_image(image), str(image)
    if not np.issubdtype(image.array.dtype, np.number) or not np.isfinite(image.array).all():
        raise DatasetError("The image volume must hold finite Hounsfield units (numbers, no NaN or infinity).")
    return image, "the image volume"


def _compact(volume: Volume) -> Volume:
    """The volume as int16 when that is lossless (CT in whole HU): half the disk of float32."""
    array = volume.array
    limits = np.iinfo(np.int16)
    if (
        np.issubdtype(array.dtype, np.floating)
        and array.min() >= limits.min
        and array.max() <= limits.max
        and np.array_equal(array, np.rint(array))
    ):
        return volume.with_array(array.astype(np.int16))
    return volume


def _voxels_sha256(volume: Volume) -> str:
    """Digest of a CT's voxels (shape, type and values) in the canonical orientation: the same scan read from
    DICOM, NIfTI or NRRD, in whatever axis order, gives the same one."""
    array = Reorientation.to(CANONICAL_ORIENTATION, volume.direction).apply(volume.array)
    digest = hashlib.sha256(f"{array.shape}{array.dtype.str}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """The store's write lock; waiting longer than LOCK_TIMEOUT_S is a DatasetError naming the dataset."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(file_lock(root / LOCK_NAME, timeout_s=LOCK_TIMEOUT_S))
    except TimeoutError as err:
        raise DatasetError(f"Dataset {root}: {err}") from err
    with stack:
        yield


def _write_manifest(dataset: Dataset) -> None:
    """Replace the manifest atomically, flushed to disk (the files it lists were flushed before)."""
    text = json.dumps(dataset.manifest(), indent=1) + "\n"
    atomic_write_text(dataset.root / MANIFEST_NAME, text, durable=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
