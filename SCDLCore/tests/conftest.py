"""Shared fixtures: the real CT samples (fetched once per session) and tiny synthetic volumes."""

from __future__ import annotations

import numpy as np
import pytest
from scdl_test_support import sample_cache_dir, samples  # noqa: F401  (shared fixtures)

from scdlcore.io.volume import Volume

#: Geometry of the synthetic volumes: non-cubic, anisotropic, oblique, off-centre.
SYNTHETIC_SHAPE = (10, 20, 30)  # (D, H, W)
SYNTHETIC_SPACING = (0.7, 1.3, 2.9)  # (x, y, z) mm


@pytest.fixture
def oblique_direction() -> tuple[float, ...]:
    """A seeded proper rotation with no axis-aligned column, row-major 3x3."""
    rotation, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(3, 3)))
    rotation *= np.sign(np.linalg.det(rotation))
    return tuple(rotation.ravel())


@pytest.fixture
def synthetic_ct(oblique_direction: tuple[float, ...]) -> Volume:
    """(10, 20, 30) float32 CT: air (-1000 HU) around a soft-tissue ellipsoid (40 HU), seeded noise."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SYNTHETIC_SHAPE), indexing="ij")
    body = (z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2 <= 1
    array = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, SYNTHETIC_SHAPE)
    origin = (-12.3456789, 45.678901, -300.1234567)  # LPS mm
    return Volume(array.astype(np.float32), SYNTHETIC_SPACING, origin, oblique_direction)


@pytest.fixture
def synthetic_labels(synthetic_ct: Volume) -> Volume:
    """uint8 label map on ``synthetic_ct``'s grid: two boxes with Synapse-13 values 6 (liver) and 12."""
    array = np.zeros(SYNTHETIC_SHAPE, dtype=np.uint8)
    array[2:8, 4:15, 5:20] = 6
    array[3:6, 15:18, 22:27] = 12
    return synthetic_ct.with_array(array)
