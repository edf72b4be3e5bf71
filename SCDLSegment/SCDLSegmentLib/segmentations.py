"""The module's MRML side: the engine's label map into segments, corrected segments back into a label map.

Only Slicer's MRML and Segmentations classes are used here (no Qt, no ``slicer.app``), so the tests
run this file on Slicer's own libraries (the ``slicer-core`` wheel). Which segment is which organ
is decided in :mod:`SCDLSegmentLib.labelmap`; this file applies those decisions to the nodes.
Arrays are numpy in (K, J, I) order, as ``slicer.util.arrayFromVolume`` returns them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import slicer
import vtk

from SCDLSegmentLib import labelmap

if TYPE_CHECKING:
    from scdlcore.labels import LabelTable

__all__ = [
    "check_editable",
    "check_same_grid",
    "existing_segments",
    "export_labels",
    "import_result",
    "result_labelmap",
]

_BINARY_LABELMAP = "Binary labelmap"  # vtkSegmentationConverter's name of the representation the editor paints


@contextlib.contextmanager
def result_labelmap(scene, path: str | Path, volumeNode) -> Iterator[Any]:
    """The engine's label map file as a hidden label map node under the volume's transform, removed afterwards.

    Read through a storage node, not Slicer's IO manager, so the temporary file never appears in
    File > Recent. The node is in the scene only while the block runs: the segment import needs it
    there to find its parent transform.

    Raises:
        ValueError: the file could not be read as a volume.
    """
    node = slicer.vtkMRMLLabelMapVolumeNode()
    node.SetName(Path(path).name)
    node.SetHideFromEditors(True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise ValueError(f"The engine's label map {path} could not be read.")
    scene.AddNode(node)
    try:
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        yield node
    finally:
        scene.RemoveNode(node)


def check_same_grid(labelNode, volumeNode, what: str) -> None:
    """Raise ValueError unless ``labelNode``'s voxels are the volume's (to 1e-3 voxel).

    The same voxels may be stored in another axis order: Slicer's reader flips the slice axis of a
    left-handed file, so the engine's output of a left-handed CT comes back flipped. The import
    resamples it onto the volume's grid voxel for voxel.
    """
    shape, expected = _array(labelNode).shape, _array(volumeNode).shape
    labelToVolume = np.linalg.solve(_ijk_to_ras(volumeNode), _ijk_to_ras(labelNode))  # label IJK -> volume IJK
    if not _same_voxels(labelToVolume, shape[::-1], expected[::-1]):
        raise ValueError(
            f"{what} is not on the grid of the volume {volumeNode.GetName()!r} (shape {shape} vs {expected}); "
            "the engine must write its result on the input grid."
        )


def _same_voxels(labelToVolume: np.ndarray, size: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """True when an index map (4 x 4) permutes and flips the axes and sends the (I, J, K) box onto the other."""
    axes = labelToVolume[:3, :3]
    if not np.allclose(axes, np.round(axes), atol=1e-3) or not np.allclose(np.abs(np.round(axes)).sum(axis=0), 1):
        return False
    corners = np.array([[0, 0, 0], np.subtract(size, 1)], dtype=float)
    mapped = corners @ axes.T + labelToVolume[:3, 3]
    box = np.sort(mapped, axis=0)
    return bool(np.allclose(box, [[0, 0, 0], np.subtract(expected, 1)], atol=1e-3))


def check_editable(segmentationNode) -> None:
    """Raise ValueError unless the segments can be written as binary labelmaps; changes nothing then.

    An empty segmentation is switched to binary labelmap; one holding segments in another source
    representation (closed surfaces, say) is the user's to convert.
    """
    segmentation = segmentationNode.GetSegmentation()
    source = segmentation.GetSourceRepresentationName()
    if source == _BINARY_LABELMAP:
        return
    if segmentation.GetNumberOfSegments() == 0:
        segmentation.SetSourceRepresentationName(_BINARY_LABELMAP)
        return
    raise ValueError(
        f"The segmentation {segmentationNode.GetName()!r} keeps its segments as {source!r}, and the organs are "
        "written as binary labelmaps: make 'Binary labelmap' its source representation (Segmentations module, "
        "Representations) or choose another segmentation. It was left unchanged."
    )


def _new_segmentation(volumeNode):
    """A new segmentation for the volume's result, named after it: under the volume's transform, geometry from it.

    The transform is set first: the segmentation converts the reference geometry into its own
    frame when the geometry is set.
    """
    node = volumeNode.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return node


def import_result(
    labelNode,
    volumeNode,
    segmentationNode,
    table: LabelTable,
    organs: list[str] | None = None,
    beforeModify: Callable[[Any, Any], None] | None = None,
):
    """Write the engine's label map into one segment per organ, in one import (one shared labelmap layer).

    Segments from an earlier run (found by ``labelmap.ORGAN_TAG``) are overwritten in place, an organ
    the result lacks is emptied, the user's own segments are kept; a given segmentation keeps its
    transform. ``beforeModify(segmentationNode, volumeNode)`` runs once, after every check and before
    any segment changes (the panel saves its undo state there).

    Args:
        labelNode: the label map on the volume's grid (see :func:`result_labelmap`); its voxels are renumbered.
        volumeNode: the CT it was computed from.
        segmentationNode: where the organs go; None = a new segmentation named after the volume, made once
            the checks passed.
        table: the model's label table (values, names, colors, terminology).
        organs: machine names of the organs the result holds; None = every organ of the table.
        beforeModify: called once right before the first change.

    Returns:
        The segmentation node.

    Raises:
        ValueError: another grid than the volume's, segments in another representation, an unknown organ;
            nothing was changed.
        RuntimeError: Slicer refused the import.
    """
    check_same_grid(labelNode, volumeNode, f"The engine's label map {labelNode.GetName()!r}")
    if segmentationNode is not None:
        check_editable(segmentationNode)
    plan = labelmap.plan_result_segments(
        table, [] if segmentationNode is None else existing_segments(segmentationNode), organs
    )
    if segmentationNode is None:  # made only once every check passed
        segmentationNode = _new_segmentation(volumeNode)
    if beforeModify is not None:
        beforeModify(segmentationNode, volumeNode)
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = vtk.vtkStringArray()
    with slicer.util.NodeModify(segmentationNode):
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)  # in the node's own frame
        for update in plan:
            color = labelmap.unit_color(update.label)
            segmentId = update.segment_id or segmentation.AddEmptySegment(
                segmentation.GenerateUniqueSegmentID(update.label.name), update.label.display_name, color
            )
            segment = segmentation.GetSegment(segmentId)
            segment.SetName(update.label.display_name)
            segment.SetColor(*color)
            segment.SetTerminology(update.terminology)
            segment.SetTag(labelmap.ORGAN_TAG, update.label.name)
            segmentIds.InsertNextValue(segmentId)
        # Label value k + 1 goes to segmentIds[k]: renumber the table's values into that order.
        slicer.util.updateVolumeFromArray(
            labelNode, labelmap.renumber(_array(labelNode), [u.label.value for u in plan])
        )
        # In the segmentation's frame: Slicer moves the image by whole voxels when the two transforms differ.
        image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(
            labelNode, segmentationNode.GetParentTransformNode()
        )
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            image, segmentationNode, segmentIds
        ):
            raise RuntimeError(f"Slicer could not import the organs into {segmentationNode.GetName()!r}; see the log.")
    return segmentationNode


def existing_segments(segmentationNode) -> list[labelmap.ExistingSegment]:
    """The segments of a segmentation node, with the organ tag this module sets (None on user segments)."""
    segmentation = segmentationNode.GetSegmentation()
    segments = []
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segmentId)
        organ = vtk.reference("")
        hasOrgan = segment.GetTag(labelmap.ORGAN_TAG, organ)
        segments.append(labelmap.ExistingSegment(segmentId, segment.GetName(), str(organ.get()) if hasOrgan else None))
    return segments


def export_labels(segmentationNode, volumeNode, table: LabelTable) -> tuple[np.ndarray, int]:
    """The organ segments as one label map on the volume's grid with the table's fixed values.

    Returns:
        ``(labels, overlap)`` as :func:`labelmap.compose_label_map` gives them.

    Raises:
        ValueError: two segments claim one organ.
    """
    organSegments = labelmap.organs_to_segments(table, existing_segments(segmentationNode))
    masks = {
        organ: _segment_mask(segmentationNode, segmentId, volumeNode) for organ, segmentId in organSegments.items()
    }
    return labelmap.compose_label_map(table, masks, _array(volumeNode).shape)


def _segment_mask(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """One segment resampled onto the volume's grid (through the transforms between them), 0/1."""
    scene = segmentationNode.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SCDLSegment export")
    node.SetHideFromEditors(True)
    try:
        segmentIds = vtk.vtkStringArray()
        segmentIds.InsertNextValue(segmentId)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, segmentIds, node, volumeNode
        ):
            raise RuntimeError(f"Slicer could not export the segment {segmentId!r}; see the log.")
        return np.array(_array(node))
    finally:
        display = node.GetDisplayNode()
        if display is not None and display.GetColorNode() is not None:
            scene.RemoveNode(display.GetColorNode())
        scene.RemoveNode(node)


def _array(volumeNode) -> np.ndarray:
    return slicer.util.arrayFromVolume(volumeNode)


def _ijk_to_ras(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)
