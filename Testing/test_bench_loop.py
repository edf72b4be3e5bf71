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
import bench_loop

from scdlcore.io.read import read_image
from scdlcore.labels import SYNAPSE13


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


def test_the_table_pairs_each_fine_tune_with_m0_by_seed_and_counts_kept_parents():
    def entry(model: str, dice: float, on_a: float, **fields) -> dict:
        organs = {"liver": dice, "aorta": dice / 2}
        summary = {"dice": organs, "mean_dice": sum(organs.values()) / 2, "mean_hd95": float("nan")}
        voxels = {organ: {"reference_voxels": 100} for organ in organs}
        return {
            "model": model,
            "summary": summary,
            "scores": {"organs": voxels},
            "other_summary": {"mean_dice": on_a},
            **fields,
        }

    def fine_tune(model: str, dice: float, on_a: float, kept: bool) -> dict:
        fit_after = {"liver": 0.5 if kept else 0.6}
        return entry(
            model,
            dice,
            on_a,
            parent="m@0",
            corrections=["first half, partial"],
            rehearsal=True,
            train_seconds=120.0,
            fit_before={"liver": 0.5},
            fit_after=fit_after,
        )

    runs = [
        {"seed": 0, "models": {"M0": entry("m@0", 0.4, 0.8), "M1 (partial)": fine_tune("m@1", 0.6, 0.7, False)}},
        {"seed": 1, "models": {"M0": entry("m@0", 0.4, 0.8), "M1 (partial)": fine_tune("m@2", 0.4, 0.8, True)}},
    ]
    span = {"slices": [0, 4], "z_mm": [0.0, 8.0]}
    meta = {
        "command": "python bench_loop.py",
        "machine": "a CPU",
        "torch": "2",
        "date": "2026-12-04",
        "smoke": False,
        "budget": {"m0_bundle": "a bundle", "finetune_steps": 120},
        "split": {"first_quarter": span, "second_quarter": span, "scored": span},
    }
    table = bench_loop._markdown(runs, meta)
    # mean Dice 0.3 (M0) -> 0.45 and 0.3: +0.15 and 0 paired by seed (std ddof 1); on A -0.1 and 0; kept in seed 1
    assert "| M1 (partial) | M0 | first half, partial | A | 0.375 ± 0.106 | +0.075 ± 0.106 |" in table
    assert "| 0.750 ± 0.071 | -0.050 ± 0.071 | 2.0 | 1 of 2 |" in table
    assert "| M0 | - | - | - | 0.300 | - |" in table  # one model: no spread
