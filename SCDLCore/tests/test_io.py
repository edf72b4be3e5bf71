"""scdlcore.io on the real samples and on bad inputs (each error message pinned)."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import slicerio
from scdl_test_support import split_dicom_series, write_raw_nrrd

from scdlcore import labels as labels_module
from scdlcore.io import read as io_read
from scdlcore.io.files import case_name, files_by_case
from scdlcore.io.read import read_image, read_label
from scdlcore.io.segnrrd import read_segmentation_labels
from scdlcore.io.volume import ImageError, NotCTWarning, Volume, resample_label_to
from scdlcore.io.write import write_image, write_label
from scdlcore.labels import SYNAPSE13, value_counts

# name: (array shape (D, H, W), spacing (x, y, z) mm), as listed in SCDLCore/docs/DATA.md
REAL_GRIDS = {
    "ct_abdomen": ((112, 101, 122), (3.0, 3.0, 3.0)),
    "ct_abdomen_dicom": ((20, 512, 512), (0.9765625, 0.9765625, 2.0)),
    "ct_chest_cta": ((191, 167, 233), (1.5, 1.5, 1.5)),
    "ct_chest_nrrd": ((34, 128, 128), (3.04687595367432, 3.04687595367432, 10.0)),
}


def geometry(volume: Volume) -> tuple:
    return volume.shape, volume.spacing, volume.origin, volume.direction


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize("name", list(REAL_GRIDS))
def test_read_image_gives_float32_hu_on_the_documented_grid(samples, name):
    shape, spacing = REAL_GRIDS[name]
    ct = read_image(samples[name].image)
    assert ct.array.dtype == np.float32
    assert ct.shape == shape
    np.testing.assert_allclose(ct.spacing, spacing, rtol=1e-12)
    assert ct.array.min() < -900  # air in Hounsfield units


def test_dicom_read_uses_the_series_geometry(samples):
    ct = read_image(samples["ct_abdomen_dicom"].image)
    assert ct.origin == (-249.51171875, -437.51171875, -804.5)
    assert ct.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert ct.array.min() == -1024  # rescale intercept applied


def test_nrrd_direction_cosines_are_cleaned_of_reader_round_off(samples):
    ct = read_image(samples["ct_chest_nrrd"].image)
    assert ct.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert ct.origin == (193.09599304199222, 216.39599609374994, -340.24999999999994)


# NIfTI stores geometry as float32: the NRRD sample's spacing 3.04687595367432 cannot survive it.
ROUND_TRIPS = [(name, suffix) for name in REAL_GRIDS for suffix in (".nrrd", ".mha", ".nii.gz")]
ROUND_TRIPS.remove(("ct_chest_nrrd", ".nii.gz"))
# The two largest CTs (DICOM 512x512x20, CTA 233x167x191) take about a second per round trip: slow; the small stay fast.
ROUND_TRIPS = [
    pytest.param(name, suffix, marks=pytest.mark.slow, id=f"{name}-{suffix}")
    if name in ("ct_abdomen_dicom", "ct_chest_cta")
    else (name, suffix)
    for name, suffix in ROUND_TRIPS
]


@pytest.mark.parametrize(("name", "suffix"), ROUND_TRIPS)
def test_write_then_read_keeps_geometry_and_voxels_exactly(samples, tmp_path, name, suffix):
    ct = read_image(samples[name].image)
    write_image(tmp_path / f"ct{suffix}", ct)
    again = read_image(tmp_path / f"ct{suffix}")
    assert geometry(again) == geometry(ct)
    assert np.array_equal(again.array, ct.array)


def test_nifti_keeps_double_precision_geometry_to_float32_precision(samples, tmp_path):
    ct = read_image(samples["ct_chest_nrrd"].image)
    write_image(tmp_path / "ct.nii.gz", ct)
    again = read_image(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(again.spacing, ct.spacing, rtol=1e-7)
    np.testing.assert_allclose(again.origin, ct.origin, rtol=1e-7)
    assert again.direction == ct.direction


@pytest.mark.parametrize(("suffix", "atol"), [(".mha", 0.0), (".nrrd", 1e-12), (".nii.gz", 2e-5)])
def test_oblique_volume_round_trip_keeps_geometry_to_format_precision(synthetic_ct, tmp_path, suffix, atol):
    write_image(tmp_path / f"ct{suffix}", synthetic_ct)
    again = read_image(tmp_path / f"ct{suffix}")
    assert again.shape == synthetic_ct.shape
    for got, expected in zip(geometry(again)[1:], geometry(synthetic_ct)[1:]):
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
    assert np.array_equal(again.array, synthetic_ct.array)


def test_label_maps_of_both_labeled_samples_lie_on_their_image_grid(samples):
    for name in ("ct_abdomen", "ct_abdomen_dicom"):
        ct = read_image(samples[name].image)
        labels = read_label(samples[name].label, reference=ct)
        assert labels.array.dtype == np.uint8
        assert labels.same_grid(ct)


def test_label_round_trip_keeps_values_dtype_and_geometry(samples, tmp_path):
    labels = read_label(samples["ct_abdomen"].label)
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        write_label(tmp_path / f"labels{suffix}", labels, SYNAPSE13)
        again = read_label(tmp_path / f"labels{suffix}")
        assert geometry(again) == geometry(labels)
        assert again.array.dtype == np.uint8
        assert np.array_equal(again.array, labels.array)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16], ids=["uint8", "uint16", "int16-sorted"])
def test_value_counts_match_numpy_unique_on_a_real_label_map(samples, monkeypatch, dtype):
    """uint8 and uint16 maps are counted by bincount in slabs (the chunk shrunk here to force several, ragged
    ones); other dtypes, with a negative value here, by np.unique."""
    array = read_label(samples["ct_abdomen"].label).array.astype(dtype)
    array[0, 0, :3] = {np.uint8: 255, np.uint16: 40000, np.int16: -7}[dtype]
    monkeypatch.setattr(labels_module, "_COUNT_CHUNK", 7 * array[0].size + 5)
    values, counts = np.unique(array, return_counts=True)
    assert value_counts(array) == dict(zip(values.tolist(), counts.tolist()))
    assert len(values) >= 10


def test_seg_nrrd_is_read_by_slicerio_with_names_values_colors_and_terminology(samples, tmp_path):
    labels = read_label(samples["ct_abdomen"].label)
    write_label(tmp_path / "organs.seg.nrrd", labels, SYNAPSE13)

    segmentation = slicerio.read_segmentation(str(tmp_path / "organs.seg.nrrd"))
    present = [label for label in SYNAPSE13.labels if label.name != "esophagus"]  # absent from sample A
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == [label.display_name for label in present]
    assert [s["labelValue"] for s in segments] == [label.value for label in present]
    assert [s["id"] for s in segments] == [label.name for label in present]
    np.testing.assert_allclose(segments[0]["color"], np.array((157, 108, 162)) / 255, atol=1e-6)
    assert segments[0]["terminology"]["type"] == ["SCT", "78961009", "Spleen"]
    assert segmentation["masterRepresentation"] == "Binary labelmap"
    # slicerio indexes voxels (i, j, k) = (x, y, z); ours are (z, y, x).
    assert np.array_equal(segmentation["voxels"].transpose(2, 1, 0), labels.array)
    np.testing.assert_allclose(segmentation["ijkToLPS"], labels.ijk_to_lps, rtol=0, atol=1e-9)


def test_seg_nrrd_read_back_gives_the_label_map(samples, tmp_path):
    labels = read_label(samples["ct_abdomen"].label)
    write_label(tmp_path / "organs.seg.nrrd", labels, SYNAPSE13)
    again = read_segmentation_labels(tmp_path / "organs.seg.nrrd", SYNAPSE13)
    assert geometry(again) == geometry(labels)
    assert np.array_equal(again.array, labels.array)


def test_seg_nrrd_with_include_absent_lists_every_organ(synthetic_labels, tmp_path):
    write_label(tmp_path / "organs.seg.nrrd", synthetic_labels, SYNAPSE13, include_absent=True)
    segmentation = slicerio.read_segmentation(str(tmp_path / "organs.seg.nrrd"), skip_voxels=True)
    assert [s["labelValue"] for s in segmentation["segments"]] == list(range(1, 14))


def test_slicer_segmentation_with_layers_is_matched_by_code_or_name(synthetic_labels, tmp_path):
    # Slicer-style file: overlapping segments in two layers, Slicer's own kidney terminology
    # (type "Kidney" + modifier), and a segment that is no organ of the table.
    liver = synthetic_labels.array == 6
    kidney = np.zeros_like(liver)
    kidney[2:5, 2:10, 2:10] = True  # overlaps the liver box
    tumour = np.zeros_like(liver)
    tumour[8:10, 0:3, 0:3] = True
    segmentation = slicerio.create_segmentation(liver.shape[::-1], synthetic_labels.ijk_to_lps)

    def terminology(code: str, meaning: str, **extra) -> dict:
        anatomy = "Segmentation category and type - 3D Slicer General Anatomy list"
        category = ["SCT", "123037004", "Anatomical Structure"]
        return {"contextName": anatomy, "category": category, "type": ["SCT", code, meaning], **extra}

    # Matched by its terminology code (the name says nothing).
    liver_segment = {"name": "Segment_1", "terminology": terminology("10200004", "Liver")}
    # Slicer's kidney is type "Kidney" + modifier "Left", no code of ours: matched by name.
    left = ["SCT", "7771000", "Left"]
    kidney_segment = {"name": "left kidney", "terminology": terminology("64033007", "Kidney", typeModifier=left)}
    slicerio.add_segment(segmentation, liver.transpose(2, 1, 0), liver_segment)
    slicerio.add_segment(segmentation, kidney.transpose(2, 1, 0), kidney_segment)
    slicerio.add_segment(segmentation, tumour.transpose(2, 1, 0), {"name": "Tumour"})
    assert segmentation["voxels"].ndim == 4  # the kidney went to a second layer
    slicerio.write_segmentation(str(tmp_path / "slicer.seg.nrrd"), segmentation)

    with pytest.warns(UserWarning, match="segments Tumour match no organ of label table 'synapse13'"):
        labels = read_segmentation_labels(tmp_path / "slicer.seg.nrrd", SYNAPSE13)

    expected = np.where(kidney, 3, np.where(liver, 6, 0))  # later segments win where they overlap
    assert np.array_equal(labels.array, expected)
    assert labels.same_grid(synthetic_labels)


def test_segmentation_without_any_organ_of_the_table(synthetic_labels, tmp_path):
    segmentation = slicerio.create_segmentation(synthetic_labels.shape[::-1], synthetic_labels.ijk_to_lps)
    for value, name in ((6, "ribs"), (12, "lungs")):
        slicerio.add_segment(segmentation, (synthetic_labels.array == value).transpose(2, 1, 0), {"name": name})
    slicerio.write_segmentation(str(tmp_path / "chest.seg.nrrd"), segmentation)
    problem = "none of its segments (ribs, lungs) matches an organ of label table 'synapse13'"
    with pytest.raises(ImageError, match=names_file_and_problem(tmp_path / "chest.seg.nrrd", problem)):
        read_segmentation_labels(tmp_path / "chest.seg.nrrd", SYNAPSE13)


def test_resample_label_to_aligns_a_flipped_label_map_by_physical_position(synthetic_labels):
    # Same physical voxels, y axis stored the other way round (sample B's situation).
    flipped_direction = np.array(synthetic_labels.direction).reshape(3, 3) @ np.diag([1.0, -1.0, 1.0])
    last_row = synthetic_labels.ijk_to_lps @ np.array([0, synthetic_labels.shape[1] - 1, 0, 1])
    flipped = Volume(
        synthetic_labels.array[:, ::-1, :].copy(),
        synthetic_labels.spacing,
        tuple(last_row[:3]),
        tuple(flipped_direction.ravel()),
    )
    aligned = resample_label_to(flipped, synthetic_labels)
    assert geometry(aligned) == geometry(synthetic_labels)
    assert np.array_equal(aligned.array, synthetic_labels.array)


def test_dicom_sample_labels_sit_on_the_organs(samples):
    ct = read_image(samples["ct_abdomen_dicom"].image)
    labels = read_label(samples["ct_abdomen_dicom"].label, reference=ct)
    for organ in ("liver", "spleen"):
        hu = ct.array[labels.array == SYNAPSE13[organ].value]
        assert 40 < hu.mean() < 150 and hu.std() < 40  # contrast-enhanced parenchyma, not fat or air


def test_affines_map_voxels_to_lps_and_ras(synthetic_ct):
    direction = np.array(synthetic_ct.direction).reshape(3, 3)
    lps = synthetic_ct.ijk_to_lps @ np.array([2, 3, 4, 1])
    expected = np.array(synthetic_ct.origin) + direction @ (np.array([2, 3, 4]) * synthetic_ct.spacing)
    np.testing.assert_allclose(lps[:3], expected, rtol=1e-12)
    np.testing.assert_allclose(synthetic_ct.ijk_to_ras @ [2, 3, 4, 1], lps * [-1, -1, 1, 1], rtol=1e-12)
    assert synthetic_ct.spacing_zyx == (2.9, 1.3, 0.7)


def test_same_grid_tolerates_round_off_but_not_a_shift(synthetic_ct):
    ct = synthetic_ct
    nudged = Volume(ct.array, ct.spacing, np.add(ct.origin, 1e-6), ct.direction)  # mm
    shifted = Volume(ct.array, ct.spacing, np.add(ct.origin, 0.01), ct.direction)
    cropped = Volume(ct.array[:, :, :-1], ct.spacing, ct.origin, ct.direction)
    assert ct.same_grid(nudged)
    assert not ct.same_grid(shifted)
    assert not ct.same_grid(cropped)


def test_with_array_refuses_another_shape(synthetic_ct):
    with pytest.raises(ValueError, match=r"with_array needs an array of shape \(10, 20, 30\), got \(20, 10, 30\)\."):
        synthetic_ct.with_array(np.zeros((20, 10, 30)))


def test_writers_are_atomic_and_leave_no_temporary_file(synthetic_ct, tmp_path):
    write_image(tmp_path / "sub" / "ct.nii.gz", synthetic_ct)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ct.nii.gz"]
    with pytest.raises(ValueError, match="a label map must hold integers"):
        write_label(tmp_path / "sub" / "labels.nii.gz", synthetic_ct)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ct.nii.gz"]


# ---------------------------------------------------------------- bad inputs: messages name the file and the problem


def names_file_and_problem(path: Path, problem: str) -> str:
    """A ``match=`` pattern: the message starts with the file, then says the problem (the advice after it may be
    reworded without breaking the test)."""
    return f"^{re.escape(f'{path}: {problem}')}"


def test_missing_file(tmp_path):
    path = tmp_path / "nothing.nii.gz"
    with pytest.raises(ImageError, match=names_file_and_problem(path, "no such file or folder")):
        read_image(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    with pytest.raises(ImageError, match=names_file_and_problem(path, "the file is empty (0 bytes)")):
        read_image(path)


def test_truncated_compressed_nifti(samples, tmp_path):
    data = samples["ct_abdomen"].image.read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=names_file_and_problem(path, "the file is truncated or damaged")):
        read_image(path)


def test_truncated_uncompressed_nifti(synthetic_ct, tmp_path):
    write_image(tmp_path / "ct.nii", synthetic_ct)
    data = (tmp_path / "ct.nii").read_bytes()
    path = tmp_path / "cut.nii"
    path.write_bytes(data[:1000])
    expected_bytes = 352 + 10 * 20 * 30 * 4  # header + float32 voxels
    problem = f"the file is truncated (1000 of {expected_bytes} bytes)"
    with pytest.raises(ImageError, match=names_file_and_problem(path, problem)):
        read_image(path)


def test_truncated_nrrd(samples, tmp_path):
    data = samples["ct_chest_nrrd"].image.read_bytes()
    path = tmp_path / "cut.nrrd"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=names_file_and_problem(path, "cannot be read as an image")) as err:
        read_image(path)
    assert "truncated or damaged" in str(err.value)
    assert "NRRD (.nrrd), NIfTI (.nii, .nii.gz)" in str(err.value)  # says which formats are read


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nrrd"
    path.write_text("just some text\n")
    with pytest.raises(ImageError, match=r"notes\.nrrd: cannot be read as an image"):
        read_image(path)


def test_2d_image(tmp_path):
    path = write_raw_nrrd(tmp_path / "slice.nrrd", np.zeros((20, 30)))
    with pytest.raises(ImageError, match=names_file_and_problem(path, "the image is 2D (size 30x20)")):
        read_image(path)


def test_single_slice_volume_counts_as_2d(synthetic_ct, tmp_path):
    write_image(tmp_path / "slice.nii.gz", Volume(synthetic_ct.array[:1], (1, 1, 1), (0, 0, 0), np.eye(3).ravel()))
    with pytest.raises(ImageError, match=r"slice\.nii\.gz: the image is 2D \(size 30x20x1\)"):
        read_image(tmp_path / "slice.nii.gz")


def test_4d_image(tmp_path):
    path = write_raw_nrrd(tmp_path / "series.nrrd", np.zeros((3, 6, 5, 4)))
    with pytest.raises(ImageError, match=names_file_and_problem(path, "the image is 4D (size 4x5x6x3)")):
        read_image(path)


def test_multi_component_image(tmp_path):
    path = write_raw_nrrd(tmp_path / "rgb.nrrd", np.zeros((6, 5, 4, 3)), kinds="vector domain domain domain")
    with pytest.raises(ImageError, match=names_file_and_problem(path, "the image has 3 components per voxel")):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_voxels(synthetic_ct, tmp_path, suffix, dtype):
    """NIfTI included: ITK's NIfTI reader turns NaN into 0, so the file's voxels are checked before reading."""
    array = synthetic_ct.array.astype(dtype)
    array[0, 0, :3] = np.nan
    array[1, 1, 1] = np.inf
    array[-1, -1, -1] = -np.inf  # the last voxel: the scan reads to the end of the data
    path = tmp_path / f"nan{suffix}"
    write_image(path, synthetic_ct.with_array(array))
    with pytest.raises(ImageError, match=names_file_and_problem(path, "5 voxels are NaN or infinite")):
        read_image(path)
    with pytest.raises(ImageError, match="NaN or infinite"):
        read_label(path)


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (-400.0, 800.0)])
def test_non_ct_intensities_warn(synthetic_ct, tmp_path, low, high):
    array = np.linspace(low, high, synthetic_ct.array.size, dtype=np.float32).reshape(synthetic_ct.shape)
    path = tmp_path / "mr.nrrd"
    write_image(path, synthetic_ct.with_array(array))
    with pytest.warns(NotCTWarning) as record:
        volume = read_image(path)
    message = str(record[0].message)
    problem = f"intensities range from {low:g} to {high:g}, with no voxel below -500 HU"
    assert re.match(names_file_and_problem(path, problem), message), message
    assert "does not look like a CT" in message
    assert np.array_equal(volume.array, array)


def test_ct_intensities_do_not_warn(synthetic_ct, tmp_path, recwarn):
    write_image(tmp_path / "ct.nrrd", synthetic_ct)
    read_image(tmp_path / "ct.nrrd")
    assert not [w for w in recwarn if issubclass(w.category, NotCTWarning)]


@pytest.mark.parametrize("content", [None, "readme.txt"])
def test_dicom_folder_without_images(tmp_path, content):
    folder = tmp_path / "dicom"
    folder.mkdir()
    if content:
        (folder / content).write_text("not a DICOM file")
    with pytest.raises(ImageError, match=names_file_and_problem(folder, "no DICOM image series in this folder")):
        read_image(folder)


def test_dicom_folder_with_two_series_reads_the_largest_and_logs_it(samples, tmp_path, caplog):
    split_dicom_series(samples["ct_abdomen_dicom"].image, tmp_path / "dicom", moved=5)
    with caplog.at_level(logging.WARNING, logger="scdlcore.io"):
        ct = read_image(tmp_path / "dicom")
    assert ct.shape == (15, 512, 512)
    assert caplog.messages == [
        f"{tmp_path / 'dicom'} holds 2 DICOM series; reading series (no UID) (CT, 15 files, 'CT Body 3.0'). "
        "Not read: series 1.2.3.4 (CT, 5 files, 'CT Body 3.0')."
    ]


@pytest.mark.parametrize("damage", ["remove", "truncate", "garbage"])
def test_a_dicom_series_with_a_missing_or_damaged_slice_is_refused(samples, tmp_path, damage):
    """ITK only warns about the gap and reads the series onto a wrong, evenly spaced grid."""
    folder = Path(shutil.copytree(samples["ct_abdomen_dicom"].image, tmp_path / "dicom"))
    victim = sorted(folder.iterdir())[10]
    if damage == "remove":
        victim.unlink()
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:2000])
    else:
        victim.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 4000)
    # GDCM leaves a damaged file out of the series, so every damage shows as the gap it leaves.
    with pytest.raises(
        ImageError,
        match=rf"^{re.escape(str(folder))}: the slices are not evenly spaced \(2 mm apart, "
        r"but 4 mm between .+\): a slice is missing or repeated",
    ):
        read_image(folder)


class _SliceTags:
    """The per-slice tags of a series as SimpleITK's ImageSeriesReader hands them out (a stand-in for its tags only)."""

    def __init__(self, z_positions):
        self.z = list(z_positions)

    def GetMetaData(self, index, key):
        return {"0020|0032": f"-100\\-120\\{self.z[index]}", "0020|0037": "1\\0\\0\\0\\1\\0"}[key]


