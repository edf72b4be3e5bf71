"""Test support shared by SCDLCore/tests and the cross-package tests in Testing/ (both conftests import it).

- the real CT samples (fetched once per cache) as session fixtures;
- ``threshold_vnet``: a VNet with hand-set weights that labels by intensity, a stand-in that lets the tests
  check where the predictor puts its output. It is not a model and is never presented as one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from scdlcore.labels import SYNAPSE13
from scdlcore.nets import VNet
from scdlcore.sample_data import Sample, fetch_all

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def sample_cache_dir() -> Path:
    """``SCDL_CACHE_DIR`` if set, else the git-ignored ``.scdl-test-cache`` at the repository root."""
    return Path(os.environ.get("SCDL_CACHE_DIR") or REPO_ROOT / ".scdl-test-cache")


@pytest.fixture(scope="session")
def samples(sample_cache_dir: Path) -> dict[str, Sample]:
    """Every real sample, downloaded at most once per cache."""
    return fetch_all(sample_cache_dir)


def threshold_vnet() -> VNet:
    """VNet (width 2) passing the windowed intensity x to the head: spleen where x > 0.25, liver where x > 0.75.

    In HU (window -125..275): -25..175 HU -> spleen, above 175 HU -> liver. Only the first encoder conv and the
    last decoder conv carry the signal (identity taps); the last up-sampling is zeroed, so the deeper random
    layers do not reach the output.
    """
    torch.manual_seed(0)
    net = VNet(num_classes=SYNAPSE13.num_classes, width=2)
    with torch.no_grad():
        for conv in (net.encoders[0][0], net.decoders[-1][0]):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[0, 0, 1, 1, 1] = 1.0
        net.ups[-1][0].weight.zero_()  # with zero bias and a fresh BatchNorm, the deep path adds 0
        net.ups[-1][0].bias.zero_()
        net.head.weight.zero_()
        net.head.bias.fill_(-20.0)  # organs other than the two stay far below background
        net.head.bias[0] = 0.0
        net.head.weight[1, 0], net.head.bias[1] = 40.0, -10.0  # spleen: 40 (x - 0.25)
        net.head.weight[6, 0], net.head.bias[6] = 80.0, -40.0  # liver: beats spleen for x > 0.75
    return net
