"""Fixtures of the SCDLSegment (3D Slicer module) tests; shared paths and helpers are in scdlsegment_testing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from scdlsegment_testing import FAKE_ENGINE

from SCDLSegmentLib.engine import EngineCommand


@pytest.fixture
def fake_engine(tmp_path: Path) -> EngineCommand:
    """The engine command pointing at ``fake_engine.py``, with a private model registry folder."""
    return EngineCommand(python=sys.executable, entry=(str(FAKE_ENGINE),), model_dir=str(tmp_path / "models"))