@pytest.mark.parametrize(
    ("z", "problem"),
    [
        ([round(-100 - 0.625 * i, 2) for i in range(12)], None),  # 0.625 mm written with 2 decimals: 0.62 / 0.63 gaps
        ([-100 - 0.625 * i for i in range(12) if i != 6], "0.625 mm apart, but 1.25 mm between s5.dcm and s6.dcm"),
        ([-100.0] * 12, "its 12 slices lie at one position"),
    ],
)
def test_slice_positions_tolerate_rounding_and_catch_gaps(tmp_path, z, problem):
    files = [f"s{index}.dcm" for index in range(len(z))]
    if problem is None:
        io_read._check_slice_positions(tmp_path, files, _SliceTags(z))
    else:
        with pytest.raises(ImageError, match=re.escape(problem)):
            io_read._check_slice_positions(tmp_path, files, _SliceTags(z))


def test_dicom_folder_prefers_a_ct_series_over_a_larger_other_one(samples, tmp_path):
    split_dicom_series(samples["ct_abdomen_dicom"].image, tmp_path / "dicom", moved=5, modality_of_rest=b"PT")
    assert read_image(tmp_path / "dicom").shape == (5, 512, 512)


def test_label_on_another_grid(samples):
    chest = read_image(samples["ct_chest_cta"].image)
    path = samples["ct_abdomen"].label
    problem = "the label map is not on the grid of its image"
    with pytest.raises(ImageError, match=names_file_and_problem(path, problem)) as err:
        read_label(path, reference=chest)
    for difference in (
        "size (122, 101, 112) vs (233, 167, 191) voxels",
        "spacing (3, 3, 3) vs (1.5, 1.5, 1.5) mm",
        "direction (-1, 0, 0, 0, -1, 0, 0, 0, 1) vs (1, 0, 0, 0, 1, 0, 0, 0, 1)",
    ):
        assert difference in str(err.value)  # it says how the grids differ


