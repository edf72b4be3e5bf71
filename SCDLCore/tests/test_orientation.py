"""The canonical orientation: the same CT stored in any axis order reaches the network as the same array.

Real SimpleITK I/O on the real sample CTs: each twin is the same physical image written to a file with its
array flipped and/or transposed (and its geometry changed to match), then read back as a user's file would be.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from scdlcore.io.read import read_image, read_label
from scdlcore.io.volume import Volume
from scdlcore.io.write import write_image
from scdlcore.preprocess import CANONICAL_ORIENTATION, Preprocessing, Reorientation, model_index, orientation_directions

FLIPS = list(itertools.product([False, True], repeat=3))
PERMUTATIONS = list(itertools.permutations(range(3)))
# The 48 axis orders, about a second each on a CPU: the fast tier keeps two (a flip, a transpose with
# flips), the rest are marked slow.
FAST_ORDERS = {((0, 1, 2), (False, False, True)), ((2, 0, 1), (True, False, True))}
EVERY_ORDER_SAMPLED_FAST = [
    pytest.param(
        axes,
        flips,
        marks=() if (axes, flips) in FAST_ORDERS else pytest.mark.slow,
        id=f"axes{''.join(map(str, axes))}-flips{''.join(str(int(f)) for f in flips)}",
    )
    for flips in FLIPS
    for axes in PERMUTATIONS
]
# Spacings that make every axis resample (up and down), so the twins' equality covers the interpolation too.
PLAN = Preprocessing(spacing=(2.1, 1.7, 2.6), hu_window=(-150.0, 450.0))


def twin(volume: Volume, axes: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> Volume:
    """The same physical image with its array transposed by ``axes`` and reversed along ``flips``."""
    return Reorientation(axes, flips).volume(volume)


def lps_of_voxel(volume: Volume, index_zyx) -> np.ndarray:
    return (volume.ijk_to_lps @ np.array([*index_zyx[::-1], 1.0]))[:3]


def test_ras_is_the_canonical_orientation_and_codes_are_checked():
    assert CANONICAL_ORIENTATION == "RAS"
    np.testing.assert_array_equal(orientation_directions("RAS"), np.diag([-1.0, -1.0, 1.0]))  # LPS columns
    np.testing.assert_array_equal(orientation_directions("lps"), np.eye(3))
    for bad in ("RAR", "RA", "XYZ", "RASS", ""):
        with pytest.raises(ValueError, match="is not three letters naming each body axis once"):
            orientation_directions(bad)


@pytest.mark.parametrize("axes", PERMUTATIONS)
@pytest.mark.parametrize("flips", FLIPS)
def test_a_twin_is_the_same_physical_image(samples, axes, flips):
    ct = read_image(samples["ct_abdomen"].image)
    other = twin(ct, axes, flips)
    # A voxel of the twin lies where the same voxel value lies in the original.
    index = np.array([7, 40, 90])
    source = Reorientation(axes, flips)
    back = np.zeros(ct.shape, bool)
    back[tuple(index)] = True
    at = tuple(int(i) for i in np.argwhere(source.apply(back))[0])
    assert other.array[at] == ct.array[tuple(index)]
    np.testing.assert_allclose(lps_of_voxel(other, at), lps_of_voxel(ct, index), atol=1e-9)


@pytest.mark.parametrize(("axes", "flips"), EVERY_ORDER_SAMPLED_FAST)
def test_every_axis_order_gives_a_bit_identical_network_input(samples, tmp_path, axes, flips):
    ct = read_image(samples["ct_abdomen_dicom"].image)  # 512 x 512 x 20 at 0.98 x 0.98 x 2 mm, direction identity
    path = tmp_path / "twin.nrrd"
    write_image(path, twin(ct, axes, flips))
    expected = PLAN.prepare(ct)
    prepared = PLAN.prepare(read_image(path))
    assert prepared.grid.shape == expected.grid.shape
    np.testing.assert_array_equal(prepared.image(), expected.image())
    np.testing.assert_allclose(prepared.grid.direction, np.diag([-1.0, -1.0, 1.0]).ravel(), atol=1e-12)


def test_nifti_twins_of_ct_abdomen_give_a_bit_identical_network_input(samples, tmp_path):
    """NIfTI stores geometry at float32 precision: the network input must not depend on that rounding."""
    ct = read_image(samples["ct_abdomen"].image)  # direction diag(-1, -1, 1): already RAS
    expected = PLAN.prepare(ct).image()
    assert PLAN.prepare(ct).reorientation.is_identity
    for number, (axes, flips) in enumerate([((0, 1, 2), (False, False, True)), ((2, 0, 1), (True, True, False))]):
        path = tmp_path / f"twin{number}.nii.gz"
        write_image(path, twin(ct, axes, flips))
        np.testing.assert_array_equal(PLAN.prepare(read_image(path)).image(), expected)


def test_labels_of_a_flipped_twin_reach_the_model_grid_identically(samples, tmp_path):
    sample = samples["ct_abdomen"]
    ct, label = read_image(sample.image), read_label(sample.label)
    expected = PLAN.prepare(ct).labels(label)
    axes, flips = (1, 0, 2), (True, False, True)
    write_image(tmp_path / "ct.nrrd", twin(ct, axes, flips))
    write_image(tmp_path / "label.nrrd", twin(label, axes, flips))
    twin_ct = read_image(tmp_path / "ct.nrrd")
    got = PLAN.prepare(twin_ct).labels(read_label(tmp_path / "label.nrrd", reference=twin_ct))
    assert len(np.unique(expected)) >= 10  # the organs are there
    np.testing.assert_array_equal(got, expected)


def test_undo_inverts_apply_for_every_axis_order():
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for axes in itertools.permutations(range(3)):
        for flips in FLIPS:
            reorientation = Reorientation(axes, flips)  # type: ignore[arg-type]
            np.testing.assert_array_equal(reorientation.undo(reorientation.apply(array)), array)


def test_an_oblique_ct_takes_the_nearest_axis_order(synthetic_ct):
    # synthetic_ct's direction is oblique (tilted about z): its axes are nearest to L, P, S.
    columns = np.array(synthetic_ct.direction).reshape(3, 3)
    assert not np.allclose(np.abs(columns), np.eye(3))
    reoriented = Reorientation.to("RAS", synthetic_ct.direction).volume(synthetic_ct)
    cosines = np.diag(orientation_directions("RAS").T @ np.array(reoriented.direction).reshape(3, 3))
    assert (cosines > 0.8).all(), cosines  # every canonical axis close to R, A and S
    centre = np.array(synthetic_ct.shape) // 2
    moved = Reorientation.to("RAS", synthetic_ct.direction)
    flipped_centre = [n - 1 - c if f else c for n, c, f in zip(reoriented.shape, centre[list(moved.axes)], moved.flips)]
    np.testing.assert_allclose(lps_of_voxel(reoriented, flipped_centre), lps_of_voxel(synthetic_ct, centre), atol=1e-9)


def test_the_way_back_inverts_the_resampling_index_map(samples):
    prepared = PLAN.prepare(read_image(samples["ct_abdomen_dicom"].image))
    scale, offset = prepared.index_map()
    ratio = np.array(prepared.grid.spacing_zyx) / np.array(prepared.oriented_spacing[::-1])
    for axis in range(3):
        model = model_index(prepared.grid.shape[axis], ratio[axis])  # input index each model voxel samples
        np.testing.assert_allclose(offset[axis] + scale[axis] * model, np.arange(prepared.grid.shape[axis]), atol=1e-9)
