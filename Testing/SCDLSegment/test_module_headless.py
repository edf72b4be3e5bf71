"""SCDLSegment.py run headless: MRML on Slicer's own libraries (slicer-core), the application, Qt and
ctk on the STAND-IN of slicer_standin.py (not Slicer), and fake_engine.py (a real child process
speaking the engine's protocols)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import signal
import subprocess
import sys
import threading
import types
import unittest
from pathlib import Path

import nrrd
import numpy as np
import pytest
import vtk
from scdlsegment_testing import add_volume, paint_segment, wait_until
from slicer_standin import SlicerStandIn

from scdlcore.labels import SYNAPSE13
from SCDLSegmentLib.dependencies import RequirementStatus
from SCDLSegmentLib.labelmap import ORGAN_TAG
from SCDLSegmentLib.segmentations import existing_segments
from SCDLSegmentLib.settings import Device

LIVER, SPLEEN = 6, 1
CT_IJK_TO_RAS = np.array([[-0.7, 0, 0, 40.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])


@pytest.fixture
def standin(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default dataset folder lives in the home folder
    return SlicerStandIn(tmp_path / "slicer-temp", environment=dict(os.environ))


@pytest.fixture
def module(standin, monkeypatch):
    standin.install(monkeypatch)
    return standin.import_module()


@pytest.fixture
def logic(module, standin, fake_engine):
    logic = module.SCDLSegmentLogic(engine=fake_engine, settingsStore=standin.settings)
    yield logic
    logic.shutdown()


def add_ct(standin, name="CT"):
    """A (D, H, W) = (6, 7, 8) CT, 0.7 x 0.8 x 2.5 mm, left-right flipped axes, off-centre origin."""
    image = np.full((6, 7, 8), -1000, dtype=np.int16)
    image[1:4, 2:5, 1:4] = 200  # liver by the fake engine's rule
    image[2:5, 1:3, 5:7] = 100  # spleen
    return add_volume(standin.scene, image, CT_IJK_TO_RAS, name)


def user_segmentation(standin, volume):
    node = standin.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "review")
    segment_id = node.GetSegmentation().AddEmptySegment("note", "My note", (1.0, 1.0, 0.0))
    note = np.zeros(standin.array(volume).shape, dtype=np.uint8)
    note[0, 0, :3] = 1
    paint_segment(node, segment_id, note, volume)
    return node, segment_id, note


def organ_tag(segment) -> str | None:
    value = vtk.reference("")
    return str(value.get()) if segment.GetTag(ORGAN_TAG, value) else None


def test_module_metadata(module):
    parent = types.SimpleNamespace()
    module.SCDLSegment(parent)
    assert parent.title == "SCDL Segment"
    assert parent.categories == ["Segmentation"]
    assert "Segment" in parent.helpText and parent.acknowledgementText


def test_segment_writes_one_segment_per_organ_on_the_input_grid_and_keeps_user_segments(logic, module, standin):
    volume = add_ct(standin)
    segmentation_node, note_id, note = user_segmentation(standin, volume)
    segments_at_undo = []

    outcome = logic.segment(
        volume,
        "starter",
        Device.CPU,
        segmentationNode=segmentation_node,
        timeout_s=30,
        beforeModify=lambda node, vol: segments_at_undo.append(
            (node, vol, node.GetSegmentation().GetNumberOfSegments())
        ),
    )

    assert outcome.error is None and not outcome.cancelled and outcome.segmentationNode is segmentation_node
    segmentation = segmentation_node.GetSegmentation()
    segments = {segment.name: segment for segment in existing_segments(segmentation_node)}
    assert len(segments) == 14  # 13 organs + the user's note
    for label in SYNAPSE13.labels:
        segment = segmentation.GetSegment(segments[label.display_name].segment_id)
        assert segments[label.display_name].organ == label.name
        assert segment.GetTerminology() == SYNAPSE13.terminology_string(label)
        assert segment.GetColor() == pytest.approx(tuple(c / 255 for c in label.color))
    image = standin.array(volume)
    mask = functools.partial(standin.segment_mask, segmentation_node, volume=volume)
    np.testing.assert_array_equal(mask(segments["Liver"].segment_id), (image > 150).astype(np.uint8))
    np.testing.assert_array_equal(mask(segments["Spleen"].segment_id), ((image > 50) & (image <= 150)).astype(np.uint8))
    assert not mask(segments["Pancreas"].segment_id).any()
    np.testing.assert_array_equal(mask(note_id), note)  # the user's segment is untouched
    assert organ_tag(segmentation.GetSegment(note_id)) is None
    assert segments_at_undo == [(segmentation_node, volume, 1)]  # one undo state, before any organ was written
    assert segmentation_node.GetNodeReferenceID("referenceImageGeometryRef") == volume.GetID()
    assert outcome.volumes_ml["liver"] == pytest.approx(27 * 0.7 * 0.8 * 2.5 / 1000)
    assert standin.loaded_terminologies().count("SCDL Segment synapse13") == 1  # the shipped file
    assert not list(standin.temp_root.glob("SCDLSegment-[0-9]*"))  # temporary files removed
    assert standin.scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0
    assert standin.recorder.io_loads == []  # the result never went through the IO manager (File > Recent)

    ids_before = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    again = logic.segment(volume, "starter", Device.CPU, segmentationNode=segmentation_node, timeout_s=30)
    assert again.error is None
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == ids_before
    assert standin.loaded_terminologies().count("SCDL Segment synapse13") == 1  # loaded once


def test_a_new_segmentation_is_named_after_the_volume(logic, standin):
    volume = add_ct(standin, name="Abdomen CT")
    outcome = logic.segment(volume, "starter", Device.CPU, organs=["spleen", "liver"], timeout_s=30)
    assert outcome.segmentationNode.GetName() == "Abdomen CT segmentation"
    assert [segment.name for segment in existing_segments(outcome.segmentationNode)] == ["Spleen", "Liver"]


def test_a_result_on_another_grid_is_refused(logic, standin, tmp_path):
    volume = add_ct(standin)
    path = tmp_path / "shifted.nrrd"
    nrrd.write(
        str(path),
        np.zeros(standin.array(volume).shape, np.uint8),
        {"space": "left-posterior-superior", "space directions": np.diag([0.7, 0.8, 2.5]), "space origin": np.zeros(3)},
        index_order="C",
    )
    nodes_before = standin.scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="not on the grid of the volume 'CT'"):
        logic.importLabelmap(path, volume)
    assert standin.scene.GetNumberOfNodes() == nodes_before


@pytest.mark.slow
def test_cancel_stops_a_running_segmentation(logic, standin):
    volume = add_ct(standin)
    stages, outcomes = [], []
    logic.startSegmentation(
        volume, "slow", Device.CPU, onProgress=lambda stage, f: stages.append(stage), onDone=outcomes.append
    )
    wait_until(lambda: "preprocess" in stages, logic.poll)
    logic.cancelSegmentation()
    wait_until(lambda: bool(outcomes), logic.poll)

    assert outcomes[0].cancelled and outcomes[0].error is None and outcomes[0].segmentationNode is None
    assert stages[:2] == ["export", "start"] and "cancel" in stages
    assert logic.worker.running  # cancelled by the protocol: the model stays loaded
    assert not logic.segmentationRunning


def test_a_result_that_crosses_the_cancel_is_not_imported(logic, standin):
    """Cancel is final: the engine had already written its result (so it answers "result", not "cancelled")."""
    volume = add_ct(standin)
    outcomes = []
    logic.startSegmentation(volume, "starter", Device.CPU, onDone=outcomes.append)
    wait_until(lambda: any(standin.temp_root.glob("SCDLSegment*/labels.nrrd")))  # written: the result comes next
    logic.cancelSegmentation()
    wait_until(lambda: bool(outcomes), logic.poll)
    assert outcomes[0].cancelled and outcomes[0].segmentationNode is None
    assert not standin.modules["slicer"].util.getNodesByClass("vtkMRMLSegmentationNode")


def test_a_volume_removed_while_it_is_segmented_gets_no_result(logic, standin, tmp_path):
    volume = add_ct(standin)
    outcomes = []
    logic.startSegmentation(volume, "starter", Device.CPU, onDone=outcomes.append, collectTo=tmp_path / "ds")
    standin.scene.RemoveNode(volume)
    wait_until(lambda: bool(outcomes), logic.poll)
    assert "The volume 'CT' was removed from the scene while it was segmented" in outcomes[0].error
    assert not standin.modules["slicer"].util.getNodesByClass("vtkMRMLSegmentationNode")
    assert outcomes[0].collected["case_id"] == "case001", "the engine kept the CT: the panel says so"


def test_a_segmentation_removed_meanwhile_is_replaced_by_a_new_one(logic, standin):
    volume = add_ct(standin)
    target, _, _ = user_segmentation(standin, volume)
    outcomes = []
    logic.startSegmentation(volume, "starter", Device.CPU, segmentationNode=target, onDone=outcomes.append)
    standin.scene.RemoveNode(target)
    wait_until(lambda: bool(outcomes), logic.poll)
    assert outcomes[0].error is None and outcomes[0].segmentationNode is not target
    assert standin.scene.IsNodePresent(outcomes[0].segmentationNode)
    assert outcomes[0].segmentationNode.GetName() == "CT segmentation"


@pytest.mark.slow
def test_a_busy_worker_is_not_replaced_and_a_case_submitted_meanwhile_waits_its_turn(logic, standin, tmp_path):
    volume = add_ct(standin)
    outcomes, added = [], []
    logic.startSegmentation(volume, "slow", Device.CPU, onDone=outcomes.append)
    worker = logic.worker
    with pytest.raises(RuntimeError, match="still busy with the previous model or device"):
        logic.ensureWorker("starter", Device.CPU)
    # Adding a case needs no model: it goes to the running worker, whatever model the panel shows now.
    logic.startSubmitCase(
        volume, None, [], tmp_path / "ds", "starter", Device.GPU, lambda result, error: added.append((result, error))
    )
    assert logic.worker is worker
    wait_until(lambda: bool(outcomes) and bool(added), logic.poll)
    assert outcomes[0].error is None and added[0][1] is None and added[0][0]["case_id"] == "case001"


def test_an_engine_crash_becomes_a_message_not_a_traceback(logic, standin):
    outcome = logic.segment(add_ct(standin), "crash", Device.CPU, timeout_s=30)
    assert "exit code 3" in outcome.error and "CUDA out of memory (simulated)" in outcome.error
    assert "Traceback" not in outcome.error
    assert outcome.segmentationNode is None


def test_submitted_case_has_fixed_label_values_on_the_volume_grid(logic, module, standin, tmp_path):
    volume = add_ct(standin)
    segmentation_node = logic.segment(volume, "starter", Device.CPU, timeout_s=30).segmentationNode
    segmentation = segmentation_node.GetSegmentation()
    liver_id = next(segment.segment_id for segment in existing_segments(segmentation_node) if segment.organ == "liver")
    segmentation.GetSegment(liver_id).SetName("Liver (edited)")  # renamed: still found by its tag
    corrected = standin.segment_mask(segmentation_node, liver_id, volume)
    corrected[0, 0, 0] = 1  # a correction
    paint_segment(segmentation_node, liver_id, corrected, volume)
    tumour = segmentation.AddEmptySegment("tumour", "Tumour", (1, 0, 0))
    paint_segment(segmentation_node, tumour, np.ones(corrected.shape, np.uint8), volume)  # not an organ
    dataset = tmp_path / "dataset"

    result = logic.submitCase(volume, segmentation_node, ["spleen", "liver"], dataset, "starter", Device.CPU)
    other_image = standin.array(volume).copy()
    other_image[0, 0, 0] = 0  # another CT: one CT is one case
    other = add_volume(standin.scene, other_image, CT_IJK_TO_RAS, "other CT")
    logic.submitCase(other, None, [], dataset, "starter", Device.CPU)

    assert result["case_id"] == "case001"
    labels, header = nrrd.read(str(dataset / "case001" / "label.nrrd"), index_order="C")
    ct = standin.array(volume)
    expected = np.zeros(ct.shape, np.uint8)
    expected[(ct > 50) & (ct <= 150)] = SPLEEN
    expected[ct > 150] = LIVER
    expected[0, 0, 0] = LIVER
    np.testing.assert_array_equal(labels, expected)
    image, image_header = nrrd.read(str(dataset / "case001" / "image.nrrd"), index_order="C")
    np.testing.assert_array_equal(image, ct)
    np.testing.assert_allclose(header["space directions"], image_header["space directions"])
    np.testing.assert_allclose(header["space origin"], image_header["space origin"])
    np.testing.assert_allclose(image_header["space origin"], [-40.0, 20.0, 100.0])  # RAS (40, -20, 100) in LPS
    assert logic.datasetSummary(dataset) == module.catalog.DatasetSummary(labeled=0, partial=1, unlabeled=1)
    assert not list(standin.temp_root.glob("SCDLSegment-case-*/*"))  # exported files cleaned up


def test_submitting_without_reviewed_organs_is_refused(logic, standin, tmp_path):
    volume = add_ct(standin)
    segmentation_node = logic.segment(volume, "starter", Device.CPU, timeout_s=30).segmentationNode
    with pytest.raises(ValueError, match="Tick the organs you reviewed"):
        logic.startSubmitCase(volume, segmentation_node, [], tmp_path, "starter", Device.CPU, lambda r, e: None)
    with pytest.raises(ValueError, match="Unknown organ"):
        logic.startSubmitCase(volume, segmentation_node, ["Liver"], tmp_path, "starter", Device.CPU, lambda r, e: None)


@pytest.mark.slow
def test_finetune_reports_progress_and_registers_a_new_version(logic, standin, tmp_path):
    volume = add_ct(standin)
    segmentation_node = logic.segment(volume, "starter", Device.CPU, timeout_s=30).segmentationNode
    logic.submitCase(volume, segmentation_node, ["liver"], tmp_path / "ds", "starter", Device.CPU)
    events, outcomes = [], []

    logic.startFinetune(tmp_path / "ds", "starter@1", 3, Device.CPU, onEvent=events.append, onDone=outcomes.append)
    assert logic.worker.running, "training on the CPU: the idle engine keeps its model loaded"
    wait_until(lambda: bool(outcomes), logic.poll)

    outcome = outcomes[0]
    assert outcome.error is None and outcome.model == "starter@2"
    assert outcome.before == {"liver": 0.7, "spleen": 0.6} and outcome.after == {"liver": 0.9, "spleen": 0.8}
    assert [event["step"] for event in events if event["event"] == "progress"] == [1, 2, 3]
    assert events[-1]["event"] == "validation"
    assert [model.ref for model in logic.listModels()] == ["starter@1", "starter@2"]


@pytest.mark.slow
def test_finetune_on_the_gpu_frees_it_from_the_idle_engine_first(logic, standin, tmp_path):
    volume = add_ct(standin)
    logic.submitCase(volume, None, [], tmp_path / "ds", "starter", Device.CPU)  # starts the engine
    assert logic.worker.running and not logic.worker.pending
    outcomes = []
    logic.startFinetune(tmp_path / "ds", "starter@1", 1, Device.AUTO, onDone=outcomes.append)
    wait_until(lambda: not logic.worker.running, logic.poll)  # stopped; the next segmentation starts it again
    wait_until(lambda: bool(outcomes), logic.poll)
    assert logic.segment(volume, "starter", Device.CPU, timeout_s=30).error is None


def test_finetune_error_from_the_engine_is_shown(logic, tmp_path):
    (tmp_path / "empty").mkdir()
    outcome = logic.finetune(tmp_path / "empty", "starter@1", 3, Device.CPU, timeout_s=30)
    assert outcome.error.startswith("No reviewed case in")


@pytest.mark.slow
def test_finetune_cancel_kills_the_training_process(logic, standin, tmp_path):
    standin.environment["FAKE_ENGINE_STEP_S"] = "0.2"
    volume = add_ct(standin)
    logic.submitCase(
        volume,
        logic.segment(volume, "starter", Device.CPU, timeout_s=30).segmentationNode,
        ["liver"],
        tmp_path / "ds",
        "starter",
        Device.CPU,
    )
    events, outcomes = [], []
    logic.startFinetune(tmp_path / "ds", "starter@1", 100, Device.CPU, onEvent=events.append, onDone=outcomes.append)
    wait_until(lambda: bool(events), logic.poll)
    logic.cancelFinetune()
    wait_until(lambda: bool(outcomes), logic.poll)
    assert outcomes[0].cancelled and outcomes[0].error is None and outcomes[0].model is None
    assert not logic.finetuneRunning


# ----------------------------------------------------------------------------- dependencies


def missing(*requirements):
    return lambda self: [RequirementStatus(r, r.split(">")[0], None, False) for r in requirements]


def test_check_dependencies_covers_torch_and_the_requirements_file(logic):
    names = [status.name for status in logic.checkDependencies()]
    assert names == ["torch", "monai", "safetensors", "tqdm", "PyYAML", "matplotlib", "scipy", "psutil"]


def test_install_uses_the_pytorch_extension_and_pip_ensure_on_slicer_5_12(standin, monkeypatch, fake_engine):
    standin.add_packaging()
    standin.add_pytorch_extension()
    standin.install(monkeypatch)
    module = standin.import_module()
    monkeypatch.setattr(module.SCDLSegmentLogic, "checkDependencies", missing("torch>=2.4", "monai>=1.4"))
    module.SCDLSegmentLogic(engine=fake_engine, settingsStore=standin.settings).installDependencies()

    assert standin.recorder.torch_installs == [{"askConfirmation": True, "requirement": ">=2.4"}]
    (call,) = standin.recorder.pip_ensure
    assert call["requirements"] == ["monai>=1.4"] and call["prompt_install"] is True
    assert {"torch", "numpy", "SimpleITK"} <= set(call["skip_packages"])
    assert standin.recorder.pip_install == []


def test_install_asks_then_uses_pip_install_on_slicer_5_10(standin, monkeypatch, fake_engine):
    standin.install(monkeypatch)
    module = standin.import_module()
    monkeypatch.setattr(module.SCDLSegmentLogic, "checkDependencies", missing("monai>=1.4", "psutil>=5.9"))
    logic = module.SCDLSegmentLogic(engine=fake_engine, settingsStore=standin.settings)

    logic.installDependencies()
    [(option, constraints, *packages)] = standin.recorder.pip_install
    assert (option, packages) == ("--constraint", ["monai>=1.4", "psutil>=5.9"])
    pins = Path(constraints).read_text(encoding="utf-8").split()  # Slicer's own packages stay as they are
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}" in pins
    assert f"torch=={importlib.metadata.version('torch')}" in pins
    assert "monai>=1.4" in standin.recorder.confirmations[0]

    standin.recorder.confirm_answer = False
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.installDependencies()
    assert len(standin.recorder.pip_install) == 1


def test_install_without_the_pytorch_extension_says_what_to_do(logic, module, monkeypatch):
    monkeypatch.setattr(module.SCDLSegmentLogic, "checkDependencies", missing("torch>=2.4"))
    with pytest.raises(RuntimeError, match="install 'PyTorch' from the Extensions Manager"):
        logic.installDependencies()


def test_install_refuses_to_run_off_the_main_thread(logic):
    errors = []
    thread = threading.Thread(target=lambda: _capture(logic.installDependencies, errors))
    thread.start()
    thread.join()
    assert "main (GUI) thread" in str(errors[0])


def _capture(function, errors):
    try:
        function()
    except RuntimeError as err:
        errors.append(err)


# ----------------------------------------------------------------------------- the panel


@pytest.fixture
def widget(module, standin, fake_engine, monkeypatch):
    monkeypatch.setattr(module, "SCDLSegmentLogic", functools.partial(module.SCDLSegmentLogic, engine=fake_engine))
    monkeypatch.setattr(module.SCDLSegmentLogic.func, "checkDependencies", lambda self: [])
    add_ct(standin)
    widget = module.SCDLSegmentWidget()
    widget.setup()
    pump(widget)
    yield widget
    widget.cleanup()


def pump(widget, until=None, timeout=15.0):
    """Run the panel's QTimer until ``until()`` (default: no child process left)."""
    wait_until(until or (lambda: not widget._pollTimer.isActive()), widget.onPoll, timeout)


