"""The dataset store: add/list/remove on real CTs, refusals, crash and concurrency safety, suggestions.

Writers in child processes are real ``scdl dataset`` / :class:`DatasetStore` runs; where a test needs to
stop one at an exact step, the child wraps ``os.replace`` (every atomic write ends with one) to announce
each step and pause. The bundles for ``suggest`` are tiny random VNets (width 2): test fixtures, not models.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import scdlcore
from scdlcore._atomic import TEMP_PREFIX
from scdlcore._filelock import file_lock
from scdlcore.bundle.format import save_bundle
from scdlcore.cli import main
from scdlcore.dataset import store as store_module
from scdlcore.dataset.manifest import LOCK_NAME, MANIFEST_NAME, DatasetError, load_dataset
from scdlcore.dataset.store import DatasetStore
from scdlcore.dataset.suggestions import _disagreement, _entropy
from scdlcore.io.read import read_image, read_label
from scdlcore.io.volume import Volume
from scdlcore.io.write import write_image, write_label
from scdlcore.labels import SYNAPSE13
from scdlcore.nets import VNet
from scdlcore.sample_data import Sample

PACKAGE_PARENT = Path(scdlcore.__file__).resolve().parents[1]
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")

# A child process that runs `scdl dataset ...` (only that sub-command: no torch import, fast start) and
# announces every os.replace before and after it happens, pausing SCDL_TEST_DELAY seconds each time.
_ANNOUNCING_CLI = r"""
import argparse, os, sys, time
delay = float(os.environ.get("SCDL_TEST_DELAY", "0"))
real_replace = os.replace
def replace(src, dst):
    print("replace", os.path.basename(dst), flush=True)
    time.sleep(delay)
    real_replace(src, dst)
    print("replaced", os.path.basename(dst), flush=True)
    time.sleep(delay)
os.replace = replace
from scdlcore.cli import dataset
parser = argparse.ArgumentParser()
dataset.register(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""

# A child process adding three CTs (the image with one voxel changed) with automatic ids; os.replace is slowed
# down so that two such writers' read-manifest / write-manifest steps overlap unless the lock keeps them apart.
_WRITER = r"""
import os, sys, time
real_replace = os.replace
def replace(src, dst):
    time.sleep(0.05)
    real_replace(src, dst)
os.replace = replace
from scdlcore.dataset.store import DatasetStore
from scdlcore.io.read import read_image
store = DatasetStore(sys.argv[1])
ct = read_image(sys.argv[2])
for n in range(3):
    ct.array[0, 0, 0] = 100 * int(sys.argv[3]) + n  # a different CT for each add: one CT is one case
    store.add(ct, source=f"writer {sys.argv[3]} add {n}")
"""


@pytest.fixture
def store(tmp_path: Path) -> DatasetStore:
    return DatasetStore.init(tmp_path / "store")


@pytest.fixture
def ct_file(tmp_path: Path, synthetic_ct: Volume) -> Path:
    """The (10, 20, 30) synthetic CT as a NIfTI file, in whole HU."""
    path = tmp_path / "input" / "ct.nii.gz"
    write_image(path, synthetic_ct.with_array(np.rint(synthetic_ct.array)))
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: tiny 3D convolutions run ~30x slower when intra-op threads compete on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])),
    }


