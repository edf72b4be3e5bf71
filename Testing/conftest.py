"""Fixtures of the cross-package tests: the real CT samples and a stand-in model bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scdlcore.bundle.format import save_bundle
from scdlcore.labels import SYNAPSE13

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "SCDLCore" / "tests"))  # the support module shared with the package's tests
from scdl_test_support import sample_cache_dir, samples, threshold_vnet  # noqa: E402, F401  (shared fixtures)


@pytest.fixture(scope="session")
def threshold_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle folder of :func:`threshold_vnet` (6 mm, one 64^3 patch per sample): a test stand-in, not a model."""
    return save_bundle(
        tmp_path_factory.mktemp("models") / "threshold",
        [threshold_vnet()],
        name="threshold",
        labels=SYNAPSE13,
        spacing=(6.0, 6.0, 6.0),
        hu_window=(-125, 275),
        patch_size=(64, 64, 64),
        description="test stand-in: labels by intensity, not a model",
    )