def test_panel_setup_binds_the_ui_and_reads_the_registry(widget):
    ui = widget.ui
    assert [item[0] for item in ui.modelComboBox.items] == ["starter@1"]
    assert "Organs (13)" in ui.modelDetailsLabel.text
    assert "Voxel size: 1.5 × 1.5 × 3 mm" in ui.modelDetailsLabel.text  # from `models info`
    assert "Metrics: mean_dice 0.500" in ui.modelDetailsLabel.text
    assert widget.logic.models[0].builtin and widget.logic.models[0].spacing == (1.5, 1.5, 3.0)
    assert widget._parameters().model == "starter@1"
    assert ui.reviewedOrgansList.count == 13
    assert ui.inputVolumeSelector.bound_value.GetName() == "CT"
    assert ui.datasetCountsLabel.text == "Dataset: 0 reviewed, 0 unlabeled"
    assert ui.segmentEditorWidget.calls[0][0] == "setMRMLSegmentEditorNode"  # before the scene is set
    assert ui.segmentEditorWidget.calls[1] == ("setMRMLScene",)


def test_panel_segment_button_turns_into_cancel_and_back(widget, standin):
    ui = widget.ui
    ui.applyButton.clicked.emit()
    assert ui.applyButton.text == "Cancel"
    pump(widget)

    assert ui.applyButton.text == "Segment"
    assert ui.segmentProgressBar.value == 100 and ui.segmentProgressBar.format.startswith("Done in")
    assert widget._parameters().outputSegmentation.GetName() == "CT segmentation"
    assert ui.deviceInfoLabel.text == "Detected: CPU (no CUDA GPU found) · torch 2.13.0"
    assert "Liver" in ui.segmentStatusLabel.text
    editor_calls = [call[0] for call in ui.segmentEditorWidget.calls]
    assert editor_calls.count("saveStateForUndo") == 1
    undo_at = editor_calls.index("saveStateForUndo")
    assert editor_calls[undo_at - 2 : undo_at] == ["setSegmentationNode", "setSourceVolumeNode"]
    assert standin.recorder.errors == []


