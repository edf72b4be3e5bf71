"""SCDLSegmentLib.segmentations on Slicer's own libraries: the ``slicer-core`` wheel (Slicer 5.12.4's MRML,
vtkSegmentationCore, Segmentations logic, vtkSegmentationHistory, Terminologies logic and the
segmentation and volume storage nodes), in a scene without the application. No stand-in here."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from scdlsegment_testing import MODULE_DIR, add_volume, paint_segment, real_scene

from scdlcore.io.segnrrd import read_label_map
from scdlcore.labels import SYNAPSE13
from SCDLSegmentLib import labelmap, segmentations

SHAPE = (6, 7, 8)  # (K, J, I)
IJK_TO_RAS = np.array([[-0.7, 0, 0, 40.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])
SPLEEN, LIVER, AORTA = 1, 6, 8


@pytest.fixture
def scene():
    return real_scene()


def add_ct(scene):
    return add_volume(scene, np.zeros(SHAPE, np.int16), IJK_TO_RAS)


def result_labels() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:4, 2:5, 1:4] = LIVER
    labels[2:5, 1:3, 5:7] = SPLEEN
    labels[5, 6, 7] = AORTA
    return labels


def write_result(scene, path, labels, ijk_to_ras=IJK_TO_RAS):
    """The engine's output file, written by Slicer's own volume storage node."""
    node = add_volume(scene, labels, ijk_to_ras, "engine output", "vtkMRMLLabelMapVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    scene.RemoveNode(node)
    return path


def add_translation(scene, offset):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(
        slicer.util.vtkMatrixFromArray(
            np.array([[1, 0, 0, offset[0]], [0, 1, 0, offset[1]], [0, 0, 1, offset[2]], [0, 0, 0, 1.0]])
        )
    )
    return transform


def segment_result(scene, tmp_path, ct, segmentation=None, labels=None, **kwargs):
    path = write_result(scene, tmp_path / "labels.nrrd", result_labels() if labels is None else labels)
    with segmentations.result_labelmap(scene, path, ct) as labelNode:
        return segmentations.import_result(labelNode, ct, segmentation, SYNAPSE13, **kwargs)


def mask(segmentation, ct, display_name):
    segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(display_name)
    return segmentations._segment_mask(segmentation, segmentId, ct)


def geometry_matrix(segmentation) -> np.ndarray:
    """The segmentation's reference image geometry: its IJK-to-RAS, in the segmentation's own frame."""
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    text = segmentation.GetSegmentation().GetConversionParameter(name)
    return np.array([float(value) for value in text.split(";")[:16]]).reshape(4, 4)


def user_segment(segmentation, ct):
    segmentId = segmentation.GetSegmentation().AddEmptySegment("note", "My note", [1.0, 1.0, 0.0])
    note = np.zeros(SHAPE, dtype=np.uint8)
    note[0, 0, :3] = 1
    paint_segment(segmentation, segmentId, note, ct)
    return segmentId, note


def test_each_organ_becomes_one_tagged_segment_with_name_color_and_terminology_in_one_shared_layer(scene, tmp_path):
    ct = add_ct(scene)
    segmentation = segment_result(scene, tmp_path, ct)

    found = {segment.name: segment for segment in segmentations.existing_segments(segmentation)}
    assert list(found) == [label.display_name for label in SYNAPSE13.labels]
    assert all(found[label.display_name].organ == label.name for label in SYNAPSE13.labels)
    liver = segmentation.GetSegmentation().GetSegment(found["Liver"].segment_id)
    assert liver.GetTerminology() == SYNAPSE13.terminology_string(SYNAPSE13["liver"])
    np.testing.assert_allclose(liver.GetColor(), labelmap.unit_color(SYNAPSE13["liver"]), atol=1e-6)
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1  # not 13 full-size layers
    for name, value in (("Liver", LIVER), ("Spleen", SPLEEN), ("Aorta", AORTA), ("Stomach", 7)):
        np.testing.assert_array_equal(mask(segmentation, ct, name), (result_labels() == value).astype(np.uint8))
    assert (
        segmentation.GetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        == ct.GetID()
    )


def test_the_temporary_label_map_leaves_no_node_behind(scene, tmp_path):
    ct = add_ct(scene)
    before = scene.GetNumberOfNodes()
    segment_result(scene, tmp_path, ct)
    added = [scene.GetNthNode(index).GetClassName() for index in range(before, scene.GetNumberOfNodes())]
    assert "vtkMRMLLabelMapVolumeNode" not in added
    assert added.count("vtkMRMLSegmentationNode") == 1


def test_an_unreadable_result_file_is_a_clear_error(scene, tmp_path):
    ct = add_ct(scene)
    broken = tmp_path / "labels.nrrd"
    broken.write_text("not a volume")
    with (
        pytest.raises(ValueError, match="labels.nrrd could not be read"),
        segmentations.result_labelmap(scene, broken, ct),
    ):
        pass


def test_a_second_run_overwrites_its_segments_in_place_and_keeps_the_users(scene, tmp_path):
    ct = add_ct(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "review")
    noteId, note = user_segment(segmentation, ct)
    segment_result(scene, tmp_path, ct, segmentation)
    ids = [segment.segment_id for segment in segmentations.existing_segments(segmentation)]

    without_spleen = result_labels()
    without_spleen[without_spleen == SPLEEN] = 0
    segment_result(scene, tmp_path, ct, segmentation, labels=without_spleen)

    assert [segment.segment_id for segment in segmentations.existing_segments(segmentation)] == ids
    assert not mask(segmentation, ct, "Spleen").any()  # the organ the new result lacks is emptied
    np.testing.assert_array_equal(segmentations._segment_mask(segmentation, noteId, ct), note)


def test_only_the_requested_organs_are_written(scene, tmp_path):
    ct = add_ct(scene)
    segmentation = segment_result(scene, tmp_path, ct, organs=["liver"])
    assert [segment.organ for segment in segmentations.existing_segments(segmentation)] == ["liver"]
    np.testing.assert_array_equal(mask(segmentation, ct, "Liver"), (result_labels() == LIVER).astype(np.uint8))


def test_a_new_segmentation_of_a_transformed_ct_gets_the_cts_grid_not_a_shifted_one(scene, tmp_path):
    ct = add_ct(scene)
    ct.SetAndObserveTransformNodeID(add_translation(scene, (50.0, 0.0, 0.0)).GetID())
    segmentation = segment_result(scene, tmp_path, ct)

    assert segmentation.GetTransformNodeID() == ct.GetTransformNodeID()
    np.testing.assert_allclose(geometry_matrix(segmentation), IJK_TO_RAS, atol=1e-6)
    np.testing.assert_array_equal(mask(segmentation, ct, "Liver"), (result_labels() == LIVER).astype(np.uint8))


def test_a_users_segmentation_keeps_its_own_transform_and_the_organs_land_on_the_ct(scene, tmp_path):
    """Offsets of whole voxels (70 x 0.7 mm, 40 x 0.8 mm).

    Between two transforms Slicer moves an image by whole voxels.
    """
    ct = add_ct(scene)
    ct.SetAndObserveTransformNodeID(add_translation(scene, (49.0, 0.0, 0.0)).GetID())
    users = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "review")
    users.SetAndObserveTransformNodeID(add_translation(scene, (0.0, -32.0, 0.0)).GetID())
    segment_result(scene, tmp_path, ct, users)

    assert users.GetTransformNodeID() != ct.GetTransformNodeID()
    np.testing.assert_array_equal(mask(users, ct, "Liver"), (result_labels() == LIVER).astype(np.uint8))


def test_a_segmentation_of_closed_surfaces_is_refused_before_anything_changes(scene, tmp_path):
    ct = add_ct(scene)
    surfaces = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    surfaces.GetSegmentation().SetSourceRepresentationName("Closed surface")
    sphere = vtk.vtkSphereSource()
    sphere.Update()
    surfaces.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball", [1.0, 0.0, 0.0])
    called = []

    with pytest.raises(ValueError, match="'surfaces' keeps its segments as 'Closed surface'.*left unchanged"):
        segment_result(scene, tmp_path, ct, surfaces, beforeModify=lambda *nodes: called.append(nodes))

    assert called == []  # no undo state was saved for a change that did not happen
    assert [segment.name for segment in segmentations.existing_segments(surfaces)] == ["ball"]
    assert surfaces.GetNodeReferenceID(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is None


def test_an_empty_segmentation_of_another_representation_is_switched_and_filled(scene, tmp_path):
    ct = add_ct(scene)
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    empty.GetSegmentation().SetSourceRepresentationName("Closed surface")
    segment_result(scene, tmp_path, ct, empty)
    np.testing.assert_array_equal(mask(empty, ct, "Liver"), (result_labels() == LIVER).astype(np.uint8))


def test_a_result_on_another_grid_is_refused(scene, tmp_path):
    ct = add_ct(scene)
    shifted = IJK_TO_RAS.copy()
    shifted[0, 3] += 1.0
    path = write_result(scene, tmp_path / "labels.nrrd", result_labels(), shifted)
    with (
        segmentations.result_labelmap(scene, path, ct) as labelNode,
        pytest.raises(ValueError, match="labels.nrrd' is not on the grid of the volume 'CT'"),
    ):
        segmentations.import_result(labelNode, ct, None, SYNAPSE13)
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0  # no segmentation was made


def test_undo_restores_the_segments_from_before_the_result(scene, tmp_path):
    """What the panel's Undo does: the editor's history (vtkSegmentationHistory) saved in beforeModify."""
    ct = add_ct(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "review")
    noteId, note = user_segment(segmentation, ct)
    history = slicer.vtkSegmentationHistory()
    history.SetSegmentation(segmentation.GetSegmentation())

    segment_result(scene, tmp_path, ct, segmentation, beforeModify=lambda node, volume: history.SaveState())
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 14
    assert history.RestorePreviousState()

    assert [segment.name for segment in segmentations.existing_segments(segmentation)] == ["My note"]
    np.testing.assert_array_equal(segmentations._segment_mask(segmentation, noteId, ct), note)


def test_export_gives_the_fixed_values_on_the_ct_grid_through_transforms(scene, tmp_path):
    ct = add_ct(scene)
    ct.SetAndObserveTransformNodeID(add_translation(scene, (50.0, 0.0, 0.0)).GetID())
    segmentation = segment_result(scene, tmp_path, ct)
    tagged = {segment.organ: segment.segment_id for segment in segmentations.existing_segments(segmentation)}
    segmentation.GetSegmentation().RemoveSegment(tagged["stomach"])  # the user deleted the result's stomach...
    painted = segmentation.GetSegmentation().AddEmptySegment("", "stomach", [0.5, 0.5, 0.5])  # ...and painted one
    stomach = np.zeros(SHAPE, dtype=np.uint8)
    stomach[0, 5:7, 0:2] = 1
    paint_segment(segmentation, painted, stomach, ct)

    labels, overlap = segmentations.export_labels(segmentation, ct, SYNAPSE13)

    expected = result_labels()
    expected[stomach == 1] = 7
    np.testing.assert_array_equal(labels, expected)
    assert overlap == 0


def test_a_seg_nrrd_written_by_slicer_reads_back_in_the_engine_with_the_tables_values(scene, tmp_path):
    ct = add_ct(scene)
    segmentation = segment_result(scene, tmp_path, ct)
    path = tmp_path / "case.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)

    volume = read_label_map(path, SYNAPSE13)

    # Slicer crops a .seg.nrrd to the segments' extent: compare on the region the file covers.
    origin_ras = np.array([-volume.origin[0], -volume.origin[1], volume.origin[2]])
    start = np.rint(np.linalg.solve(IJK_TO_RAS[:3, :3], origin_ras - IJK_TO_RAS[:3, 3])).astype(int)[::-1]
    region = tuple(slice(begin, begin + size) for begin, size in zip(start, volume.array.shape))
    np.testing.assert_array_equal(volume.array, result_labels()[region])
    assert int(np.count_nonzero(volume.array)) == int(np.count_nonzero(result_labels()))


def test_the_shipped_terminology_loads_in_slicers_terminology_logic_and_names_every_segment():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    context = logic.LoadTerminologyFromFile(str(MODULE_DIR / "Resources" / "SCDLSegment.term.json"))
    assert context == "SCDL Segment synapse13"
    for label in SYNAPSE13.labels:
        segment_entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(SYNAPSE13.terminology_string(label), segment_entry)
        assert segment_entry.GetTerminologyContextName() == context
        assert segment_entry.GetTypeObject().GetCodeValue() == label.snomed_code
        listed = slicer.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(context, label.display_name, listed)
        assert listed.GetTypeObject().GetCodeValue() == label.snomed_code
