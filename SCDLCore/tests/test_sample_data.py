"""scdlcore.sample_data: files arrive, digests are enforced, the cache is never half-written, offline re-fetch."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scdlcore.dataset.manifest import CTAlreadyStored, load_dataset
from scdlcore.dataset.store import DatasetStore
from scdlcore.io.read import read_image, read_label
from scdlcore.labels import SYNAPSE13
from scdlcore.sample_data import (
    SampleDataError,
    default_cache_dir,
    fetch_all,
    fetch_sample,
    list_samples,
    make_sample_dataset,
)

TOTALSEGMENTATOR_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def fake_pip(payload: bytes | None, calls: list, returncode: int = 0, stderr: str = ""):
    """A stand-in for subprocess.run that 'downloads' ``payload`` as the requested file."""

    def run(command, **kwargs):
        calls.append(command)
        if payload is not None:
            dest = command.index("--dest")
            filename = {"totalsegmentator==2.18.0": "totalsegmentator-2.18.0.tar.gz"}[command[dest - 1]]
            (Path(command[dest + 1]) / filename).write_bytes(payload)
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    return run


def test_list_samples_describes_all_four():
    infos = {info.name: info for info in list_samples()}
    assert list(infos) == ["ct_abdomen", "ct_abdomen_dicom", "ct_chest_cta", "ct_chest_nrrd"]
    assert [info.labeled for info in infos.values()] == [True, True, False, False]
    assert [info.licence for info in infos.values()] == ["Apache-2.0", "Apache-2.0", "Apache-2.0", "MIT"]
    assert infos["ct_chest_nrrd"].archive == "slicerio-1.4.0-py3-none-any.whl"


def test_every_sample_arrives_with_its_licence(samples, sample_cache_dir):
    infos = {info.name: info for info in list_samples()}
    assert set(samples) == set(infos)
    for name, sample in samples.items():
        folder = sample_cache_dir / "samples" / name
        assert sample.image.parent == folder and sample.image.exists()
        assert (sample.label is not None) == infos[name].labeled
        assert sample.label is None or sample.label.is_file()
        assert (sample.description, sample.licence) == (infos[name].description, infos[name].licence)
        notice = (folder / "LICENSE").read_text()
        assert ("Apache License" if sample.licence == "Apache-2.0" else "MIT License") in notice
    assert len(list(samples["ct_abdomen_dicom"].image.iterdir())) == 20  # DICOM slices


def test_abdomen_labels_are_synapse13_with_the_documented_voxel_counts(samples):
    labels = read_label(samples["ct_abdomen"].label).array
    assert np.count_nonzero(labels == SYNAPSE13["liver"].value) == 41_692
    assert np.count_nonzero(labels == SYNAPSE13["adrenal_gland_right"].value) == 166
    assert not np.any(labels == SYNAPSE13["esophagus"].value)
    assert set(np.unique(labels)) == {0, *SYNAPSE13.values} - {SYNAPSE13["esophagus"].value}


def test_dicom_sample_labels_hold_the_documented_organs(samples):
    labels = read_label(samples["ct_abdomen_dicom"].label)
    present = {SYNAPSE13.names[v - 1] for v in np.unique(labels.array) if v}
    assert present == {
        "spleen",
        "liver",
        "stomach",
        "aorta",
        "inferior_vena_cava",
        "portal_vein_and_splenic_vein",
        "pancreas",
        "adrenal_gland_right",
    }


def test_refetch_is_offline(samples, sample_cache_dir, monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(subprocess, "run", fake_pip(None, calls, returncode=1))
    monkeypatch.setenv("SCDL_SAMPLE_ARCHIVES", str(tmp_path))  # empty: nothing to take from here either
    assert fetch_all(sample_cache_dir) == samples
    assert fetch_sample("ct_abdomen_dicom", sample_cache_dir) == samples["ct_abdomen_dicom"]
    assert calls == []


def test_archive_with_wrong_digest_raises_and_writes_nothing(tmp_path, monkeypatch):
    archives = tmp_path / "archives"
    archives.mkdir()
    bogus = archives / "totalsegmentator-2.18.0.tar.gz"
    bogus.write_bytes(b"not the release")
    monkeypatch.setenv("SCDL_SAMPLE_ARCHIVES", str(archives))
    got = hashlib.sha256(b"not the release").hexdigest()
    problem = f"{bogus}: SHA-256 is {got}, expected {TOTALSEGMENTATOR_SHA256}"
    with pytest.raises(SampleDataError, match=f"^{re.escape(problem)}"):
        fetch_sample("ct_abdomen", tmp_path / "cache")
    assert files_under(tmp_path / "cache") == []


def test_downloaded_archive_with_wrong_digest_leaves_no_half_written_cache(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.delenv("SCDL_SAMPLE_ARCHIVES", raising=False)
    monkeypatch.setattr(subprocess, "run", fake_pip(b"tampered", calls))
    with pytest.raises(SampleDataError, match=r"SHA-256 is [0-9a-f]{64}, expected 5d4223ef"):
        fetch_sample("ct_chest_cta", tmp_path / "cache")
    assert calls[0][:8] == [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "totalsegmentator==2.18.0",
    ]
    assert list((tmp_path / "cache" / "samples").iterdir()) == []  # download folder removed


def test_pip_failure_says_how_to_work_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("SCDL_SAMPLE_ARCHIVES", raising=False)
    monkeypatch.setattr(subprocess, "run", fake_pip(None, [], returncode=1, stderr="ERROR: No matching distribution"))
    problem = "Could not download totalsegmentator==2.18.0 with pip (exit code 1): ERROR: No matching distribution"
    with pytest.raises(SampleDataError, match=f"^{re.escape(problem)}") as err:
        fetch_sample("ct_abdomen", tmp_path / "cache")
    # how to work offline: the archive to fetch by hand and the variable that points at it
    assert "totalsegmentator-2.18.0.tar.gz" in str(err.value) and "SCDL_SAMPLE_ARCHIVES" in str(err.value)
    assert list((tmp_path / "cache" / "samples").iterdir()) == []


def test_damaged_cached_sample_is_fetched_again(samples, sample_cache_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(sample_cache_dir / "samples" / "ct_chest_nrrd", cache / "samples" / "ct_chest_nrrd")
    image = cache / "samples" / "ct_chest_nrrd" / "CTChest4.nrrd"
    assert fetch_sample("ct_chest_nrrd", cache).image == image  # intact copy: used as it is
    image.write_bytes(image.read_bytes()[:1000])
    archives = tmp_path / "archives"
    archives.mkdir()
    (archives / "slicerio-1.4.0-py3-none-any.whl").write_bytes(b"bogus")
    monkeypatch.setenv("SCDL_SAMPLE_ARCHIVES", str(archives))
    # The damaged copy is not trusted: fetch goes for the archive (here a bad one, so it fails cleanly).
    with pytest.raises(SampleDataError, match="slicerio-1.4.0-py3-none-any.whl: SHA-256 is"):
        fetch_sample("ct_chest_nrrd", cache)
    assert sorted(p.name for p in (cache / "samples").iterdir()) == ["ct_chest_nrrd"]  # no staging left


@pytest.mark.slow
def test_sample_dataset_has_two_labeled_cases_and_one_unlabeled(samples, tmp_path):
    dataset = load_dataset(make_sample_dataset(tmp_path / "dataset", samples))
    assert [case.id for case in dataset.labeled] == ["ct_abdomen", "ct_abdomen_dicom"]
    assert [case.id for case in dataset.unlabeled] == ["ct_chest_cta"]
    assert dataset.table.name == "synapse13"
    for case in dataset.labeled:
        read_label(dataset.path(case.label), reference=read_image(dataset.path(case.image)))
    # Stored as any added case, so "one CT is one case" holds: the sample CT added again is recognised.
    assert all(case.image.endswith(".nii.gz") and case.extra["voxels_sha256"] for case in dataset.cases)
    with pytest.raises(CTAlreadyStored, match="ct_abdomen_dicom"):
        DatasetStore(dataset.root).add(samples["ct_abdomen_dicom"].image)


def test_unknown_sample_lists_the_valid_names(tmp_path):
    with pytest.raises(ValueError, match="Unknown sample 'ct_brain'") as err:
        fetch_sample("ct_brain", tmp_path)
    assert all(name in str(err.value) for name in ("ct_abdomen", "ct_abdomen_dicom", "ct_chest_cta", "ct_chest_nrrd"))


@pytest.mark.parametrize(
    ("platform", "env", "expected"),
    [
        ("linux", {}, "home/.cache/scdl"),
        ("linux", {"XDG_CACHE_HOME": "xdg"}, "xdg/scdl"),
        ("darwin", {}, "home/Library/Caches/scdl"),
        ("win32", {"LOCALAPPDATA": "local"}, "local/scdl/Cache"),
        ("linux", {"SCDL_CACHE_DIR": "mine"}, "mine"),
    ],
)
def test_default_cache_dir_follows_platform_conventions(monkeypatch, tmp_path, platform, env, expected):
    for name in ("SCDL_CACHE_DIR", "XDG_CACHE_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "platform", platform)
    assert default_cache_dir() == tmp_path / expected