def _snapshot(root: Path) -> tuple[bytes, list[str]]:
    """The manifest's bytes and every file under the folder: equal snapshots = nothing was stored."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return (root / MANIFEST_NAME).read_bytes(), files


def _store_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for sub in ("images", "labels") for p in (root / sub).iterdir()}


def _listed_files(root: Path) -> set[str]:
    return {rel for case in load_dataset(root).cases for rel in (case.image, case.label) if rel}


def test_init_creates_an_empty_versioned_store_and_reopens_it(tmp_path: Path) -> None:
    root = tmp_path / "new" / "store"
    store = DatasetStore.init(root)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest == {"format": "scdl-dataset", "version": 1, "labels": "synapse13", "cases": []}
    assert (root / "images").is_dir() and (root / "labels").is_dir()
    assert store.counts() == {"labeled": 0, "partial": 0, "unlabeled": 0} and store.cases() == []
    assert DatasetStore.init(root).root == root  # a second init opens the same store
    assert DatasetStore(root).table is SYNAPSE13


@pytest.mark.slow
def test_add_list_remove_real_samples_in_nifti_dicom_and_nrrd(
    store: DatasetStore, samples: dict[str, Sample], capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(store.root)
    abdomen, dicom, chest = samples["ct_abdomen"], samples["ct_abdomen_dicom"], samples["ct_chest_nrrd"]
    assert dicom.image.is_dir()
    assert (
        main(
            [
                "dataset",
                "add",
                root,
                str(abdomen.image),
                "--label",
                str(abdomen.label),
                "--source",
                "sample nifti",
                "--model",
                "abdomen@3",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "dataset",
                "add",
                root,
                str(dicom.image),
                "--label",
                str(dicom.label),
                "--reviewed",
                "spleen",
                "liver",
                "--source",
                "sample dicom",
            ]
        )
        == 0
    )
    assert main(["dataset", "add", root, str(chest.image), "--id", "chest-1"]) == 0
    capsys.readouterr()

    assert main(["dataset", "list", root, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["counts"] == {"labeled": 1, "partial": 1, "unlabeled": 1}
    assert listing["fingerprint"] == store.fingerprint()
    cases = {case["id"]: case for case in listing["cases"]}
    assert list(cases) == ["case0001", "case0002", "chest-1"]
    assert cases["case0001"] | {"added": None, "voxels_sha256": None} == {
        "id": "case0001",
        "image": "images/case0001.nii.gz",
        "label": "labels/case0001.nii.gz",
        "reviewed": None,
        "source": "sample nifti",
        "added": None,
        "model": "abdomen@3",
        "status": "labeled",
        "voxels_sha256": None,
    }
    assert (cases["case0002"]["status"], cases["case0002"]["reviewed"]) == ("partial", ["spleen", "liver"])
    assert (cases["chest-1"]["status"], cases["chest-1"]["label"], cases["chest-1"]["model"]) == (
        "unlabeled",
        None,
        None,
    )
    assert all(ISO_UTC.match(case["added"]) for case in cases.values())
    manifest_text = (store.root / MANIFEST_NAME).read_text()
    assert str(abdomen.image.parent) not in manifest_text and "example_ct" not in manifest_text  # no input names

    # Every stored image has the input's geometry and voxels; every label map lies on its image.
    for case_id, sample in (("case0001", abdomen), ("case0002", dicom), ("chest-1", chest)):
        original, stored = read_image(sample.image), read_image(store.root / cases[case_id]["image"])
        assert stored.same_grid(original) and np.array_equal(stored.array, original.array), case_id
        if sample.label is not None:
            labels = read_label(store.root / cases[case_id]["label"], reference=stored)
            assert np.array_equal(labels.array, read_label(sample.label).array), case_id

    assert main(["dataset", "list", root]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["id", "status", "reviewed", "added", "source"]
    assert table[2].startswith("case0002  partial    spleen, liver  ") and table[2].endswith("  sample dicom")
    assert table[-1] == "3 case(s): 1 labeled, 1 partial, 1 unlabeled (label table synapse13)"

    assert main(["dataset", "remove", root, "case0001"]) == 0
    assert capsys.readouterr().out.strip() == f"Removed case0001 from {root}"
    assert [case.id for case in load_dataset(root).cases] == ["case0002", "chest-1"]
    assert _store_files(store.root) == {"images/case0002.nii.gz", "labels/case0002.nii.gz", "images/chest-1.nii.gz"}
    data = load_dataset(root)  # the read-only view the trainer uses
    assert [c.id for c in data.labeled] == ["case0002"] and [c.id for c in data.unlabeled] == ["chest-1"]


def test_stored_image_holds_only_geometry_and_voxels(store: DatasetStore, samples: dict[str, Sample]) -> None:
    case = store.add(samples["ct_abdomen_dicom"].image)
    raw = gzip.decompress((store.root / case.image).read_bytes())
    header_size, vox_offset = struct.unpack("<i", raw[:4])[0], struct.unpack("<f", raw[108:112])[0]
    assert (header_size, vox_offset) == (348, 352.0)
    assert raw[148:228] == bytes(80)  # empty description
    assert raw[348:352] == bytes(4)  # no header extension (where DICOM tags could hide)
    assert len(raw) == 352 + 20 * 512 * 512 * 2  # whole-HU CT stored losslessly as int16, nothing else


def test_partial_review_is_stored_in_table_order_and_all_organs_mean_null(
    store: DatasetStore, synthetic_ct: Volume, synthetic_labels: Volume
) -> None:
    partial = store.add(
        synthetic_ct, synthetic_labels, reviewed=["liver", "spleen", "liver"], source="slicer", case_id="case0001"
    )
    full = store.add(synthetic_ct, synthetic_labels, reviewed=list(reversed(SYNAPSE13.names)), case_id="full")
    unreviewed_default = store.add(synthetic_ct, synthetic_labels, case_id="default")
    unlabeled = store.add(synthetic_ct, case_id="unlabeled")
    assert (partial.id, partial.reviewed, partial.status) == ("case0001", ["spleen", "liver"], "partial")
    assert (full.reviewed, full.status, unreviewed_default.reviewed) == (None, "labeled", None)
    assert (unlabeled.label, unlabeled.status) == (None, "unlabeled")
    entries = json.loads((store.root / MANIFEST_NAME).read_text())["cases"]
    assert [entry["reviewed"] for entry in entries] == [["spleen", "liver"], None, None, None]
    assert store.counts() == {"labeled": 2, "partial": 1, "unlabeled": 1}
    assert load_dataset(store.root).case("case0001").source == "slicer"


def test_the_same_ct_in_another_axis_order_is_the_same_case(store: DatasetStore, tmp_path: Path) -> None:
    """Slicer's reader stores a left-handed CT with its slice axis reversed: the same voxels, another order."""
    array = np.random.default_rng(0).integers(-1000, 1000, (6, 7, 8)).astype(np.int16)
    left_handed = Volume(array, (0.7, 0.8, 2.5), (-40.0, 20.0, 100.0), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    write_image(tmp_path / "ct.nrrd", left_handed)
    first = store.add(tmp_path / "ct.nrrd")
    last_slice_first = left_handed.ijk_to_lps @ np.array([0, 0, 5, 1.0])
    reordered = Volume(array[::-1].copy(), (0.7, 0.8, 2.5), tuple(last_slice_first[:3]), (1, 0, 0, 0, -1, 0, 0, 0, -1))
    write_image(tmp_path / "ct-slicer.nrrd", reordered)

    with pytest.raises(DatasetError, match=f"already holds .* as case {first.id} \\(unlabeled\\)"):
        store.add(tmp_path / "ct-slicer.nrrd")


@pytest.mark.slow
def test_one_ct_is_one_case_a_later_label_updates_it_and_an_unlabeled_copy_changes_nothing(
    store: DatasetStore, samples: dict[str, Sample], tmp_path: Path
) -> None:
    """The annotation loop's round trip: a CT added unlabeled is suggested, loaded (from the store's NIfTI),
    corrected and submitted with its label map (exported as NRRD, as the Slicer panel does)."""
    dicom = samples["ct_abdomen_dicom"]
    first = store.add(dicom.image, source="scanner")
    exported = tmp_path / "slicer-export" / "ct.nrrd"
    write_image(exported, read_image(store.root / first.image))
    manifest = (store.root / MANIFEST_NAME).read_bytes()

    # the same CT unlabeled again: nothing to add
    problem = f"Dataset {store.root} already holds {exported} as case {first.id} (unlabeled); nothing was added."
    with pytest.raises(DatasetError, match=f"^{re.escape(problem)}"):
        store.add(exported)
    assert (store.root / MANIFEST_NAME).read_bytes() == manifest

    corrected = store.add(exported, dicom.label, reviewed=["liver"], source="slicer")
    assert (corrected.id, corrected.status, corrected.source) == (first.id, "partial", "slicer")
    assert store.counts() == {"labeled": 0, "partial": 1, "unlabeled": 0}
    assert _store_files(store.root) == {f"images/{first.id}.nii.gz", f"labels/{first.id}.nii.gz"}
    resubmitted = store.add(dicom.image, dicom.label)  # a later correction of the same CT replaces the earlier one
    assert (resubmitted.id, resubmitted.status) == (first.id, "labeled")

    assert store.add(samples["ct_chest_nrrd"].image).id == "case0002"  # another CT is another case
    assert store.add(dicom.image, case_id="copy").id == "copy"  # an explicit id is the caller's choice
    assert len(store.cases()) == 3


@pytest.mark.slow
def test_dataset_add_says_when_it_updates_the_case_of_a_ct(
    store: DatasetStore, samples: dict[str, Sample], capsys: pytest.CaptureFixture[str]
) -> None:
    root, dicom = str(store.root), samples["ct_abdomen_dicom"]
    assert main(["dataset", "add", root, str(dicom.image)]) == 0
    assert main(["dataset", "add", root, str(dicom.image)]) == 2
    assert (
        main(["dataset", "add", root, str(dicom.image), "--label", str(dicom.label), "--reviewed", "liver", "--json"])
        == 0
    )
    out, err = capsys.readouterr()
    assert out.startswith(f"Added case0001 (unlabeled) to {root}\n")
    assert err.startswith(f"scdl dataset: error: Dataset {root} already holds {dicom.image} as case case0001")
    assert "nothing was added" in err
    assert {key: json.loads(out.split("\n", 1)[1])[key] for key in ("id", "status", "previous")} == {
        "id": "case0001",
        "status": "partial",
        "previous": "unlabeled",
    }
    assert main(["dataset", "add", root, str(dicom.image), "--label", str(dicom.label)]) == 0
    assert capsys.readouterr().out == f"Updated case0001 in {root}: was partial, now labeled\n"


@pytest.mark.slow
def test_import_adds_a_folder_of_cts_with_their_label_maps_and_can_run_again(
    tmp_path: Path, samples: dict[str, Sample], capsys: pytest.CaptureFixture[str]
) -> None:
    abdomen, dicom, chest = samples["ct_abdomen"], samples["ct_abdomen_dicom"], samples["ct_chest_nrrd"]
    images, labels, root = tmp_path / "imagesTr", tmp_path / "labelsTr", tmp_path / "store"
    images.mkdir()
    labels.mkdir()
    shutil.copy(abdomen.image, images / "a_0000.nii.gz")  # nnU-Net's channel name, label a.nii.gz
    shutil.copytree(dicom.image, images / "b")  # a DICOM series folder, label b.nii.gz
    shutil.copy(chest.image, images / "c.nrrd")  # no label: unlabeled
    (images / "broken.nii.gz").write_bytes(b"")
    shutil.copy(abdomen.label, labels / "a.nii.gz")
    shutil.copy(dicom.label, labels / "b.nii.gz")

    assert main(["dataset", "import", str(root), str(images), "--labels", str(labels), "--source", "import test"]) == 1
    out, err = capsys.readouterr()
    assert f"[failed] {images / 'broken.nii.gz'}: the file is empty (0 bytes)" in err
    assert out == (
        f"Imported 4 CT(s) into {root}: 3 added, 0 already there (updated when a label map came), 1 failed. "
        "The dataset: 2 labeled, 0 partial, 1 unlabeled\n"
    )
    store = DatasetStore(root)
    cases = {case.id: case for case in store.cases()}
    assert [(case.status, case.source) for case in cases.values()] == [("labeled", "import test")] * 2 + [
        ("unlabeled", "import test")
    ]
    stored = read_label(root / cases["case0002"].label, reference=read_image(root / cases["case0002"].image))
    assert np.array_equal(stored.array, read_label(dicom.label).array)  # b's label map went with b's DICOM series

    (images / "broken.nii.gz").unlink()
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert main(["dataset", "import", str(root), str(images), "--labels", str(labels), "--json"]) == 0  # run again
    report = json.loads(capsys.readouterr().out)
    assert [(case["name"], case["case_id"], case["previous"]) for case in report["cases"]] == [
        ("a_0000", "case0001", "labeled"),
        ("b", "case0002", "labeled"),
        ("c", "case0003", "unlabeled"),
    ]
    assert [case["id"] for case in json.loads((root / MANIFEST_NAME).read_text())["cases"]] == [
        c["id"] for c in manifest["cases"]
    ]
    assert store.counts() == {"labeled": 2, "partial": 0, "unlabeled": 1}

    shutil.copy(abdomen.label, labels / "orphan.nii.gz")
    assert main(["dataset", "import", str(root), str(images), "--labels", str(labels)]) == 2
    assert "label maps orphan.nii.gz have no image of the same name in" in capsys.readouterr().err


def test_import_counts_a_ct_that_an_earlier_file_of_the_same_import_brought_as_updated(
    tmp_path: Path, samples: dict[str, Sample], capsys: pytest.CaptureFixture[str]
) -> None:
    abdomen = samples["ct_abdomen"]
    images, labels, root = tmp_path / "imagesTr", tmp_path / "labelsTr", tmp_path / "store"
    images.mkdir()
    labels.mkdir()
    shutil.copy(abdomen.image, images / "a1.nii.gz")  # unlabeled first ...
    shutil.copy(abdomen.image, images / "a2.nii.gz")  # ... then the same CT with its label map
    shutil.copy(abdomen.label, labels / "a2.nii.gz")

    assert main(["dataset", "import", str(root), str(images), "--labels", str(labels), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(case["name"], case["case_id"], case["status"], case["previous"]) for case in report["cases"]] == [
        ("a1", "case0001", "unlabeled", None),
        ("a2", "case0001", "labeled", "unlabeled"),
    ]
    assert DatasetStore(root).counts() == {"labeled": 1, "partial": 0, "unlabeled": 0}


@pytest.mark.parametrize("case_id", ["../evil", "a/b", "a\\b", "/abs", "has space", ".hidden", "", "x" * 129])
def test_case_ids_with_path_separators_or_odd_characters_are_refused(
    store: DatasetStore, ct_file: Path, case_id: str
) -> None:
    before = _snapshot(store.root)
    with pytest.raises(DatasetError, match=f"^{re.escape(f'Invalid case id {case_id!r}: use 1-128 letters')}"):
        store.add(ct_file, case_id=case_id)
    assert _snapshot(store.root) == before


def test_label_map_with_unknown_values_is_refused_naming_values_and_file(
    store: DatasetStore, ct_file: Path, synthetic_labels: Volume, tmp_path: Path
) -> None:
    bad = synthetic_labels.array.copy()
    bad[0, 0, :3] = [14, 200, 14]
    label_file = tmp_path / "input" / "bad_labels.nii.gz"
    write_label(label_file, synthetic_labels.with_array(bad))
    before = _snapshot(store.root)
    problem = f"Label map {label_file} holds values [14, 200] that are not in label table 'synapse13'"
    with pytest.raises(DatasetError, match=f"^{re.escape(problem)}.*Nothing was stored"):
        store.add(ct_file, label_file, case_id="bad")
    assert _snapshot(store.root) == before


def test_label_map_on_another_grid_is_refused_naming_both_files(
    store: DatasetStore, samples: dict[str, Sample]
) -> None:
    image, label = samples["ct_chest_nrrd"].image, samples["ct_abdomen"].label
    before = _snapshot(store.root)
    problem = f"Label map {label} is not on the grid of image {image}: the label map has size (122, 101, 112) voxels"
    with pytest.raises(DatasetError, match=f"^{re.escape(problem)}.*Nothing was stored") as err:
        store.add(image, label)
    assert "the image size (128, 128, 34) voxels" in str(err.value)  # both grids are described
    assert _snapshot(store.root) == before


def test_bad_reviewed_organs_and_existing_ids_are_refused(
    store: DatasetStore, synthetic_ct: Volume, synthetic_labels: Volume
) -> None:
    store.add(synthetic_ct, synthetic_labels, case_id="c1")
    before = _snapshot(store.root)
    refusals = {  # the problem, in a case-insensitive pattern
        r"unknown reviewed organ\(s\) 'livr'.*'synapse13'": dict(label=synthetic_labels, reviewed=["liver", "livr"]),
        "reviewed organs were given without a label map": dict(reviewed=["liver"]),
        "the list of reviewed organs is empty": dict(label=synthetic_labels, reviewed=[]),
        f"^Dataset {re.escape(str(store.root))} already has a case 'c1'": dict(case_id="c1"),
    }
    for problem, kwargs in refusals.items():
        with pytest.raises(DatasetError, match=f"(?i){problem}"):
            store.add(synthetic_ct, **kwargs)
        assert _snapshot(store.root) == before


@pytest.mark.slow
def test_replace_overwrites_a_case_and_deletes_the_files_it_no_longer_needs(
    store: DatasetStore, synthetic_ct: Volume, synthetic_labels: Volume
) -> None:
    store.add(synthetic_ct, synthetic_labels, case_id="c1")
    store.add(synthetic_ct, case_id="c2")
    fingerprint = store.fingerprint()
    assert store.fingerprint() == fingerprint  # stable while nothing changes
    time.sleep(1.1)  # "added" has one-second resolution
    replaced = store.add(synthetic_ct, case_id="c1", replace=True, source="again")
    assert [case.id for case in store.cases()] == ["c1", "c2"]  # the case keeps its place
    assert (replaced.status, store.case("c1").source) == ("unlabeled", "again")
    assert _store_files(store.root) == {"images/c1.nii.gz", "images/c2.nii.gz"}  # the old label map is gone
    assert store.fingerprint() != fingerprint


def test_folders_that_are_not_ours_give_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    empty_problem = f"{empty} is not an SCDL dataset folder: it has no {MANIFEST_NAME}."
    with pytest.raises(DatasetError, match=f"^{re.escape(empty_problem)}") as err:
        DatasetStore(empty)
    assert f"scdl dataset init {empty}" in str(err.value)  # says how to make one

    foreign = tmp_path / "nnunet"
    foreign.mkdir()
    nnunet_json = json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 3})
    (foreign / MANIFEST_NAME).write_text(nnunet_json)
    problem = f"{foreign / MANIFEST_NAME} is not an SCDL dataset manifest"
    for attempt in (DatasetStore, DatasetStore.init, load_dataset):
        with pytest.raises(DatasetError, match=f"^{re.escape(problem)}"):
            attempt(foreign)
    assert (foreign / MANIFEST_NAME).read_text() == nnunet_json and sorted(p.name for p in foreign.iterdir()) == [
        MANIFEST_NAME
    ]

    (foreign / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(
        DatasetError, match=f"^Cannot read dataset manifest {re.escape(str(foreign / MANIFEST_NAME))}: "
    ):
        DatasetStore(foreign)

    stray = tmp_path / "stray"
    (stray / "images").mkdir(parents=True)
    (stray / "images" / "scan.nii.gz").write_bytes(b"user data")
    with pytest.raises(DatasetError, match=f"^{re.escape(str(stray))} has files in images/ but no {MANIFEST_NAME}"):
        DatasetStore.init(stray)

    assert main(["dataset", "list", str(empty)]) == 2
    assert capsys.readouterr().err.startswith(f"scdl dataset: error: {empty_problem}")
    assert main(["dataset", "list", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith(
        f"scdl dataset: error: Dataset folder {tmp_path / 'missing'} does not exist"
    )


def test_a_held_lock_makes_a_writer_wait_then_fail_clearly(
    store: DatasetStore, synthetic_ct: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "LOCK_TIMEOUT_S", 0.3)
    before = _snapshot(store.root)
    with file_lock(store.root / LOCK_NAME):  # another open file: excluded like another process
        start = time.monotonic()
        with pytest.raises(
            DatasetError, match=f"^Dataset {re.escape(str(store.root))}: .*{LOCK_NAME} is locked by another program"
        ):
            store.add(synthetic_ct)
        assert time.monotonic() - start >= 0.3
    assert _snapshot(store.root) == before
    assert store.add(synthetic_ct).id == "case0001"  # released: writing works again


def _victim_add_command(store: DatasetStore, sample: Sample) -> list[str]:
    """``scdl dataset add`` of the sample as case "victim" (replacing it), announcing each replace on stdout."""
    return [
        sys.executable,
        "-c",
        _ANNOUNCING_CLI,
        "dataset",
        "add",
        str(store.root),
        str(sample.image),
        "--label",
        str(sample.label),
        "--id",
        "victim",
        "--replace",
    ]


@pytest.mark.slow  # spawns and kills processes
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_at_every_step_of_an_add_leaves_a_valid_store(
    store: DatasetStore, samples: dict[str, Sample], synthetic_ct: Volume
) -> None:
    sample = samples["ct_abdomen"]
    keep = store.add(synthetic_ct, case_id="keep")
    expected_labels = read_label(sample.label).array
    command = _victim_add_command(store, sample)
    env = {**_env(), "SCDL_TEST_DELAY": "0.1"}
    kills = 0
    while True:  # kill the k-th run right after its k-th announcement, until a run finishes
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        steps = 0
        for line in process.stdout:  # type: ignore[union-attr]
            steps += line.startswith("replace")
            if steps == kills + 1:
                process.send_signal(signal.SIGKILL)
                break
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]
        _check_valid(store.root, keep.id, expected_labels)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL
        kills += 1
    assert kills >= 6  # image, label and manifest: killed before and after each replace
    assert _store_files(store.root) == _listed_files(store.root)  # the finished add cleaned the orphans
    assert not list(store.root.glob(f"{TEMP_PREFIX}*"))  # nor the manifest's temporary files


@pytest.mark.slow  # spawns and kills processes
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_at_random_moments_leaves_a_valid_store(
    store: DatasetStore, samples: dict[str, Sample], synthetic_ct: Volume
) -> None:
    sample = samples["ct_abdomen"]
    keep = store.add(synthetic_ct, case_id="keep")
    expected_labels = read_label(sample.label).array
    command = _victim_add_command(store, sample)  # no delay: a plain `scdl dataset add`
    start = time.monotonic()
    subprocess.run(command, check=True, env=_env(), capture_output=True)
    duration = time.monotonic() - start
    rng = random.Random(0)
    for _ in range(3):
        process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 1.0) * duration)  # the second half: after the imports, while writing
        process.send_signal(signal.SIGKILL)
        process.wait()
        _check_valid(store.root, keep.id, expected_labels)
    store.remove("victim")
    assert _store_files(store.root) == {"images/keep.nii.gz"}