@pytest.mark.slow
def test_panel_cancel_and_crash(widget, standin):
    ui = widget.ui
    widget._parameters().model = "slow"
    ui.applyButton.clicked.emit()
    pump(
        widget,
        until=lambda: "Segmenting" in ui.segmentProgressBar.format or "Preparing" in ui.segmentProgressBar.format,
    )
    ui.applyButton.clicked.emit()  # now it is the Cancel button
    assert ui.segmentProgressBar.format.startswith("Cancelling")
    pump(widget, until=lambda: ui.applyButton.text == "Segment")
    assert ui.segmentProgressBar.format == "Cancelled"

    widget._parameters().model = "crash"
    ui.applyButton.clicked.emit()
    pump(widget, until=lambda: bool(standin.recorder.errors))
    assert "CUDA out of memory (simulated)" in standin.recorder.errors[-1]
    assert "Traceback" not in standin.recorder.errors[-1]
    assert ui.applyButton.text == "Segment" and ui.segmentProgressBar.format == "Failed"


@pytest.mark.slow
def test_panel_submit_then_finetune_selects_the_new_model(widget, standin):
    ui = widget.ui
    ui.applyButton.clicked.emit()
    pump(widget)
    ui.submitButton.clicked.emit()
    assert "Tick the organs you reviewed" in standin.recorder.errors[-1]

    ui.reviewedOrgansList.item(SYNAPSE13.names.index("liver")).setCheckState(2)
    ui.submitButton.clicked.emit()
    pump(widget)
    assert ui.datasetStatusLabel.text == "Added case001 (reviewed)."
    assert ui.datasetCountsLabel.text == "Dataset: 1 reviewed (1 with some organs), 0 unlabeled"

    widget._parameters().finetuneSteps = 2
    ui.finetuneButton.clicked.emit()
    assert ui.finetuneButton.text == "Cancel fine-tuning"
    pump(widget)
    assert ui.finetuneButton.text == "Start fine-tuning"
    assert ui.finetuneStatusLabel.text == (
        "New model starter@2 selected. Better than its parent: mean Dice 0.650 -> 0.850 on the training cases."
    )
    assert standin.recorder.confirmations == []  # a better version is selected without asking
    assert ui.validationLabel.text.startswith("Validation at step 2: mean Dice 0.850")
    assert ui.diceTable.rowCount == 2
    assert ui.diceTable.cells[0, 0] == "Spleen" and ui.diceTable.cells[1, 3] == "+0.200"
    assert ui.modelComboBox.currentText == "starter@2"
    assert widget._parameters().model == "starter@2"


