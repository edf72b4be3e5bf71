"""The contrast phase augmentation: organs move to the HU of a drawn phase, borders blend, the rest stays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scdlcore.dataset.store import DatasetStore
from scdlcore.labels import SYNAPSE13
from scdlcore.training.cache import prepare_case
from scdlcore.training.config import DataConfig
from scdlcore.training.contrast import PHASE_HU, PHASES, ContrastPhase, class_hu_rows

WINDOW = (-150.0, 450.0)
AORTA, KIDNEY, LIVER = (SYNAPSE13.class_index(n) for n in ("aorta", "kidney_right", "liver"))


def to_window(hu: float) -> float:
    return (hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def patch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (1, 1, 24, 24, 24) patch at 40 HU with an aorta cube, a kidney cube and background at -100 HU."""
    labels = torch.zeros((1, 24, 24, 24), dtype=torch.long)
    labels[0, 4:10, 4:10, 4:10] = AORTA
    labels[0, 14:22, 14:22, 14:22] = KIDNEY
    images = torch.full((1, 1, 24, 24, 24), to_window(-100.0))
    images[0, 0][labels[0] > 0] = to_window(40.0)
    class_hu = class_hu_rows([{AORTA: 40.0, KIDNEY: 40.0}], SYNAPSE13.num_classes)
    return images, labels, class_hu


def test_every_organ_moves_into_its_range_of_the_drawn_phase():
    images, labels, class_hu = patch()
    augment = ContrastPhase(SYNAPSE13, WINDOW, prob=1.0)
    seen_phases = set()
    for seed in range(12):
        out = augment(images, labels, class_hu, torch.Generator().manual_seed(seed))
        hu = out[0, 0] * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
        aorta, kidney = float(hu[6, 6, 6]), float(hu[18, 18, 18])  # cube centres: no blur reaches them
        matches = [
            p
            for p in range(len(PHASES))
            if PHASE_HU["aorta"][p][0] - 1e-3 <= aorta <= PHASE_HU["aorta"][p][1] + 1e-3
            and PHASE_HU["kidney_right"][p][0] - 1e-3 <= kidney <= PHASE_HU["kidney_right"][p][1] + 1e-3
        ]
        assert matches, (aorta, kidney)  # one phase explains both organs
        seen_phases.update(matches)
        assert float(out[0, 0, 0, 23, 0]) == pytest.approx(to_window(-100.0))  # background far away: unchanged
    assert len(seen_phases) >= 3  # the draws cover the phases


def test_borders_blend_instead_of_stepping():
    images, labels, class_hu = patch()
    augment = ContrastPhase(SYNAPSE13, WINDOW, prob=1.0)
    shifts = [
        (augment(images, labels, class_hu, torch.Generator().manual_seed(seed)) - images)[0, 0] for seed in range(12)
    ]
    shift = max(shifts, key=lambda s: float(s[6, 6, 6]))  # an enhanced aorta: a large step to blend
    inside, edge, outside = float(shift[6, 6, 6]), float(shift[6, 6, 9]), float(shift[6, 6, 10])
    assert inside > 0.2  # over 120 HU
    assert abs(outside) > 0.0 and abs(outside) < abs(edge) < abs(inside)  # a ramp across the border


def test_no_shift_without_probability_or_known_organ_hu():
    images, labels, class_hu = patch()
    unchanged = ContrastPhase(SYNAPSE13, WINDOW, prob=0.0)(images, labels, class_hu, torch.Generator().manual_seed(0))
    torch.testing.assert_close(unchanged, images)
    unknown = torch.full_like(class_hu, math.nan)
    out = ContrastPhase(SYNAPSE13, WINDOW, prob=1.0)(images, labels, unknown, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images)


def test_the_draws_are_fixed_by_the_generator_seed():
    images, labels, class_hu = patch()
    augment = ContrastPhase(SYNAPSE13, WINDOW, prob=1.0)
    first = augment(images, labels, class_hu, torch.Generator().manual_seed(5))
    torch.testing.assert_close(augment(images, labels, class_hu, torch.Generator().manual_seed(5)), first)


def test_prepared_training_cases_carry_their_organs_real_median_hu(samples, tmp_path):
    """ct_abdomen is a non-contrast CT: its liver has a median of about 46 HU (SCDLCore/docs/ACCURACY.md)."""
    store = DatasetStore.init(tmp_path / "store")
    case = store.add(samples["ct_abdomen"].image, samples["ct_abdomen"].label, case_id="abdomen", source="test")
    prepared = prepare_case(store.dataset(), case, DataConfig(spacing=(3.0, 3.0, 3.0)), cache_dir=tmp_path / "cache")
    assert 35.0 < prepared.class_hu[LIVER] < 60.0
    cached = prepare_case(store.dataset(), case, DataConfig(spacing=(3.0, 3.0, 3.0)), cache_dir=tmp_path / "cache")
    assert cached.class_hu == pytest.approx(prepared.class_hu, abs=1e-3)  # float32 in the cache
    np.testing.assert_array_equal(cached.classes, prepared.classes)