@pytest.mark.slow  # spawns and kills processes
def test_two_processes_adding_concurrently_lose_nothing(store: DatasetStore, ct_file: Path) -> None:
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(store.root), str(ct_file), str(n)],
            env=_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    cases = store.cases()
    assert sorted(case.id for case in cases) == [f"case{n:04d}" for n in range(1, 7)]
    assert sorted(case.source for case in cases) == sorted(f"writer {w} add {n}" for w in range(2) for n in range(3))
    assert _store_files(store.root) == _listed_files(store.root)
    for case in cases:
        assert read_image(store.root / case.image).shape == (10, 20, 30)


def test_disagreement_and_entropy_scores_by_hand() -> None:
    body = torch.ones((10, 10, 10), dtype=torch.bool)
    a = torch.zeros((10, 10, 10), dtype=torch.int64)
    a[:4] = SYNAPSE13.class_index("liver")
    a[4, :5] = SYNAPSE13.class_index("pancreas")
    b = a.clone()
    b[4, :5] = 0  # pancreas (50 voxels): network b misses it
    b[0, 0, :2] = SYNAPSE13.class_index("adrenal_gland_right")  # 2 liver voxels become adrenal
    score, organs, reason = _disagreement(a, b, body, SYNAPSE13)
    assert score == pytest.approx(52 / 1000)
    assert organs == pytest.approx({"liver": 2 / 400, "pancreas": 1.0, "adrenal_gland_right": 1.0})
    assert reason == "networks disagree on 5.2% of body voxels, mostly pancreas"
    score, _, reason = _disagreement(a, a, body, SYNAPSE13)
    assert (score, reason) == (0.0, "networks agree on every body voxel")

    uniform = torch.full((SYNAPSE13.num_classes, 4, 4, 4), 1 / SYNAPSE13.num_classes)
    certain = torch.zeros_like(uniform)
    certain[SYNAPSE13.class_index("spleen")] = 1.0
    body = torch.ones((4, 4, 4), dtype=torch.bool)
    assert _entropy(uniform, body, SYNAPSE13)[0] == pytest.approx(1.0)
    assert _entropy(certain, body, SYNAPSE13) == (0.0, {"spleen": 0.0}, "mean voxel uncertainty 0.0% of the maximum")