def test_label_with_fractional_values(synthetic_ct, tmp_path):
    write_image(tmp_path / "probs.nrrd", synthetic_ct.with_array(np.full(synthetic_ct.shape, 0.5, np.float32)))
    problem = "a label map must hold whole numbers, but it has fractional"
    with pytest.raises(ImageError, match=names_file_and_problem(tmp_path / "probs.nrrd", problem)):
        read_label(tmp_path / "probs.nrrd")


def test_label_with_negative_values(synthetic_ct, tmp_path):
    write_image(tmp_path / "ct.nrrd", synthetic_ct.with_array(np.round(synthetic_ct.array)))
    with pytest.raises(ImageError, match=r"ct\.nrrd: label values must be within 0\.\.65535, got -10\d\d\.\.\d+\. Is"):
        read_label(tmp_path / "ct.nrrd")


def test_write_label_refuses_values_outside_the_table(synthetic_labels, tmp_path):
    array = synthetic_labels.array.copy()
    array[array == 12] = 40
    labels = synthetic_labels.with_array(array)
    path = tmp_path / "labels.seg.nrrd"
    problem = "label values [40] are not in label table 'synapse13'"
    with pytest.raises(ValueError, match=names_file_and_problem(path, problem)):
        write_label(path, labels, SYNAPSE13)
    assert not path.exists()


