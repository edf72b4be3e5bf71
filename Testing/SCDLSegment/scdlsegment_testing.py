"""Paths and helpers shared by the SCDLSegment (3D Slicer module) tests.

Importing this module puts the module's Slicer-free helpers (``SCDLSegment/SCDLSegmentLib``) and
the engine package on ``sys.path``; the engine itself is replaced by ``fake_engine.py``, a real
child process that speaks the engine's protocols.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "FAKE_ENGINE",
    "MODULE_DIR",
    "REPO_ROOT",
    "TESTS_DIR",
    "add_volume",
    "paint_segment",
    "real_scene",
    "wait_until",
]

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parents[1]
MODULE_DIR = REPO_ROOT / "SCDLSegment"
FAKE_ENGINE = TESTS_DIR / "fake_engine.py"

for _path in (MODULE_DIR, REPO_ROOT / "SCDLCore"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def wait_until(condition: Callable[[], bool], poll: Callable[[], object] = lambda: None, timeout: float = 15.0) -> None:
    """Call ``poll`` (the panel's QTimer tick) until ``condition`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        poll()
        time.sleep(0.01)


def real_scene():
    """A scene of Slicer's own MRML library (the slicer-core wheel), with the node classes of the
    Segmentations and Volumes modules registered, as Slicer registers them at startup."""
    import slicer

    scene = slicer.vtkMRMLScene()
    for logic in (slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkSlicerVolumesLogic()):
        logic.SetMRMLScene(scene)
    return scene


def add_volume(scene, array, ijk_to_ras, name: str = "CT", class_name: str = "vtkMRMLScalarVolumeNode"):
    """A volume node of Slicer's own MRML holding ``array`` (K, J, I) with the 4 x 4 ``ijk_to_ras`` geometry."""
    import numpy as np
    import slicer.util

    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, dtype=float)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node


def paint_segment(segmentation, segment_id: str, mask, volume) -> None:
    """Set a segment to a 0/1 mask on the volume's grid (under its transform), through Slicer's own import."""
    import numpy as np
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    label = add_volume(
        volume.GetScene(),
        np.asarray(mask, dtype=np.uint8),
        slicer.util.arrayFromVTKMatrix(matrix),
        "painted",
        "vtkMRMLLabelMapVolumeNode",
    )
    label.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, segmentation, ids)
    volume.GetScene().RemoveNode(label)