@pytest.mark.slow
def test_panel_suggest_loads_the_suggested_case(widget, standin):
    ui = widget.ui
    ui.addUnlabeledButton.clicked.emit()
    pump(widget)
    assert ui.datasetStatusLabel.text == "Added case001 (unlabeled)."
    ui.suggestButton.clicked.emit()
    pump(widget)
    assert widget._parameters().inputVolume.GetName() == "image"
    assert ui.datasetStatusLabel.text == "Loaded case001: most uncertain"

    ui.applyButton.clicked.emit()  # segment the suggested case, review it, submit it
    pump(widget)
    ui.reviewedOrgansList.item(SYNAPSE13.names.index("liver")).setCheckState(2)
    ui.submitButton.clicked.emit()
    pump(widget)
    assert ui.datasetStatusLabel.text == "Updated case001: was unlabeled, now reviewed."
    assert ui.datasetCountsLabel.text == "Dataset: 1 reviewed (1 with some organs), 0 unlabeled"


@pytest.mark.slow
def test_panel_imports_a_model_and_selects_it(widget, standin, tmp_path):
    bundle = tmp_path / "abdomen.json"  # the stand-in engine's "bundle" is a JSON description
    bundle.write_text('{"name": "abdomen", "version": 1, "description": "Imported", "spacing": [2, 2, 2]}')
    standin.recorder.open_file = str(bundle)
    widget.ui.importModelButton.clicked.emit()
    pump(widget)
    assert widget.ui.modelComboBox.currentText == "abdomen@1"
    assert widget._parameters().model == "abdomen@1"
    assert (
        "Imported" in widget.ui.modelDetailsLabel.text
        and "Voxel size: 2 × 2 × 2 mm" in widget.ui.modelDetailsLabel.text
    )
    assert "Imported model abdomen@1." in widget.ui.logTextEdit.plainText