def test_suggest_ranks_unlabeled_cases_with_reasons(
    store: DatasetStore,
    samples: dict[str, Sample],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    store.add(samples["ct_abdomen"].image, case_id="abdomen")
    store.add(samples["ct_chest_nrrd"].image, case_id="chest")
    store.add(samples["ct_abdomen"].image, samples["ct_abdomen"].label, case_id="labeled")  # not ranked
    torch.manual_seed(0)
    networks = [VNet(num_classes=14, width=2), VNet(num_classes=14, width=2)]
    # 14 mm: each sample fits one 32^3 window, so the test runs six forward passes.
    meta = dict(labels=SYNAPSE13, spacing=(14.0, 14.0, 14.0), hu_window=(-125, 275), patch_size=(32, 32, 32))
    cps = save_bundle(tmp_path / "cps", networks, name="tiny", base="cps", **meta)
    single = save_bundle(tmp_path / "single", networks[:1], name="tiny1", **meta)

    assert main(["dataset", "suggest", str(store.root), "--model", str(cps), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "tiny@1"
    ranked = result["suggestions"]
    assert sorted(s["case_id"] for s in ranked) == ["abdomen", "chest"]
    for suggestion in ranked:  # the stored CT, for the panel to load
        assert suggestion["image"] == str(store.root.resolve() / store.case(suggestion["case_id"]).image)
    assert ranked[0]["score"] >= ranked[1]["score"]
    for suggestion in ranked:
        assert suggestion["measure"] == "disagreement" and 0 <= suggestion["score"] <= 1
        assert set(suggestion["organs"]) <= set(SYNAPSE13.names)
        assert re.fullmatch(
            r"networks disagree on \d+\.\d% of body voxels(, mostly [a-z ]+?((, [a-z ]+?)* and [a-z ]+)?)?"
            r"|networks agree on every body voxel",
            suggestion["reason"],
        ), suggestion["reason"]
        assert (
            suggestion["reason"].startswith("networks agree")
            or f"{100 * suggestion['score']:.1f}%" in suggestion["reason"]
        )

    assert main(["dataset", "suggest", str(store.root), "--model", str(single), "--device", "cpu", "--top", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Cases to correct next, by tiny1@1 (entropy):" and len(lines) == 2
    assert re.fullmatch(
        r"  1\. (abdomen|chest): mean voxel uncertainty \d+\.\d% of the maximum(, highest in .+)?", lines[1]
    )


def _check_valid(root: Path, keep_id: str, expected_labels: np.ndarray) -> None:
    """The store opens; the untouched case is intact; the victim, if listed, is complete."""
    dataset = load_dataset(root)
    ids = [case.id for case in dataset.cases]
    assert ids in ([keep_id], [keep_id, "victim"]), ids
    read_image(dataset.path(dataset.case(keep_id).image))
    if "victim" in ids:
        victim = dataset.case("victim")
        image = read_image(dataset.path(victim.image))
        assert np.array_equal(read_label(dataset.path(victim.label), reference=image).array, expected_labels)  # type: ignore[arg-type]
