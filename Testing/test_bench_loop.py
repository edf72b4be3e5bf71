"""``bench_loop.py``'s cuts of the corrected CT and its partial correction, on the real CT B.

Nothing is trained here (``bench_loop.py --smoke`` runs the whole protocol): these tests cover that the slabs
are B's own slices at their own positions, that they tile B, and what a partial correction keeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "Benchmarks"))
import bench_loop  # noqa: E402

from scdlcore.io.read import read_image  # noqa: E402
from scdlcore.labels import SYNAPSE13  # noqa: E402


@pytest.fixture(scope="module")
def ct_b(samples):
    return read_image(samples["ct_abdomen_dicom"].image)


def test_the_slabs_tile_the_ct_with_its_own_slices_at_their_own_positions(ct_b):
    slabs = bench_loop.Slabs.of(ct_b)
    assert [s.shape[0] for s in (slabs.first_quarter, slabs.second_quarter, slabs.scored)] == [5, 5, 10]
    np.testing.assert_array_equal(
        np.concatenate([slabs.first_quarter.array, slabs.second_quarter.array]), slabs.first_half.array
    )
    np.testing.assert_array_equal(np.concatenate([slabs.first_half.array, slabs.scored.array]), ct_b.array)
    for name, first in (("first_quarter", 0), ("second_quarter", 5), ("scored", 10)):
        slab = getattr(slabs, name)
        corner = np.array([0.0, 0.0, first, 1.0])
        np.testing.assert_allclose(slab.ijk_to_lps[:, 3], ct_b.ijk_to_lps @ corner)  # where B has that slice
        assert bench_loop._slab_extent(ct_b, slab)["slices"] == [first, first + slab.shape[0] - 1]


def test_slab_bounds_that_leave_an_empty_slab_are_refused(ct_b):
    with pytest.raises(ValueError, match="non-empty"):
        bench_loop.split_slices(ct_b, 10, 10)
    with pytest.raises(ValueError, match="non-empty"):
        bench_loop.split_slices(ct_b, ct_b.shape[0])


def test_a_partial_correction_fixes_the_reviewed_organs_and_keeps_the_models_others():
    liver, spleen, aorta = (SYNAPSE13[name].value for name in ("liver", "spleen", "aorta"))
    predicted = np.array([[[liver, liver, aorta, 0, spleen]]])
    reference = np.array([[[liver, 0, 0, aorta, liver]]])
    corrected = bench_loop.partial_correction(predicted, reference, ("liver", "spleen"), SYNAPSE13)
    # the reference's liver; the model's liver and spleen that the reference lacks removed; its aorta kept
    # where it drew one, the reference's aorta (unreviewed) not added
    np.testing.assert_array_equal(corrected, [[[liver, 0, aorta, 0, liver]]])
