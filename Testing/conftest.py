"""Fixtures of the cross-package tests: the real CT samples and a stand-in model bundle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from scdlcore.bundle import save_bundle
from scdlcore.labels import SYNAPSE13
from scdlcore.nets import VNet
from scdlcore.sample_data import Sample, fetch_all

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sample_cache_dir() -> Path:
    """``SCDL_CACHE_DIR`` if set, else the git-ignored ``.scdl-test-cache`` (shared with SCDLCore/tests)."""
    return Path(os.environ.get("SCDL_CACHE_DIR") or REPO_ROOT / ".scdl-test-cache")


@pytest.fixture(scope="session")
def samples(sample_cache_dir: Path) -> dict[str, Sample]:
    """Every real sample, downloaded at most once per cache."""
    return fetch_all(sample_cache_dir)


@pytest.fixture(scope="session")
def threshold_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle folder whose VNet (width 2, 6 mm, one 64^3 patch per sample) labels by intensity:
    HU -25..175 -> spleen, above 175 -> liver. A test stand-in with hand-set weights, not a model.

    The first encoder conv and the last decoder conv pass the windowed intensity x through (identity
    taps), the last up-sampling is zeroed so the random deeper layers add nothing, and the head
    turns x into logits: spleen 40 (x - 0.25), liver 80 (x - 0.5), other organs -20, background 0.
    """
    torch.manual_seed(0)
    net = VNet(num_classes=14, width=2)
    with torch.no_grad():
        for conv in (net.encoders[0][0], net.decoders[-1][0]):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[0, 0, 1, 1, 1] = 1.0
        net.ups[-1][0].weight.zero_()
        net.ups[-1][0].bias.zero_()
        net.head.weight.zero_()
        net.head.bias.fill_(-20.0)
        net.head.bias[0] = 0.0
        net.head.weight[1, 0], net.head.bias[1] = 40.0, -10.0
        net.head.weight[6, 0], net.head.bias[6] = 80.0, -40.0
    return save_bundle(
        tmp_path_factory.mktemp("models") / "threshold",
        [net],
        name="threshold",
        labels=SYNAPSE13,
        spacing=(6.0, 6.0, 6.0),
        hu_window=(-125, 275),
        patch_size=(64, 64, 64),
        description="test stand-in: labels by intensity, not a model",
    )
