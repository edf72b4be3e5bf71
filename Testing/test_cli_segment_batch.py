"""``scdl segment CT1 CT2 ... -o FOLDER``: many real CTs, one loaded model, in-process via ``scdlcore.cli.main``.

The model is the intensity-threshold stand-in of ``conftest.threshold_bundle`` (not a trained model).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from scdlcore.bundle.format import ModelBundle
from scdlcore.cli import main
from scdlcore.inference.predictor import organ_volumes_ml
from scdlcore.io.read import read_image, read_label
from scdlcore.io.segnrrd import read_label_map
from scdlcore.labels import SYNAPSE13


def _segment(*args: str | Path) -> int:
    return main(["segment", *map(str, args), "--device", "cpu"])


def _assert_one_error_line(err: str, start: str) -> None:
    """A user error is one stderr line, ``scdl segment: error: `` then the message, which starts with ``start``
    (the file and the problem; the advice after it may be reworded)."""
    assert err.startswith(f"scdl segment: error: {start}") and err.endswith("\n") and err.count("\n") == 1, err


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "volumes.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def three_cts(samples) -> list[Path]:
    """A NIfTI file, a DICOM series folder and an NRRD file: three real CTs with three distinct names."""
    return [Path(samples[name].image) for name in ("ct_abdomen", "ct_abdomen_dicom", "ct_chest_nrrd")]


@pytest.mark.slow
def test_a_batch_writes_every_ct_into_the_folder_and_goes_on_past_a_broken_one(
    three_cts: list[Path],
    threshold_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    builds = []
    build_networks = ModelBundle.build_networks
    monkeypatch.setattr(
        ModelBundle, "build_networks", lambda self, *a, **k: builds.append(self) or build_networks(self, *a, **k)
    )
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"")
    inputs = [three_cts[0], broken, *three_cts[1:]]
    folder = tmp_path / "results"

    assert _segment(*inputs, "-o", folder, "--model", threshold_bundle) == 1  # one CT failed
    assert len(builds) == 1, "the model is loaded once for the whole batch"

    names = ["example_ct", "broken", "example_ct_dicom", "CTChest4"]
    rows = _rows(folder)
    assert [(row["case"], row["input"], row["status"]) for row in rows] == [
        (name, str(source), "failed" if source == broken else "segmented") for name, source in zip(names, inputs)
    ]
    assert rows[1]["error"] == f"{broken}: the file is empty (0 bytes). Copy or export the image again."
    assert rows[1]["output"] == str(folder / "broken.seg.nrrd") and not (folder / "broken.seg.nrrd").exists()
    for row, source in zip(rows, inputs):
        if source == broken:
            assert all(row[f"{organ}_ml"] == "" for organ in SYNAPSE13.names)
            continue
        assert row["output"] == str(folder / f"{row['case']}.seg.nrrd")
        labels = read_label_map(row["output"], SYNAPSE13)
        assert labels.same_grid(read_image(source))
        expected = organ_volumes_ml(labels, SYNAPSE13)
        assert {organ: float(row[f"{organ}_ml"]) for organ in SYNAPSE13.names} == pytest.approx(expected, abs=1e-3)
        assert expected["spleen"] > 0

    # The batch writes what segmenting that CT alone writes.
    assert _segment(three_cts[2], "-o", tmp_path / "alone.seg.nrrd", "--model", threshold_bundle) == 0
    np.testing.assert_array_equal(
        read_label(tmp_path / "alone.seg.nrrd").array, read_label(folder / "CTChest4.seg.nrrd").array
    )

    out, err = capsys.readouterr()
    assert f"[2/4] {broken}: FAILED: {broken}: the file is empty" in err
    assert f"[4/4] {three_cts[2]} -> {folder / 'CTChest4.seg.nrrd'} (" in out
    assert "3 segmented, 0 kept, 1 failed of 4 CTs with threshold@1 on cpu in " in out
    assert f"Organ volumes: {folder / 'volumes.csv'}" in out


@pytest.mark.slow
def test_skip_existing_keeps_finished_outputs_and_reads_their_volumes_back(
    three_cts: list[Path], threshold_bundle: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "results"
    assert _segment(*three_cts[::2], "-o", folder, "--model", threshold_bundle, "--format", "nii.gz") == 0
    first = {row["case"]: row for row in _rows(folder)}
    kept = folder / "example_ct.nii.gz"
    os.utime(kept, ns=(1, 1))  # a mark that a rewrite would lose
    (folder / "CTChest4.nii.gz").unlink()  # as if the run had been stopped while segmenting it

    assert (
        _segment(*three_cts[::2], "-o", folder, "--model", threshold_bundle, "--format", "nii.gz", "--skip-existing")
        == 0
    )
    assert kept.stat().st_mtime_ns == 1
    again = {row["case"]: row for row in _rows(folder)}
    assert (again["example_ct"]["status"], again["CTChest4"]["status"]) == ("skipped", "segmented")
    for case in again:
        assert [again[case][f"{organ}_ml"] for organ in SYNAPSE13.names] == [
            first[case][f"{organ}_ml"] for organ in SYNAPSE13.names
        ]


def test_events_name_the_case_of_every_line_and_overviews_go_next_to_the_outputs(
    three_cts: list[Path], threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "results"
    folder.mkdir()  # an existing folder takes the batch form even for one CT
    assert (
        _segment(three_cts[2], "-o", folder, "--model", threshold_bundle, "--events", "--overview", "--organs", "liver")
        == 0
    )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress, case, result = events[:-2], events[-2], events[-1]
    assert {(e["event"], e["case"]) for e in progress} == {("progress", 0)} and progress[-1]["step"] == 100
    assert (case["event"], case["case"], case["status"], case["output"]) == (
        "case",
        0,
        "segmented",
        str(folder / "CTChest4.seg.nrrd"),
    )
    assert list(case["volumes_ml"]) == ["liver"] and case["message"] is None
    assert (result["event"], result["cases"], result["segmented"], result["failed"]) == ("result", 1, 1, 0)
    assert result["volumes_csv"] == str(folder / "volumes.csv")
    assert (folder / "CTChest4_overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(_rows(folder)[0])[6:] == ["liver_ml"]


def test_one_ct_with_overview_and_no_name_writes_it_next_to_the_output(
    samples, threshold_bundle: Path, tmp_path: Path
) -> None:
    assert (
        _segment(
            samples["ct_chest_nrrd"].image, "-o", tmp_path / "chest.seg.nrrd", "--model", threshold_bundle, "--overview"
        )
        == 0
    )
    assert (tmp_path / "chest_overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inputs_that_would_overwrite_each_other_are_refused_before_any_work(
    samples, threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    abdomen, chest = Path(samples["ct_abdomen"].image), Path(samples["ct_chest_cta"].image)
    assert abdomen.name == chest.name == "example_ct.nii.gz"
    folder = tmp_path / "results"
    assert _segment(abdomen, chest, "-o", folder, "--model", threshold_bundle) == 2
    _assert_one_error_line(
        capsys.readouterr().err,
        f"Inputs {abdomen} and {chest} would both be written to {folder / 'example_ct.seg.nrrd'}",
    )
    assert not folder.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["-o", "{file}"], "{file}: is a file; with several CTs, -o names the folder"),
        (["-o", "{folder}", "--format", "png"], "Cannot write label maps as '.png'"),
        (["-o", "{folder}", "--overview", "x.png"], "With an output folder, --overview takes no file name"),
    ],
)
def test_batch_options_that_cannot_work_are_refused(
    options: list[str],
    message: str,
    three_cts: list[Path],
    threshold_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    paths = {"file": tmp_path / "a.seg.nrrd", "folder": tmp_path / "results"}
    paths["file"].write_bytes(b"keep")
    options = [option.format(**paths) for option in options]
    assert _segment(*three_cts[:2], *options, "--model", threshold_bundle) == 2
    _assert_one_error_line(capsys.readouterr().err, message.format(**paths))
    assert paths["file"].read_bytes() == b"keep" and not paths["folder"].exists()


def test_one_ct_with_skip_existing_keeps_its_output_and_prints_its_volumes(
    samples, threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "chest.nii.gz"
    assert _segment(samples["ct_chest_nrrd"].image, "-o", output, "--model", threshold_bundle) == 0
    first = capsys.readouterr().out.splitlines()[1:]  # the volume table
    os.utime(output, ns=(1, 1))
    assert _segment(samples["ct_chest_nrrd"].image, "-o", output, "--model", threshold_bundle, "--skip-existing") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"Kept the existing {output} (--skip-existing)"
    assert printed[1:] == first and output.stat().st_mtime_ns == 1


@pytest.mark.slow
def test_a_folder_of_cts_stands_for_all_of_them_and_a_dicom_folder_for_its_series(
    three_cts: list[Path], threshold_bundle: Path, tmp_path: Path
) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(three_cts[2], scans / "chest.nrrd")
    shutil.copytree(three_cts[1], scans / "patient2")  # a DICOM series subfolder
    (scans / "notes.txt").write_text("not a CT")
    assert _segment(scans, "-o", tmp_path / "results", "--model", threshold_bundle) == 0
    assert [(row["case"], row["status"]) for row in _rows(tmp_path / "results")] == [
        ("chest", "segmented"),
        ("patient2", "segmented"),
    ]

    # A folder that is a DICOM series is one CT: -o names its output file.
    assert _segment(scans / "patient2", "-o", tmp_path / "patient2.nii.gz", "--model", threshold_bundle) == 0
    np.testing.assert_array_equal(
        read_label(tmp_path / "patient2.nii.gz").array,
        read_label_map(tmp_path / "results" / "patient2.seg.nrrd", SYNAPSE13).array,
    )


def test_an_output_that_is_an_input_ct_is_refused_before_any_work(
    three_cts: list[Path], threshold_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(three_cts[0], scans / "a.nii.gz")
    shutil.copy(three_cts[2], scans / "b.nrrd")
    before = {path.name: path.read_bytes() for path in scans.iterdir()}
    assert _segment(scans, "-o", scans, "--format", "nii.gz", "--model", threshold_bundle) == 2
    _assert_one_error_line(capsys.readouterr().err, f"{scans / 'a.nii.gz'} is one of the input CTs")
    assert _segment(scans / "b.nrrd", "-o", scans / "b.nrrd", "--model", threshold_bundle) == 2
    assert {path.name: path.read_bytes() for path in scans.iterdir()} == before


def test_segmenting_a_folder_into_itself_twice_takes_only_the_cts(
    three_cts: list[Path], threshold_bundle: Path, tmp_path: Path
) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(three_cts[2], scans / "b.nrrd")
    for _ in range(2):  # the second run sees b.seg.nrrd next to b.nrrd: a segmentation, not a CT
        assert _segment(scans, "-o", scans, "--model", threshold_bundle) == 0
    assert sorted(path.name for path in scans.iterdir()) == ["b.nrrd", "b.seg.nrrd", "volumes.csv"]