def test_panel_settings_persist(widget, standin):
    parameters = widget._parameters()
    parameters.device = Device.CPU
    parameters.datasetDir = "/data/corrections"
    assert standin.settings.values["SCDLSegment/device"] == "cpu"
    assert standin.settings.values["SCDLSegment/dataset_dir"] == "/data/corrections"


@pytest.mark.slow
def test_panel_keeps_each_segmented_ct_in_the_dataset_once_when_asked(widget, standin):
    ui = widget.ui
    ui.applyButton.clicked.emit()
    pump(widget)
    assert ui.datasetCountsLabel.text == "Dataset: 0 reviewed, 0 unlabeled"  # off by default

    widget._parameters().collectUnlabeled = True
    assert standin.settings.values["SCDLSegment/collect_unlabeled"] is True
    ui.applyButton.clicked.emit()
    pump(widget)
    assert ui.datasetStatusLabel.text == "Kept in the dataset as case001 (unlabeled)."
    assert ui.datasetCountsLabel.text == "Dataset: 0 reviewed, 1 unlabeled"
    ui.applyButton.clicked.emit()  # the same CT again: one CT is one case
    pump(widget)
    assert ui.datasetStatusLabel.text == "Already in the dataset as case001 (unlabeled)."
    assert ui.datasetCountsLabel.text == "Dataset: 0 reviewed, 1 unlabeled"

    ui.reviewedOrgansList.item(SYNAPSE13.names.index("liver")).setCheckState(2)
    ui.submitButton.clicked.emit()
    pump(widget)
    assert ui.datasetStatusLabel.text == "Updated case001: was unlabeled, now reviewed."


