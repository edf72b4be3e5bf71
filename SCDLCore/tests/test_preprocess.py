"""scdlcore.preprocess: HU window values, resampling geometry and round trips, body crop."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from scdlcore.io.read import read_image, read_label
from scdlcore.io.volume import Volume, resample_onto
from scdlcore.labels import SYNAPSE13
from scdlcore.preprocess import BODY_SEARCH_MM, _all_above, body_bbox, hu_window, resample_to_spacing


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def geometry(volume: Volume) -> tuple:
    return volume.shape, volume.spacing, volume.origin, volume.direction


# HU in -> value out, default window (-125, 275): (x + 125) / 400 clipped to [0, 1]
HU_WINDOW_CASES = [
    (-1000.0, 0.0),  # air, clipped
    (-125.0, 0.0),  # window low
    (-100.0, 0.0625),  # fat
    (0.0, 0.3125),  # water
    (60.0, 0.4625),  # liver
    (75.0, 0.5),  # window centre
    (275.0, 1.0),  # window high
    (1000.0, 1.0),  # bone, clipped
]


@pytest.mark.parametrize(("hu", "expected"), HU_WINDOW_CASES)
def test_hu_window_default_values(hu, expected):
    out = hu_window(np.array([[[hu]]], dtype=np.float32))  # (1, 1, 1)
    assert out.dtype == np.float32
    assert out.shape == (1, 1, 1)
    assert out[0, 0, 0] == pytest.approx(expected, abs=1e-7)


def test_hu_window_custom_window_and_integer_input():
    out = hu_window(np.array([-1000, -160, 0, 240, 3000], dtype=np.int16), window=(-160.0, 240.0))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.4, 1.0, 1.0], atol=1e-7)
    assert out.dtype == np.float32


def test_hu_window_refuses_an_empty_window():
    with pytest.raises(ValueError, match=r"hu_window needs low < high HU, got window=\(275\.0, -125\.0\)\."):
        hu_window(np.zeros(3), window=(275.0, -125.0))


def test_resample_to_spacing_covers_the_same_physical_extent(samples):
    ct = read_image(samples["ct_abdomen"].image)  # (112, 101, 122) at 3 mm, direction diag(-1, -1, 1)
    fine = resample_to_spacing(ct, (1.5, 1.5, 1.5), is_label=False)
    assert fine.shape == (224, 202, 244)
    assert fine.spacing == (1.5, 1.5, 1.5)
    assert fine.direction == ct.direction
    assert fine.array.dtype == np.float32
    # The outer corner of the first voxel stays put: origin moves 0.75 mm inward along each axis.
    first_corner = ct.ijk_to_lps @ [-0.5, -0.5, -0.5, 1]
    np.testing.assert_allclose(fine.ijk_to_lps @ [-0.5, -0.5, -0.5, 1], first_corner, atol=1e-9)
    last_corner = ct.ijk_to_lps @ [121.5, 100.5, 111.5, 1]
    np.testing.assert_allclose(fine.ijk_to_lps @ [243.5, 201.5, 223.5, 1], last_corner, atol=1e-9)
    assert abs(float(fine.array.mean()) - float(ct.array.mean())) < 2.0  # HU


def test_label_round_trip_through_1_5_mm_keeps_every_organ(samples):
    labels = read_label(samples["ct_abdomen"].label)  # 3 mm; smallest organ: right adrenal, 166 voxels
    fine = resample_to_spacing(labels, (1.5, 1.5, 1.5), is_label=True)
    back = resample_onto(fine, labels, is_label=True)
    assert fine.array.dtype == back.array.dtype == np.uint8
    assert geometry(back) == geometry(labels)
    for label in SYNAPSE13.labels:
        organ = labels.array == label.value
        if organ.any():  # every organ present has >= 166 voxels
            assert dice(organ, back.array == label.value) >= 0.99, label.name


def test_label_round_trip_through_a_coarser_grid_keeps_organs_roughly(samples):
    # Sample B at 0.98 x 0.98 x 2 mm -> 1.5 mm -> back: nearest neighbour loses thin borders.
    labels = read_label(samples["ct_abdomen_dicom"].label)  # smallest organ present: 1,254 voxels
    back = resample_onto(resample_to_spacing(labels, (1.5, 1.5, 1.5), is_label=True), labels, is_label=True)
    assert geometry(back) == geometry(labels)
    for label in SYNAPSE13.labels:
        organ = labels.array == label.value
        if organ.any():
            assert dice(organ, back.array == label.value) >= 0.85, label.name


def test_oblique_round_trip_restores_the_exact_grid_and_labels(synthetic_labels):
    coarse = resample_to_spacing(synthetic_labels, (1.0, 1.0, 1.0), is_label=True)
    assert coarse.shape == (29, 26, 21)  # round(size * spacing / 1 mm), array order
    assert coarse.direction == synthetic_labels.direction
    back = resample_onto(coarse, synthetic_labels, is_label=True)
    assert back.shape == synthetic_labels.shape
    assert back.spacing == synthetic_labels.spacing
    assert back.origin == synthetic_labels.origin
    assert back.direction == synthetic_labels.direction
    # 0.7 and 1.3 mm axes go to 1 mm, z goes from 2.9 to 1 mm: boxes survive with small border losses.
    for value in (6, 12):
        assert dice(synthetic_labels.array == value, back.array == value) >= 0.8


def test_resample_image_is_linear_in_physical_space(synthetic_ct):
    # A linear ramp along LPS x is reproduced exactly by linear interpolation (inside the volume).
    lps = np.einsum("ij,jzyx->izyx", synthetic_ct.ijk_to_lps[:3], _ijk_grid(synthetic_ct.shape))
    ramp = synthetic_ct.with_array((10.0 * lps[0]).astype(np.float32))
    resampled = resample_to_spacing(ramp, (1.1, 1.1, 1.1), is_label=False)
    lps_new = np.einsum("ij,jzyx->izyx", resampled.ijk_to_lps[:3], _ijk_grid(resampled.shape))
    index = _continuous_index(ramp, lps_new)  # (3, D', H', W') in the input's voxels
    last = np.array(ramp.shape[::-1], dtype=float).reshape(3, 1, 1, 1) - 1
    inside = np.all((index >= 0) & (index <= last), axis=0)
    assert inside.sum() > 100
    np.testing.assert_allclose(resampled.array[inside], 10.0 * lps_new[0][inside], atol=1e-3)


def test_same_spacing_returns_the_volume_itself(synthetic_ct):
    assert resample_to_spacing(synthetic_ct, synthetic_ct.spacing, is_label=False) is synthetic_ct


@pytest.mark.parametrize("spacing", [(1.0, 0.0, 1.0), (1.0, 1.0), (1.0, -2.0, 1.0), (1.0, float("nan"), 1.0)])
def test_resample_to_spacing_refuses_bad_spacing(synthetic_ct, spacing):
    with pytest.raises(ValueError, match=r"spacing must be three positive \(x, y, z\) mm values, got"):
        resample_to_spacing(synthetic_ct, spacing, is_label=False)


def test_body_bbox_finds_the_body_and_ignores_a_separate_table(synthetic_ct):
    array = np.full(synthetic_ct.shape, -1000.0, dtype=np.float32)
    array[2:8, 5:15, 6:25] = 40.0  # body
    array[:, 18:19, :] = 300.0  # scanner table, not touching the body
    bbox = body_bbox(synthetic_ct.with_array(array), margin_mm=2.0)
    # Margins in voxels: ceil(2 / 2.9) = 1 (z), ceil(2 / 1.3) = 2 (y), ceil(2 / 0.7) = 3 (x). The search blocks are
    # 1 (z), 3 (y) and 5 (x) voxels (4 mm): whole-body blocks y 6:15 and x 10:25, one more block each side.
    assert bbox == (slice(1, 9), slice(1, 20), slice(2, 30))


def test_body_bbox_lies_within_the_voxelwise_box_plus_the_search_spacing(samples):
    """The block search may cut off thin parts of the body (here: tissue at the front, joined by thin contacts),
    never organs (see the test above), and never reaches more than one block beyond the voxelwise box."""
    ct = read_image(samples["ct_abdomen_dicom"].image)  # 0.98 x 0.98 x 2 mm: blocks of 4, 4 and 2 voxels
    box = body_bbox(ct, margin_mm=0.0)
    body = ndimage.label(ct.array > -500.0)[0]
    exact = ndimage.find_objects((body == np.argmax(np.bincount(body.ravel())[1:]) + 1).astype(np.uint8))[0]
    for found, true, spacing in zip(box, exact, ct.spacing_zyx):
        assert (true.start - found.start) * spacing <= BODY_SEARCH_MM and (
            found.stop - true.stop
        ) * spacing <= BODY_SEARCH_MM


def test_block_search_marks_exactly_the_blocks_above_the_threshold(samples):
    """On a real CT cut to a ragged size (partial blocks at the far ends are dropped), against a block-by-block loop."""
    array = read_image(samples["ct_abdomen"].image).array[:47, 5:66, 3:100]
    steps = [3, 2, 4]
    found = _all_above(array, steps, -500.0)
    expected = np.zeros([n // step for n, step in zip(array.shape, steps)], dtype=bool)
    for block in np.ndindex(*expected.shape):
        expected[block] = (
            array[tuple(slice(i * step, (i + 1) * step) for i, step in zip(block, steps))] > -500.0
        ).all()
    np.testing.assert_array_equal(found, expected)
    assert 0.05 < expected.mean() < 0.95  # body and air both


def test_body_bbox_finds_a_body_thinner_than_the_search_spacing(synthetic_ct):
    array = np.full(synthetic_ct.shape, -1000.0, dtype=np.float32)
    array[4, 7, 11] = 40.0  # one voxel, between the 4 mm search samples in y and x
    assert body_bbox(synthetic_ct.with_array(array), margin_mm=0.0) == (slice(4, 5), slice(7, 8), slice(11, 12))


def test_body_bbox_margin_is_clipped_to_the_image(synthetic_ct):
    assert body_bbox(synthetic_ct, margin_mm=100.0) == (slice(0, 10), slice(0, 20), slice(0, 30))


def test_body_bbox_on_a_real_ct_contains_every_organ(samples):
    ct = read_image(samples["ct_abdomen_dicom"].image)
    labels = read_label(samples["ct_abdomen_dicom"].label, reference=ct)
    bbox = body_bbox(ct)
    assert np.count_nonzero(labels.array[bbox]) == np.count_nonzero(labels.array)
    assert ct.array[bbox].size < 0.6 * ct.array.size  # air and table cropped away


def test_body_bbox_without_body(synthetic_ct):
    with pytest.raises(ValueError) as err:
        body_bbox(synthetic_ct.with_array(np.full(synthetic_ct.shape, -1000.0, dtype=np.float32)))
    assert str(err.value) == "No voxel above -500 HU: the image holds no body. Is it a CT in Hounsfield units?"


def _ijk_grid(shape: tuple[int, int, int]) -> np.ndarray:
    """(4, D, H, W) homogeneous voxel indices (i, j, k, 1) = (x, y, z, 1)."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return np.stack([x, y, z, np.ones_like(x)]).astype(np.float64)


def _continuous_index(volume: Volume, lps: np.ndarray) -> np.ndarray:
    """(3, ...) continuous voxel index (i, j, k) of LPS points (3, ...)."""
    inverse = np.linalg.inv(volume.ijk_to_lps)
    return np.einsum("ij,j...->i...", inverse[:3, :3], lps) + inverse[:3, 3].reshape(3, *([1] * (lps.ndim - 1)))