def test_unsupported_output_type(synthetic_ct, tmp_path):
    problem = "cannot write this file type"
    with pytest.raises(ValueError, match=names_file_and_problem(tmp_path / "ct.png", problem)) as err:
        write_image(tmp_path / "ct.png", synthetic_ct)
    assert ".nii.gz" in str(err.value)  # says which types it writes


def test_plain_label_map_is_not_a_slicer_segmentation(synthetic_labels, tmp_path):
    write_label(tmp_path / "labels.nrrd", synthetic_labels)
    problem = "not a 3D Slicer segmentation file"
    with pytest.raises(ImageError, match=names_file_and_problem(tmp_path / "labels.nrrd", problem)):
        read_segmentation_labels(tmp_path / "labels.nrrd", SYNAPSE13)


def test_case_names_drop_the_image_suffix_and_a_folder_lists_its_cases(tmp_path):
    names = {
        "ct01.nii.gz": "ct01",
        "ct01.seg.nrrd": "ct01",
        "CT02.NRRD": "CT02",
        "a.b.mha": "a.b",
        ".nii.gz": ".nii.gz",
    }
    assert {name: case_name(tmp_path / name) for name in names} == names
    for name in ("b.nii", "a.nrrd", ".hidden.nrrd", "notes.txt", "overview.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "series").mkdir()  # a DICOM series folder
    (tmp_path / "c.seg.nrrd").write_bytes(b"x")  # a segmentation: a label map, never a CT
    assert files_by_case(tmp_path) == {"a": tmp_path / "a.nrrd", "b": tmp_path / "b.nii", "c": tmp_path / "c.seg.nrrd"}
    assert list(files_by_case(tmp_path, cts=True)) == ["a", "b", "series"]
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(ImageError, match=r": a.nii.gz and a.nrrd are both case 'a'; keep one.$"):
        files_by_case(tmp_path)