# ---------------------------------------------------------------- found by reading Slicer's source (issue 18)


def test_a_segmentation_of_closed_surfaces_gets_a_message_and_stays_as_it_was(logic, standin):
    volume = add_ct(standin)
    surfaces = standin.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    surfaces.GetSegmentation().SetSourceRepresentationName("Closed surface")
    sphere = vtk.vtkSphereSource()
    sphere.Update()
    surfaces.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball", [1.0, 0.0, 0.0])
    undo_states = []

    outcome = logic.segment(
        volume,
        "starter",
        Device.CPU,
        segmentationNode=surfaces,
        timeout_s=30,
        beforeModify=lambda *nodes: undo_states.append(nodes),
    )

    assert "keeps its segments as 'Closed surface'" in outcome.error
    assert undo_states == [] and [segment.name for segment in existing_segments(surfaces)] == ["ball"]


def test_a_worker_that_died_while_idle_is_restarted_by_the_next_request(logic, standin):
    volume = add_ct(standin)
    assert logic.segment(volume, "starter", Device.CPU, timeout_s=30).error is None
    os.kill(logic.worker._process.pid, signal.SIGKILL)  # nothing polls an idle worker
    logic.worker._process.wait(10)

    again = logic.segment(volume, "starter", Device.CPU, timeout_s=30)

    assert again.error is None


