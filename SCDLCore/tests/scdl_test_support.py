"""Test support shared by SCDLCore/tests and the cross-package tests in Testing/ (both conftests import it).

- the real CT samples (fetched once per cache) as session fixtures;
- ``write_raw_nrrd`` and ``split_dicom_series``: files SCDL must refuse or handle (2D, 4D; two DICOM series);
- ``threshold_vnet``: a VNet with hand-set weights that labels by intensity, a stand-in that lets the tests
  check where the predictor puts its output. It is not a model and is never presented as one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
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


def write_raw_nrrd(path: Path, array: np.ndarray, kinds: str | None = None) -> Path:
    """A minimal uncompressed NRRD (to make images SCDL must refuse: 2D, 4D, vector)."""
    header = ["NRRD0004", "type: float", f"dimension: {array.ndim}", "sizes: " + " ".join(map(str, array.shape[::-1]))]
    header += ["encoding: raw", "endian: little"] + ([f"kinds: {kinds}"] if kinds else [])
    path.write_bytes(("\n".join(header) + "\n\n").encode() + array.astype("<f4").tobytes())
    return path


def split_dicom_series(source: Path, folder: Path, moved: int, modality_of_rest: bytes = b"CT") -> None:
    """Copy a DICOM series, giving its first ``moved`` files their own Series Instance UID."""
    folder.mkdir()
    for index, file in enumerate(sorted(source.iterdir())):
        data = file.read_bytes()
        if index < moved:  # (0020,000E) UI, empty in this anonymised series -> "1.2.3.4"
            data = data.replace(b" \x00\x0e\x00UI\x00\x00", b" \x00\x0e\x00UI\x08\x001.2.3.4\x00", 1)
        else:  # (0008,0060) Modality CS "CT"
            data = data.replace(b"\x08\x00\x60\x00CS\x02\x00CT", b"\x08\x00\x60\x00CS\x02\x00" + modality_of_rest, 1)
        (folder / file.name).write_bytes(data)