def test_a_sample_that_fails_to_load_is_reported_and_the_button_comes_back(widget, standin, tmp_path, monkeypatch):
    broken = tmp_path / "sample.nrrd"
    broken.write_text("not a volume")
    answers = []  # the engine's answer, delivered as the poll timer would: after the click returned
    monkeypatch.setattr(widget.logic, "startCommand", lambda args, onDone: answers.append(onDone))

    widget.ui.loadSampleButton.clicked.emit()
    assert not widget.ui.loadSampleButton.enabled
    answers[0]([{"image": str(broken)}], None)

    assert widget.ui.loadSampleButton.enabled
    assert any(f"The sample CT {broken} could not be loaded" in error for error in standin.recorder.errors)


def test_the_editor_takes_keyboard_shortcuts_only_while_the_panel_is_shown(widget):
    editor = widget.ui.segmentEditorWidget
    widget.enter()
    assert ("installKeyboardShortcuts",) in editor.calls
    editor.calls.clear()
    widget.exit()
    assert editor.calls[-2:] == [("uninstallKeyboardShortcuts",), ("removeViewObservations",)]


def test_closing_the_scene_detaches_the_editor(widget, standin):
    editor = widget.ui.segmentEditorWidget
    editor.calls.clear()
    standin.scene.Clear(0)
    start = editor.calls.index(("setSegmentationNode", None))
    assert editor.calls[start + 1] == ("removeViewObservations",)


def test_effects_registered_later_join_the_editor(widget, standin):
    standin.effect_factory.register("Local threshold")
    assert widget.ui.segmentEditorWidget.calls[-1] == ("updateEffectList",)
    widget.cleanup()
    assert standin.effect_factory.slots == []


def test_the_shipped_terminology_is_loaded_at_startup(module, standin):
    module.SCDLSegment(types.SimpleNamespace())
    [(signal_name, slot)] = standin.recorder.app_connections
    assert signal_name == "startupCompleted()"
    slot()
    assert "SCDL Segment synapse13" in standin.loaded_terminologies()


def test_a_failed_install_is_a_dialog_and_the_buttons_wait_for_it(widget, standin, monkeypatch):
    ui = widget.ui
    states = []

    def failing_install(confirm=True):
        states.append((ui.applyButton.enabled, ui.finetuneButton.enabled, ui.installDependenciesButton.enabled))
        raise subprocess.CalledProcessError(1, ["pip", "install", "monai"])

    monkeypatch.setattr(widget.logic, "installDependencies", failing_install)
    ui.installDependenciesButton.clicked.emit()

    assert states == [(False, False, False)]  # Slicer's installers process GUI events while pip runs
    assert "Dependencies were not installed." in standin.recorder.errors[-1]
    assert "returned non-zero exit status 1" in standin.recorder.errors[-1]
    assert ui.applyButton.enabled and ui.finetuneButton.enabled


def test_the_self_test_skips_with_a_message_without_the_dependencies(module, monkeypatch):
    monkeypatch.setattr(module.SCDLSegmentLogic, "checkDependencies", missing("torch>=2.4"))
    monkeypatch.setattr(module, "default_python", lambda: sys.executable)  # PythonSlicer, in Slicer
    test = module.SCDLSegmentTest("test_SCDLSegment_loop")
    with pytest.raises(unittest.SkipTest, match="install the dependencies first .*torch>=2.4"):
        test.test_SCDLSegment_loop()


@pytest.mark.slow
@pytest.mark.parametrize("answer", [False, True])
def test_panel_asks_before_selecting_a_version_that_did_not_beat_its_parent(widget, standin, answer):
    ui = widget.ui
    standin.environment["FAKE_ENGINE_FINETUNE_WORSE"] = "1"
    standin.recorder.confirm_answer = answer
    ui.applyButton.clicked.emit()
    pump(widget)
    ui.reviewedOrgansList.item(SYNAPSE13.names.index("liver")).setCheckState(2)
    ui.submitButton.clicked.emit()
    pump(widget)
    widget._parameters().finetuneSteps = 2

    ui.finetuneButton.clicked.emit()
    pump(widget)

    assert "Not better than its parent" in standin.recorder.confirmations[-1]
    assert "Use the new version starter@2 anyway?" in standin.recorder.confirmations[-1]
    if answer:
        assert ui.modelComboBox.currentText == "starter@2"
    else:
        assert ui.finetuneStatusLabel.text == "starter@2 was registered; starter@1 stays selected."
        assert ui.modelComboBox.currentText == "starter@1"
