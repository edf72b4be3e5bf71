"""SCDL Segment: one-click abdominal organ segmentation, corrections fed back, fine-tuning in 3D Slicer.

This file is the Slicer glue only: the module's metadata, its parameter node, the panel (Widget),
the Logic (everything the panel does, usable from Python without the panel) and the self-test.
The engine never runs in Slicer's process: inference is a long-lived ``scdl worker`` child process
and fine-tuning a ``scdl finetune`` child process, both polled from a QTimer so the GUI never
waits. Slicer-free helpers (process runner, protocol client, label-table mapping, settings,
dependency check) live in ``SCDLSegmentLib`` and are tested without Slicer.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SCDLSegmentLib.settings import Device, Settings, find_scdlcore_root

# The scdlcore package ships next to this file (installed extension) or in ../SCDLCore (source
# checkout); putting its folder on sys.path makes the label tables importable. Nothing is installed.
_SCDLCORE_ROOT = find_scdlcore_root(Path(__file__).resolve().parent)
if _SCDLCORE_ROOT is not None and str(_SCDLCORE_ROOT) not in sys.path:
    sys.path.insert(0, str(_SCDLCORE_ROOT))

from scdlcore.labels import SYNAPSE13, LabelTable  # noqa: E402  (needs the path above)
from SCDLSegmentLib import catalog, dependencies, labelmap, progress, segmentations  # noqa: E402
from SCDLSegmentLib.engine import EngineCommand, default_python  # noqa: E402
from SCDLSegmentLib.jobs import CommandJob, FinetuneJob, FinetuneOutcome  # noqa: E402
from SCDLSegmentLib.worker import TERMINAL_EVENTS, WorkerClient  # noqa: E402

__all__ = [
    "SCDLSegment",
    "SCDLSegmentLogic",
    "SCDLSegmentParameterNode",
    "SCDLSegmentTest",
    "SCDLSegmentWidget",
    "SegmentationOutcome",
]

#: How often the panel polls the engine's child processes.
POLL_INTERVAL_MS = 100
#: Errors with a message meant for people (anything else is a bug: traceback). CalledProcessError is what
#: a failed pip or PyTorch install raises.
_USER_ERRORS = (ValueError, RuntimeError, OSError, TimeoutError, subprocess.CalledProcessError)
#: The organ terminology of the built-in label table (installed with the module, loaded at startup).
TERMINOLOGY_FILE = Path(__file__).resolve().parent / "Resources" / "SCDLSegment.term.json"


class SCDLSegment(ScriptedLoadableModule):
    """Module metadata (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SCDL Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Terminologies"]
        self.parent.contributors = ["SCDL Segment contributors"]
        self.parent.helpText = _(
            "Segments the 13 abdominal organs of the Synapse benchmark in a CT with one click, lets you "
            "correct the result, stores the corrected case as training data, and fine-tunes the model on "
            "your corrections (semi-supervised, with Semantic Class Distribution Learning). "
            "The model runs in a separate process, on the GPU when there is one. "
            "<ol><li><b>Segment</b>: pick the CT, the model and the device, click Segment.</li>"
            "<li><b>Review and submit</b>: fix segments in the embedded Segment Editor (its Undo, Ctrl+Z, "
            "restores the segments from before the result; the segmentation node stays, and the history starts "
            "anew when you pick another CT), tick the organs you checked, click Submit.</li>"
            "<li><b>Fine-tune</b>: train a new model version on the submitted cases; it is selected when it beats "
            "its parent on the validation cases, else you are asked first.</li></ol>"
            "Install the dependencies once under <i>Setup and advanced</i>."
        )
        self.parent.acknowledgementText = _(
            "SCDL: Semantic Class Distribution Learning for semi-supervised organ segmentation. The panel "
            "follows the patterns of the SlicerMONAIAuto3DSeg, SlicerTotalSegmentator and SlicerNNUnet "
            "extensions; PyTorch comes from the SlicerPyTorch extension."
        )
        # Loaded at startup, so a saved scene reopens with its organs' standard terminology.
        slicer.app.connect("startupCompleted()", loadTerminology)


def loadTerminology(path: Path = TERMINOLOGY_FILE) -> str:
    """Load a terminology context (``.term.json``) into Slicer; its name, or "" when it could not be loaded."""
    context = slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(path))
    if not context:
        logging.warning("The organ terminology %s could not be loaded; segments keep their names and colors.", path)
    return context


#
# Parameter node
#


@parameterNodeWrapper
class SCDLSegmentParameterNode:
    """The panel's state in the scene; the fields with a widget are bound through SlicerParameterName.

    inputVolume: the CT to segment.
    outputSegmentation: where the result goes; None = a new segmentation named after the volume.
    device: where the engine runs.
    finetuneSteps: training steps of one fine-tuning run; 0 = the engine's default for the device.
    datasetDir: the corrections dataset folder ("" = ~/SCDLSegment/dataset).
    modelDir: the model registry folder ("" = the engine's default registry).
    model: the selected model (``name@version``), set from the model combo box.
    collectUnlabeled: keep each segmented CT in the dataset as an unlabeled case.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    device: Device = Device.AUTO
    finetuneSteps: Annotated[int, WithinRange(0, 1000000)] = 0
    datasetDir: str = ""
    modelDir: str = ""
    model: str = ""
    collectUnlabeled: bool = False


#
# Widget
#


class SCDLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds the .ui to the parameter node and the Logic; all work is in the Logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: SCDLSegmentLogic | None = None
        self._parameterNode: SCDLSegmentParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._models: list[catalog.ModelEntry] = []
        self._organsTable: LabelTable | None = None  # the table the reviewed-organs list shows
        self._inputVolumeId: str | None = None
        self._pollTimer = None
        self._effectFactory = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SCDLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The embedded editor needs its parameter node before the scene, to store its selections there.
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self._segmentEditorNode())
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SCDLSegmentLogic()
        self.logic.onLog = self.appendLog
        self.logic.onWorkerStatus = self._onWorkerStatus

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.loadSampleButton.clicked.connect(self.onLoadSample)
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.refreshModelsButton.clicked.connect(lambda: self.refreshModels())
        self.ui.importModelButton.clicked.connect(self.onImportModel)
        self.ui.reviewAllButton.clicked.connect(lambda: self._checkAllOrgans(True))
        self.ui.reviewNoneButton.clicked.connect(lambda: self._checkAllOrgans(False))
        self.ui.submitButton.clicked.connect(lambda: self.onSubmit(labeled=True))
        self.ui.addUnlabeledButton.clicked.connect(lambda: self.onSubmit(labeled=False))
        self.ui.suggestButton.clicked.connect(self.onSuggest)
        self.ui.finetuneButton.clicked.connect(self.onFinetuneButton)
        self.ui.datasetDirButton.clicked.connect(lambda: self._chooseFolder("datasetDir", _("Dataset folder")))
        self.ui.modelDirButton.clicked.connect(lambda: self._chooseFolder("modelDir", _("Model folder")))
        self.ui.checkDependenciesButton.clicked.connect(self.onCheckDependencies)
        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.timeout.connect(self.onPoll)
        # Effects registered after this panel was built (other extensions, startup order) join its editor.
        self._effectFactory = slicer.qSlicerSegmentEditorEffectFactory.instance()
        self._effectFactory.connect("effectRegistered(QString)", self.onEffectRegistered)

        self.initializeParameterNode()
        self._fillOrgans(SYNAPSE13)
        self.refreshModels()
        self.refreshDataset()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._effectFactory is not None:
            self._effectFactory.disconnect("effectRegistered(QString)", self.onEffectRegistered)
            self._effectFactory = None
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        self.ui.segmentEditorWidget.installKeyboardShortcuts()  # Ctrl+Z, effect keys, Esc, as in Segment Editor
        self.initializeParameterNode()

    def exit(self) -> None:
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        self._disconnectParameterNode()

    def onEffectRegistered(self, effectName: str = "") -> None:
        self.ui.segmentEditorWidget.updateEffectList()

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancelSegmentation()  # its nodes are about to be removed
        self.setParameterNode(None)
        editor = self.ui.segmentEditorWidget  # detached, as Slicer's Segment Editor module does
        editor.setSegmentationNode(None)
        editor.removeViewObservations()

    def onSceneEndClose(self, caller, event) -> None:
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self._segmentEditorNode())
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: SCDLSegmentParameterNode | None) -> None:
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _disconnectParameterNode(self) -> None:
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def _parameters(self) -> SCDLSegmentParameterNode:
        """The parameter node, also for callbacks that arrive while the panel is not shown."""
        return self._parameterNode or self.logic.getParameterNode()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        self.logic.saveSettings(node)
        volumeId = node.inputVolume.GetID() if node.inputVolume else None
        if volumeId != self._inputVolumeId:  # a new CT: write into its own segmentation, not the last one's
            self._inputVolumeId = volumeId
            node.outputSegmentation = self.logic.segmentationFor(node.inputVolume) if node.inputVolume else None
        running = self.logic.segmentationRunning
        self.ui.applyButton.setEnabled(running or node.inputVolume is not None)
        self.ui.applyButton.setToolTip(
            _("Cancel the segmentation") if running else _("Segment the organs of the input CT")
        )
        self.ui.submitButton.setEnabled(node.inputVolume is not None and node.outputSegmentation is not None)
        self.ui.addUnlabeledButton.setEnabled(node.inputVolume is not None)
        self.ui.finetuneEstimateLabel.setText(progress.finetune_estimate(node.finetuneSteps or None, node.device.value))
        if node.outputSegmentation is not None and node.inputVolume is not None:
            self.ui.segmentEditorWidget.setSegmentationNode(node.outputSegmentation)
            self.ui.segmentEditorWidget.setSourceVolumeNode(node.inputVolume)

    # ---------------------------------------------------------------- segment

    def onApplyButton(self) -> None:
        if self.logic.segmentationRunning:
            self.logic.cancelSegmentation()  # reports the "Cancelling" state through onProgress
            return
        node = self._parameters()
        with _ErrorDialog(_("Segmentation could not start.")):
            if not self._dependenciesReady():
                return
            self.logic.startSegmentation(
                node.inputVolume,
                self._selectedModel(),
                node.device,
                segmentationNode=node.outputSegmentation,
                onProgress=self._showSegmentProgress,
                onDone=self._onSegmentationDone,
                beforeModify=self._saveStateForUndo,
                collectTo=self.logic.datasetDir(node) if node.collectUnlabeled else None,
            )
            self.ui.applyButton.setText(_("Cancel"))
            self.ui.segmentStatusLabel.setText("")
            self._startPolling()
        self._onParameterNodeModified()

    def _showSegmentProgress(self, stage: str, fraction: float) -> None:
        percent, text = progress.segment_progress(stage, fraction)
        if percent >= 0:
            self.ui.segmentProgressBar.setValue(percent)
        self.ui.segmentProgressBar.setFormat(f"{text}… %p%")

    def _saveStateForUndo(self, segmentationNode, volumeNode) -> None:
        """One undo state before the result is written: Undo in the editor reverts the whole result."""
        editor = self.ui.segmentEditorWidget
        editor.setSegmentationNode(segmentationNode)
        editor.setSourceVolumeNode(volumeNode)
        editor.saveStateForUndo()

    def _onSegmentationDone(self, outcome: SegmentationOutcome) -> None:
        self.ui.applyButton.setText(_("Segment"))
        if outcome.cancelled:
            self.ui.segmentProgressBar.setFormat(_("Cancelled"))
        elif outcome.error:
            self.ui.segmentProgressBar.setFormat(_("Failed"))
            slicer.util.errorDisplay(outcome.error, windowTitle=_("SCDL Segment"))
        else:
            self.ui.segmentProgressBar.setValue(100)
            self.ui.segmentProgressBar.setFormat(_("Done in {seconds:.1f} s").format(seconds=outcome.seconds or 0.0))
            self._parameters().outputSegmentation = outcome.segmentationNode
            self.ui.segmentStatusLabel.setText(progress.format_volumes(outcome.volumes_ml, outcome.table))
            self._fillOrgans(outcome.table)
        if outcome.collected is not None:  # kept by the engine even when the result itself was dropped
            self._showCollected(outcome.collected)
        self._onParameterNodeModified()

    def onLoadSample(self) -> None:
        with _ErrorDialog(_("The sample CT could not be loaded.")):
            self.logic.startLoadSample(self._onSampleLoaded)
            self.ui.loadSampleButton.setEnabled(False)
            self._startPolling()

    def _onSampleLoaded(self, volumeNode, error: str | None) -> None:
        self.ui.loadSampleButton.setEnabled(True)
        if error:
            slicer.util.errorDisplay(error, windowTitle=_("SCDL Segment"))
        else:
            self._parameters().inputVolume = volumeNode

    # ---------------------------------------------------------------- models

    def refreshModels(self, select: str | None = None) -> None:
        with _ErrorDialog(_("The model list could not be read.")):
            self.logic.startListModels(lambda models, error: self._onModelsListed(models, error, select))
            self._startPolling()

    def _onModelsListed(self, models, error: str | None, select: str | None) -> None:
        if error:
            self.ui.modelDetailsLabel.setText(_("No model list: {error}").format(error=error))
            return
        self._models = models
        wanted = catalog.pick_model(models, select or self._parameters().model)
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        for model in models:
            combo.addItem(model.ref, model.ref)
        combo.setCurrentIndex(models.index(wanted) if wanted else -1)
        combo.blockSignals(False)
        self.onModelChanged()

    def onModelChanged(self) -> None:
        model = next((m for m in self._models if m.ref == self.ui.modelComboBox.currentText), None)
        if model is None:
            self.ui.modelDetailsLabel.setText(_("No model selected."))
            return
        self._parameters().model = model.ref
        self._showModel(model, None)
        with _ErrorDialog(_("The model's description could not be read.")):
            self.logic.startModelInfo(model.ref, self._showModel)
            self._startPolling()

    def _showModel(self, model: catalog.ModelEntry | None, error: str | None) -> None:
        """Show a model's details; its organs become the reviewed-organs list."""
        if error:
            self.appendLog(error)
        if model is None or model.ref != self._parameters().model:
            return  # failed, or the selection moved on while the description was read
        self._models = [model if known.ref == model.ref else known for known in self._models]
        self.ui.modelDetailsLabel.setText(model.details())
        if model.labels != self._organsTable:  # keep the user's ticks when the organs stay the same
            self._fillOrgans(model.labels)

    def _selectedModel(self) -> str:
        model = self._parameters().model
        if not model:
            raise ValueError(_("No model is selected: click the refresh button next to 'Model' or import one."))
        return model

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Import a model bundle"), "", _("SCDL model bundles (*.scdlmodel);;All files (*)")
        )
        if not path:
            return
        with _ErrorDialog(_("The model could not be imported.")):
            self.logic.startImportModel(path, self._onModelImported)
            self._startPolling()

    def _onModelImported(self, ref: str | None, error: str | None) -> None:
        if error:
            slicer.util.errorDisplay(error, windowTitle=_("Import model"))
        else:
            self.appendLog(_("Imported model {model}.").format(model=ref))
            self.refreshModels(select=ref)

    def _onWorkerStatus(self, event: dict) -> None:
        if event.get("event") == "ready" and self.logic.worker is not None and self.logic.worker.info is not None:
            self.ui.deviceInfoLabel.setText(_("Detected: {info}").format(info=self.logic.worker.info.describe()))
        elif event.get("event") == "stopped":
            self.ui.deviceInfoLabel.setText(_("Engine not running (starts with the next segmentation)."))

    # ---------------------------------------------------------------- corrections

    def _fillOrgans(self, table: LabelTable) -> None:
        """List the table's organs, none ticked (a new result has not been reviewed yet)."""
        self._organsTable = table
        organs = self.ui.reviewedOrgansList
        organs.clear()
        for label in table.labels:
            item = qt.QListWidgetItem(label.display_name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Unchecked)
            item.setData(qt.Qt.UserRole, label.name)
            organs.addItem(item)

    def _checkAllOrgans(self, checked: bool) -> None:
        organs = self.ui.reviewedOrgansList
        for row in range(organs.count):
            organs.item(row).setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)

    def _reviewedOrgans(self) -> list[str]:
        organs = self.ui.reviewedOrgansList
        return [
            organs.item(row).data(qt.Qt.UserRole)
            for row in range(organs.count)
            if organs.item(row).checkState() == qt.Qt.Checked
        ]

    def onSubmit(self, labeled: bool) -> None:
        node = self._parameters()
        with _ErrorDialog(_("The case could not be added to the dataset.")):
            self.logic.startSubmitCase(
                node.inputVolume,
                node.outputSegmentation if labeled else None,
                self._reviewedOrgans() if labeled else [],
                self.logic.datasetDir(node),
                self._selectedModel(),
                node.device,
                onDone=self._onCaseAdded,
            )
            self.ui.datasetStatusLabel.setText(_("Adding the case…"))
            self._startPolling()

    def _onCaseAdded(self, result: dict | None, error: str | None) -> None:
        if error:
            self.ui.datasetStatusLabel.setText(_("The case was not added."))
            slicer.util.errorDisplay(error, windowTitle=_("Submit case"))
            return
        kind = _("reviewed") if result.get("labeled", True) else _("unlabeled")
        case, previous = result.get("case_id", ""), result.get("previous")
        # One CT is one case: submitting a CT the dataset holds (a suggested case) updates that case.
        message = _("Updated {case}: was {previous}, now {kind}.") if previous else _("Added {case} ({kind}).")
        self.ui.datasetStatusLabel.setText(message.format(case=case, previous=previous, kind=kind))
        self.refreshDataset()

    def _showCollected(self, collected: dict) -> None:
        """Say where the segmented CT was kept in the dataset (the worker adds it once per CT)."""
        if collected.get("error"):
            self.ui.datasetStatusLabel.setText(_("The CT was not kept in the dataset (see the log)."))
            self.appendLog(f"Keeping the CT in the dataset failed: {collected['error']}")
            return
        message = (
            _("Kept in the dataset as {case} (unlabeled).")
            if collected.get("new")
            else _("Already in the dataset as {case} ({status}).")
        )
        self.ui.datasetStatusLabel.setText(
            message.format(case=collected.get("case_id", ""), status=collected.get("status", ""))
        )
        self.refreshDataset()

    def refreshDataset(self) -> None:
        with _ErrorDialog(_("The dataset could not be read.")):
            self.logic.startDatasetSummary(self.logic.datasetDir(self._parameters()), self._onDatasetListed)
            self._startPolling()

    def _onDatasetListed(self, summary, error: str | None) -> None:
        text = _("Dataset: {summary}").format(summary=summary.describe()) if summary else _("Dataset: not readable yet")
        self.ui.datasetCountsLabel.setText(text)
        if error:
            self.appendLog(error)

    def onSuggest(self) -> None:
        node = self._parameters()
        with _ErrorDialog(_("No case could be suggested.")):  # also when no model is selected
            model = self._selectedModel()
            self.logic.startSuggestCase(self.logic.datasetDir(node), model, node.device, self._onSuggestion)
            self.ui.datasetStatusLabel.setText(_("Ranking the unlabeled cases with {model}…").format(model=model))
            self._startPolling()

    def _onSuggestion(self, suggestion, error: str | None) -> None:
        if error:
            self.ui.datasetStatusLabel.setText(_("No case was suggested."))
            slicer.util.errorDisplay(error, windowTitle=_("Suggest next case"))
        elif suggestion is None:
            self.ui.datasetStatusLabel.setText(_("Nothing to suggest: add CTs as unlabeled cases first."))
        else:
            with _ErrorDialog(_("The suggested case could not be loaded.")):
                self._parameters().inputVolume = slicer.util.loadVolume(suggestion.image)
                self.ui.datasetStatusLabel.setText(
                    _("Loaded {case}: {reason}").format(case=suggestion.case_id, reason=suggestion.reason)
                )

    # ---------------------------------------------------------------- fine-tune

    def onFinetuneButton(self) -> None:
        if self.logic.finetuneRunning:
            self.logic.cancelFinetune()
            self.ui.finetuneStatusLabel.setText(_("Cancelling…"))
            return
        node = self._parameters()
        with _ErrorDialog(_("Fine-tuning could not start.")):
            if not self._dependenciesReady():
                return
            self.logic.startFinetune(
                self.logic.datasetDir(node),
                self._selectedModel(),
                node.finetuneSteps or None,
                node.device,
                onEvent=self._onFinetuneEvent,
                onDone=self._onFinetuneDone,
            )
            self.ui.finetuneButton.setText(_("Cancel fine-tuning"))
            self.ui.finetuneProgressBar.setValue(0)
            self.ui.finetuneStatusLabel.setText(_("Starting…"))
            self.ui.validationLabel.setText("")
            self.ui.diceTable.setRowCount(0)
            self._startPolling()

    def _onFinetuneEvent(self, event: dict) -> None:
        if event.get("event") == "progress":
            percent, text = progress.format_train_progress(event)
            if percent is not None:
                self.ui.finetuneProgressBar.setValue(percent)
            self.ui.finetuneStatusLabel.setText(text)
        elif event.get("event") == "validation":
            table = self.logic.labelTable(self._parameters().model)
            self.ui.validationLabel.setText(progress.format_validation(event, table))

    def _onFinetuneDone(self, outcome: FinetuneOutcome) -> None:
        self.ui.finetuneButton.setText(_("Start fine-tuning"))
        if outcome.cancelled:
            self.ui.finetuneStatusLabel.setText(_("Cancelled; no model was registered."))
            return
        if outcome.error:
            self.ui.finetuneStatusLabel.setText(_("Failed."))
            slicer.util.errorDisplay(outcome.error, windowTitle=_("Fine-tune"))
            return
        self.ui.finetuneProgressBar.setValue(100)
        parent = self._parameters().model
        rows = progress.dice_rows(outcome.before, outcome.after, self.logic.labelTable(parent))
        self.ui.diceTable.setRowCount(len(rows))
        for row, cells in enumerate(rows):
            for column, text in enumerate(cells):
                self.ui.diceTable.setItem(row, column, qt.QTableWidgetItem(text))
        # A version that did not beat its parent is never selected silently.
        question = _("{verdict}\n\nUse the new version {model} anyway?").format(
            verdict=outcome.verdict, model=outcome.model
        )
        if outcome.better or slicer.util.confirmYesNoDisplay(question, windowTitle=_("Fine-tune")):
            self.ui.finetuneStatusLabel.setText(
                _("New model {model} selected.").format(model=outcome.model)
                + (f" {outcome.verdict}" if outcome.verdict else "")
            )
            self.refreshModels(select=outcome.model)
        else:
            self.ui.finetuneStatusLabel.setText(
                _("{model} was registered; {parent} stays selected.").format(model=outcome.model, parent=parent)
            )
            self.refreshModels(select=parent)

    # ---------------------------------------------------------------- setup

    def _chooseFolder(self, parameter: str, caption: str) -> None:
        parameters = self._parameters()
        folder = qt.QFileDialog.getExistingDirectory(self.parent, caption, getattr(parameters, parameter))
        if folder:
            setattr(parameters, parameter, folder)
            if parameter == "modelDir":
                self.refreshModels()
            else:
                self.refreshDataset()

    def onCheckDependencies(self) -> None:
        statuses = self.logic.checkDependencies()
        for status in statuses:
            self.appendLog(status.describe())
        missing = dependencies.unsatisfied(statuses)
        self.ui.dependencyStatusLabel.setText(
            _("Missing: {packages}").format(packages=", ".join(missing))
            if missing
            else _("All dependencies installed.")
        )
        self.ui.installDependenciesButton.setEnabled(bool(missing))

    def onInstallDependencies(self) -> None:
        with _ErrorDialog(_("Dependencies were not installed.")):
            self._install(confirm=True)
        self.onCheckDependencies()

    def _install(self, confirm: bool) -> None:
        """Install the dependencies with the buttons that need them disabled: Slicer's installers keep
        processing GUI events while pip runs."""
        buttons = (self.ui.applyButton, self.ui.finetuneButton, self.ui.installDependenciesButton)
        for button in buttons:
            button.setEnabled(False)
        try:
            self.logic.installDependencies(confirm=confirm)
        finally:
            for button in buttons[:2]:
                button.setEnabled(True)
            self._onParameterNodeModified()

    def _dependenciesReady(self) -> bool:
        """True when the engine's packages are there; else offer to install them (on this GUI thread)."""
        missing = dependencies.unsatisfied(self.logic.checkDependencies())
        if not missing:
            return True
        question = _(
            "SCDL Segment needs these Python packages: {packages}.\n\nInstall them now? This can take "
            "several minutes (PyTorch is large)."
        ).format(packages=", ".join(missing))
        if slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Install dependencies")):
            with _ErrorDialog(_("Dependencies were not installed.")):
                self._install(confirm=False)
            self.onCheckDependencies()
        return False

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    # ---------------------------------------------------------------- helpers

    def onPoll(self) -> None:
        self.logic.poll()
        if not self.logic.busy:
            self._pollTimer.stop()

    def _startPolling(self) -> None:
        if not self._pollTimer.isActive():
            self._pollTimer.start()

    @staticmethod
    def _segmentEditorNode():
        node = slicer.mrmlScene.GetSingletonNode("SCDLSegment", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "SCDLSegment editor")
            node.SetSingletonTag("SCDLSegment")  # kept when the scene is closed, found again by GetSingletonNode
        return node


class _ErrorDialog:
    """Context manager: an error with a message for people becomes a dialog, not a traceback."""

    def __init__(self, title: str) -> None:
        self.title = title

    def __enter__(self) -> None:
        return None

    def __exit__(self, errorType, error, traceback) -> bool:
        if error is None or not isinstance(error, _USER_ERRORS):
            return False
        logging.warning("%s %s", self.title, error)
        slicer.util.errorDisplay(f"{self.title}\n\n{error}", windowTitle=_("SCDL Segment"))
        return True


#
# Logic
#


@dataclass
class SegmentationOutcome:
    """How a segmentation ended: the segmentation node, or an error, or a cancel."""

    segmentationNode: Any = None
    table: LabelTable = SYNAPSE13
    volumes_ml: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    error: str | None = None
    cancelled: bool = False
    collected: dict[str, Any] | None = None


@dataclass
class _SegmentationJob:
    volumeNode: Any
    segmentationNode: Any
    table: LabelTable
    organs: list[str] | None
    folder: Path
    onProgress: Callable[[str, float], None]
    onDone: Callable[[SegmentationOutcome], None]
    beforeModify: Callable[[Any, Any], None] | None
    requestId: str | None = None
    cancelled: bool = False  # a result that was already on its way is then dropped


class SCDLSegmentLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from Python without it.

    The engine runs in child processes: :attr:`worker` (``scdl worker``, kept alive so the model
    stays loaded), a fine-tuning process, and short listing commands. ``start...`` methods return
    at once and report through callbacks that :meth:`poll` delivers; the panel calls :meth:`poll`
    from a QTimer. The blocking forms (:meth:`segment`, :meth:`submitCase`, :meth:`finetune`,
    :meth:`listModels`...) poll until done, for scripts and the self-test::

        logic = SCDLSegmentLogic()
        outcome = logic.segment(slicer.util.getNode("CT"), "starter", Device.CPU)
        print([outcome.segmentationNode.GetSegmentation().GetNthSegment(i).GetName() for i in range(13)])

    Args:
        engine: how to start the engine; default ``PythonSlicer -m scdlcore`` with the bundled package.
        settingsStore: where settings persist; default the application settings (QSettings).
    """

    def __init__(self, engine: EngineCommand | None = None, settingsStore=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._store = settingsStore if settingsStore is not None else qt.QSettings()
        self.settings = Settings.load(self._store)
        self._engine = engine or EngineCommand(
            python=default_python(), python_path=(str(_SCDLCORE_ROOT),) if _SCDLCORE_ROOT is not None else ()
        )
        self.worker: WorkerClient | None = None
        self.models: list[catalog.ModelEntry] = []
        self.onLog: Callable[[str], None] = logging.info
        self.onWorkerStatus: Callable[[dict], None] = lambda event: None
        self._segmentation: _SegmentationJob | None = None
        self._finetune: FinetuneJob | None = None
        self._commands: list[CommandJob] = []
        self._terminologies: set[str] = set()
        self._workerModelDir = ""

    # ---------------------------------------------------------------- parameters and settings

    def getParameterNode(self) -> SCDLSegmentParameterNode:
        node = super().getParameterNode()
        fresh = not node.GetParameter("SCDLSegment.settingsApplied")
        parameters = SCDLSegmentParameterNode(node)
        if fresh:  # a new scene starts from the settings the user chose last time
            parameters.device = self.settings.device
            parameters.finetuneSteps = self.settings.finetune_steps
            parameters.datasetDir = self.settings.dataset_dir
            parameters.modelDir = self.settings.model_dir
            parameters.model = self.settings.model
            parameters.collectUnlabeled = self.settings.collect_unlabeled
            node.SetParameter("SCDLSegment.settingsApplied", "1")
        return parameters

    def saveSettings(self, parameters: SCDLSegmentParameterNode) -> None:
        """Remember the panel's choices for the next session."""
        self.settings = Settings(
            dataset_dir=parameters.datasetDir,
            model_dir=parameters.modelDir,
            model=parameters.model,
            device=parameters.device,
            finetune_steps=parameters.finetuneSteps,
            collect_unlabeled=parameters.collectUnlabeled,
        )
        self.settings.save(self._store)

    def datasetDir(self, parameters: SCDLSegmentParameterNode | None = None) -> Path:
        settings = self.settings if parameters is None else replace(self.settings, dataset_dir=parameters.datasetDir)
        return settings.effective_dataset_dir()

    def engine(self) -> EngineCommand:
        """The engine command with the chosen model folder."""
        return replace(self._engine, model_dir=self.settings.model_dir) if self.settings.model_dir else self._engine

    @staticmethod
    def segmentationFor(volumeNode):
        """The first segmentation whose reference geometry is ``volumeNode``, or None."""
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        return next(
            (
                node
                for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
                if node.GetNodeReferenceID(role) == volumeNode.GetID()
            ),
            None,
        )

    def labelTable(self, model: str) -> LabelTable:
        """The label table of a model from the last listing (Synapse-13 if unknown)."""
        entry = next((entry for entry in self.models if model in (entry.ref, entry.name)), None)
        return entry.labels if entry is not None else SYNAPSE13

    # ---------------------------------------------------------------- processes

    @property
    def segmentationRunning(self) -> bool:
        return self._segmentation is not None

    @property
    def finetuneRunning(self) -> bool:
        return self._finetune is not None

    @property
    def busy(self) -> bool:
        """True while any child process still has events to deliver."""
        workerBusy = self.worker is not None and self.worker.running and bool(self.worker.pending)
        return workerBusy or self._finetune is not None or bool(self._commands)

    def poll(self) -> None:
        """Deliver the events of every child process (the panel calls this from its QTimer)."""
        if self.worker is not None:
            self.worker.poll()
        if self._finetune is not None:
            self._finetune.poll()
        for job in list(self._commands):
            job.poll()
            if not job.running:
                self._commands.remove(job)

    def waitFor(self, isDone: Callable[[], bool], timeout_s: float) -> None:
        """Poll until ``isDone()`` (blocking; for scripts and tests, never for the panel)."""
        deadline = time.monotonic() + timeout_s
        while not isDone():
            if time.monotonic() > deadline:
                raise TimeoutError(f"The SCDL engine did not finish within {timeout_s:.0f} s.")
            self.poll()
            time.sleep(0.05)

    def runBlocking(self, start: Callable[[Callable[..., None]], None], timeout_s: float) -> tuple:
        """Start a job with a done-callback and wait for it (blocking: scripts and tests, never the panel).

        Returns:
            The arguments the job called its callback with.
        """
        calls: list[tuple] = []
        start(lambda *args: calls.append(args))
        self.waitFor(lambda: bool(calls), timeout_s)
        return calls[0]

    def ensureWorker(self, model: str, device: Device) -> WorkerClient:
        """The running worker for this model and device; (re)started when either changed.

        Raises:
            RuntimeError: the running worker still has requests to answer for another model or device.
        """
        engine = self.engine()
        args = engine.worker(model, device)
        self._noticeWorkerExit()
        if (
            self.worker is not None
            and self.worker.running
            and self.worker.args == args
            and self._workerModelDir == engine.model_dir
        ):
            return self.worker
        if self.worker is not None and self.worker.running:
            if self.worker.pending:
                raise RuntimeError(
                    "The SCDL engine is still busy with the previous model or device: wait for it to finish "
                    "(or cancel it) before switching."
                )
            self.worker.close()  # idle: it exits at once
        self.worker = WorkerClient(args, env=self._environment(), on_status=self._onWorkerStatus)
        self._workerModelDir = engine.model_dir
        self.onLog(f"Starting the SCDL engine: model {model}, device {device.value}.")
        self.worker.start()
        return self.worker

    def _anyWorker(self, model: str, device: Device) -> WorkerClient:
        """The running worker, whatever model it holds (adding a case needs none; it records that model, the
        one that segmented the case), else a new one for ``model`` on ``device``."""
        self._noticeWorkerExit()
        if self.worker is not None and self.worker.running and self._workerModelDir == self.engine().model_dir:
            return self.worker
        return self.ensureWorker(model, device)

    def _noticeWorkerExit(self) -> None:
        """Deliver a worker's pending events: one that died while idle (nothing polls then) is seen as stopped
        here, and the next request starts a new one instead of failing."""
        if self.worker is not None:
            self.worker.poll()

    def startCommand(self, args: list[str], onDone: Callable[[Any, str | None], None]) -> None:
        """Run a one-shot engine command that prints one JSON document; ``onDone(data, error)``."""
        self._commands.append(CommandJob(args, self._environment(), onDone, self.onLog).start())

    def runCommand(self, args: list[str], timeout_s: float = 300.0) -> Any:
        """Blocking :meth:`startCommand`; returns the JSON document or raises RuntimeError."""
        data, error = self.runBlocking(lambda done: self.startCommand(args, done), timeout_s)
        if error:
            raise RuntimeError(error)
        return data

    def shutdown(self) -> None:
        """Stop every child process (Slicer is closing or the module is reloaded)."""
        if self.worker is not None:
            self.worker.close()
        if self._finetune is not None:
            self._finetune.cancel()
        for job in self._commands:
            job.process.cancel()
        self._commands.clear()

    def _environment(self) -> dict[str, str]:
        """The engine's environment: Slicer's startup environment (PythonSlicer sets up the rest)."""
        return self.engine().environment(slicer.util.startupEnvironment())

    def _onWorkerStatus(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "log":
            self.onLog(event.get("message", ""))
        elif kind == "ready" and self.worker is not None and self.worker.info is not None:
            self.onLog(f"SCDL engine ready: {self.worker.info.model} on {self.worker.info.describe()}.")
        elif kind in ("stopped", "error") and event.get("message"):
            self.onLog(event["message"])
        self.onWorkerStatus(event)

    # ---------------------------------------------------------------- listings

    def startListModels(self, onDone: Callable[[list[catalog.ModelEntry] | None, str | None], None]) -> None:
        self.startCommand(self.engine().models_list(), self._parsed(catalog.parse_models, onDone, remember=True))

    def listModels(self) -> list[catalog.ModelEntry]:
        self.models = catalog.parse_models(self.runCommand(self.engine().models_list()))
        return self.models

    def startModelInfo(self, model: str, onDone: Callable[[catalog.ModelEntry | None, str | None], None]) -> None:
        """Read a model's full description (organs, voxel size, lineage, metrics); it replaces the
        listing's short entry in :attr:`models`."""

        def done(entry: catalog.ModelEntry | None, error: str | None) -> None:
            if entry is not None:
                listed = next((known for known in self.models if known.ref == entry.ref), None)
                entry = replace(entry, builtin=listed.builtin) if listed is not None else entry
                self.models = [entry if known.ref == entry.ref else known for known in self.models]
            onDone(entry, error)

        self.startCommand(
            self.engine().models_info(model), self._parsed(lambda data: catalog.parse_models([data])[0], done)
        )

    def startImportModel(self, path: str, onDone: Callable[[str | None, str | None], None]) -> None:
        """Copy a model bundle (for offline sites) into the registry; ``onDone(name@version, error)``."""
        self.startCommand(self.engine().models_import(path), self._parsed(_importedRef, onDone))

    def startDatasetSummary(
        self, datasetDir: Path, onDone: Callable[[catalog.DatasetSummary | None, str | None], None]
    ) -> None:
        if not Path(datasetDir).is_dir():
            onDone(catalog.DatasetSummary(0, 0, 0), None)  # nothing submitted yet
            return
        self.startCommand(self.engine().dataset_list(datasetDir), self._parsed(catalog.parse_dataset, onDone))

    def datasetSummary(self, datasetDir: Path) -> catalog.DatasetSummary:
        return catalog.parse_dataset(self.runCommand(self.engine().dataset_list(datasetDir)))

    def startSuggestCase(
        self,
        datasetDir: Path,
        model: str,
        device: Device,
        onDone: Callable[[catalog.Suggestion | None, str | None], None],
    ) -> None:
        """Ask the engine which unlabeled case to review next: ``model`` scores every unlabeled case on
        ``device`` (the networks' disagreement, or the softmax entropy) in a child process."""
        if not Path(datasetDir).is_dir():
            raise ValueError(f"The dataset folder {datasetDir} does not exist yet: add cases first.")
        self.startCommand(
            self.engine().dataset_suggest(datasetDir, model, device), self._parsed(catalog.parse_suggestion, onDone)
        )

    def startLoadSample(self, onDone: Callable[[Any, str | None], None], name: str = "ct_abdomen") -> None:
        """Fetch a public sample CT into the engine's cache (first time only) and load it."""

        def loaded(image: str | None, error: str | None) -> None:
            if error:
                onDone(None, error)
                return
            try:
                volume = slicer.util.loadVolume(image)
            except _USER_ERRORS as err:  # a failure here would otherwise end in the poll timer, unreported
                onDone(None, f"The sample CT {image} could not be loaded: {err}")
                return
            onDone(volume, None)

        self.startCommand(self.engine().sample_data(name), self._parsed(_sampleImage, loaded))

    def loadSampleVolume(self, name: str = "ct_abdomen"):
        """Blocking :meth:`startLoadSample`; returns the volume node."""
        return slicer.util.loadVolume(_sampleImage(self.runCommand(self.engine().sample_data(name), timeout_s=900.0)))

    def _parsed(self, parse: Callable[[Any], Any], onDone: Callable[[Any, str | None], None], remember: bool = False):
        def done(data: Any, error: str | None) -> None:
            if error:
                onDone(None, error)
                return
            try:
                value = parse(data)
            except ValueError as err:
                onDone(None, str(err))
                return
            if remember:
                self.models = value
            onDone(value, None)

        return done

    # ---------------------------------------------------------------- segment

    def startSegmentation(
        self,
        volumeNode,
        model: str,
        device: Device,
        segmentationNode=None,
        organs: list[str] | None = None,
        onProgress: Callable[[str, float], None] | None = None,
        onDone: Callable[[SegmentationOutcome], None] | None = None,
        beforeModify: Callable[[Any, Any], None] | None = None,
        collectTo: Path | None = None,
    ) -> None:
        """Segment the organs of a CT volume in the worker; the result arrives through ``onDone``.

        The volume is written to a temporary NRRD (its geometry exactly), the worker writes a label
        map on the same grid, and :meth:`importLabelmap` turns it into one segment per organ.

        Args:
            volumeNode: the CT (vtkMRMLScalarVolumeNode), in HU.
            model: model to use (``name`` or ``name@version``).
            device: where the worker runs.
            segmentationNode: where to write; None = a new segmentation named after the volume.
            organs: machine names of the organs to segment; None = all of the model's organs.
            onProgress: ``(stage, fraction)`` for the progress bar (stages: ``progress.SEGMENT_STAGES``).
            onDone: called once with the outcome.
            beforeModify: ``(segmentationNode, volumeNode)``, called once right before the segments are
                written (the panel saves one undo state there).
            collectTo: a dataset folder where the worker keeps the CT as an unlabeled case (once per CT);
                the outcome's ``collected`` says which case it is.

        Raises:
            RuntimeError: a segmentation is already running.
            ValueError: no volume, or an organ the model does not have.
        """
        if self._segmentation is not None:
            raise RuntimeError("A segmentation is already running: cancel it or wait for it to finish.")
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError("Select the CT volume to segment.")
        table = self.labelTable(model)
        if organs is not None:
            labelmap.reviewed_organs(table, organs)  # validates the names
        job = _SegmentationJob(
            volumeNode,
            segmentationNode,
            table,
            organs,
            Path(slicer.util.tempDirectory("SCDLSegment")),
            onProgress or (lambda stage, fraction: None),
            onDone or (lambda outcome: None),
            beforeModify,
        )
        try:
            job.onProgress("export", 0.0)
            inputPath = job.folder / "input.nrrd"
            _exportForEngine(volumeNode, inputPath)
            worker = self.ensureWorker(model, device)
            job.onProgress("start", 0.0)
            fields: dict[str, Any] = {"input": str(inputPath), "output": str(job.folder / "labels.nrrd")}
            if organs is not None:
                fields["organs"] = list(organs)
            if collectTo is not None:
                fields["collect"] = str(collectTo)
            job.requestId = worker.request("segment", self._onSegmentationEvent, **fields)
        except BaseException:
            shutil.rmtree(job.folder, ignore_errors=True)
            raise
        self._segmentation = job

    def segment(
        self, volumeNode, model: str, device: Device, timeout_s: float = 1800.0, **kwargs
    ) -> SegmentationOutcome:
        """Blocking :meth:`startSegmentation`; returns the outcome (check its ``error``)."""
        (outcome,) = self.runBlocking(
            lambda done: self.startSegmentation(volumeNode, model, device, onDone=done, **kwargs), timeout_s
        )
        return outcome

    def cancelSegmentation(self) -> None:
        """Cancel the running segmentation; the worker is ended if it does not stop in time."""
        job = self._segmentation
        if job is not None and job.requestId is not None and self.worker is not None:
            job.cancelled = True
            job.onProgress("cancel", 0.0)
            self.worker.cancel(job.requestId)

    def _onSegmentationEvent(self, event: dict) -> None:
        job = self._segmentation
        kind = event.get("event")
        if job is None:
            return
        if kind == "progress":
            job.onProgress(str(event.get("stage", "infer")), float(event.get("progress", 0.0)))
        elif kind == "result":  # the engine kept the CT (collect) whatever becomes of the result here
            self._finishSegmentation(replace(self._resultOutcome(job, event), collected=event.get("collected")))
        elif kind in TERMINAL_EVENTS:
            cancelled = kind == "cancelled"
            message = None if cancelled else str(event.get("message") or "The SCDL engine reported an error.")
            self._finishSegmentation(SegmentationOutcome(table=job.table, error=message, cancelled=cancelled))

    def _resultOutcome(self, job: _SegmentationJob, event: dict) -> SegmentationOutcome:
        """The engine's result imported as segments, unless it was cancelled or its volume has gone meanwhile."""
        if job.cancelled:
            return SegmentationOutcome(table=job.table, cancelled=True)
        if not slicer.mrmlScene.IsNodePresent(job.volumeNode):
            return SegmentationOutcome(
                table=job.table,
                error=(
                    f"The volume {job.volumeNode.GetName()!r} was removed from the scene while it was segmented; "
                    "nothing was imported."
                ),
            )
        if job.segmentationNode is not None and not slicer.mrmlScene.IsNodePresent(job.segmentationNode):
            self.onLog("The segmentation chosen for the result was removed meanwhile; the result goes into a new one.")
            job.segmentationNode = None
        job.onProgress("import", 0.0)
        try:
            node = self.importLabelmap(
                event.get("output") or job.folder / "labels.nrrd",
                job.volumeNode,
                job.segmentationNode,
                job.table,
                job.organs,
                job.beforeModify,
            )
        except _USER_ERRORS as err:
            return SegmentationOutcome(table=job.table, error=str(err))
        return SegmentationOutcome(node, job.table, dict(event.get("volumes_ml") or {}), event.get("seconds"))

    def _finishSegmentation(self, outcome: SegmentationOutcome) -> None:
        job, self._segmentation = self._segmentation, None
        shutil.rmtree(job.folder, ignore_errors=True)
        job.onDone(outcome)

    def importLabelmap(
        self,
        labelPath: str | Path,
        volumeNode,
        segmentationNode=None,
        table: LabelTable = SYNAPSE13,
        organs: list[str] | None = None,
        beforeModify: Callable[[Any, Any], None] | None = None,
    ):
        """Write a label map file (the engine's output, on the volume's grid) into a segmentation.

        One segment per organ with the standard name, color and terminology, tagged with
        ``labelmap.ORGAN_TAG`` (see :func:`SCDLSegmentLib.segmentations.import_result`). A new
        segmentation is named after the volume and follows its transform; a given one keeps its own.
        ``beforeModify`` runs once before any segment changes: the panel's Undo then restores the
        segments from before (a segmentation node made for the result stays, empty).

        Returns:
            The segmentation node.

        Raises:
            ValueError: the label map is not on the volume's grid, or the segmentation's segments are not
                binary labelmaps; nothing was changed.
        """
        self._ensureTerminology(table)
        with segmentations.result_labelmap(slicer.mrmlScene, labelPath, volumeNode) as labelNode:
            return segmentations.import_result(labelNode, volumeNode, segmentationNode, table, organs, beforeModify)

    def _ensureTerminology(self, table: LabelTable) -> None:
        """Load the table's terminology context once, so Slicer shows the organs' standard codes (the built-in
        table's was loaded at startup; another table's is written to a temporary file first)."""
        if table.name in self._terminologies:
            return
        path = TERMINOLOGY_FILE
        if table.slicer_terminology() != SYNAPSE13.slicer_terminology():
            path = Path(slicer.util.tempDirectory("SCDLSegment-terminology")) / f"SCDLSegment-{table.name}.term.json"
            path.write_text(json.dumps(table.slicer_terminology(), indent=2), encoding="utf-8")
        if loadTerminology(path):
            self._terminologies.add(table.name)

    # ---------------------------------------------------------------- corrections

    def exportCase(
        self, volumeNode, segmentationNode, folder: Path, table: LabelTable = SYNAPSE13
    ) -> tuple[Path, Path | None]:
        """Write the CT and (if given) its organ label map on the CT's grid with the table's fixed values.

        Returns:
            ``(image path, label path or None)``, both NRRD in ``folder``.

        Raises:
            ValueError: two segments claim one organ.
        """
        imagePath, labelPath = folder / "image.nrrd", folder / "label.nrrd"
        _exportForEngine(volumeNode, imagePath)
        if segmentationNode is None:
            return imagePath, None
        labels, overlap = segmentations.export_labels(segmentationNode, volumeNode, table)
        if overlap:
            self.onLog(
                f"{overlap} voxels belong to more than one organ; the organ later in the label table keeps them."
            )
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        labelNode = slicer.util.addVolumeFromArray(labels, ijkToRas, "SCDLSegment export", "vtkMRMLLabelMapVolumeNode")
        try:
            _exportForEngine(labelNode, labelPath)
        finally:
            slicer.mrmlScene.RemoveNode(labelNode)
        return imagePath, labelPath

    def startSubmitCase(
        self,
        volumeNode,
        segmentationNode,
        reviewed: list[str],
        datasetDir: Path,
        model: str,
        device: Device,
        onDone: Callable[[dict | None, str | None], None],
    ) -> None:
        """Add a case to the dataset through the worker: reviewed (image + label map + the organs the
        user checked) when ``segmentationNode`` is given, unlabeled (image only) when it is None.

        Raises:
            ValueError: no volume, no reviewed organ for a labeled case, or two segments for one organ.
        """
        if volumeNode is None:
            raise ValueError("Select the CT volume of the case.")
        table = self.labelTable(model)
        reviewed = labelmap.reviewed_organs(table, reviewed)
        if segmentationNode is not None and not reviewed:
            raise ValueError("Tick the organs you reviewed (corrected or confirmed) before submitting the case.")
        folder = Path(slicer.util.tempDirectory("SCDLSegment-case"))

        def handle(event: dict) -> None:
            if event.get("event") not in TERMINAL_EVENTS:
                return
            shutil.rmtree(folder, ignore_errors=True)
            if event.get("event") == "result":
                onDone(event, None)
            else:
                onDone(None, str(event.get("message") or "The case was not added."))

        try:
            imagePath, labelPath = self.exportCase(volumeNode, segmentationNode, folder, table)
            Path(datasetDir).mkdir(parents=True, exist_ok=True)
            self._anyWorker(model, device).request(
                "add_case",
                handle,
                dataset=str(datasetDir),
                image=str(imagePath),
                label=None if labelPath is None else str(labelPath),
                reviewed=reviewed,
            )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def submitCase(
        self,
        volumeNode,
        segmentationNode,
        reviewed: list[str],
        datasetDir: Path,
        model: str,
        device: Device,
        timeout_s: float = 300.0,
    ) -> dict:
        """Blocking :meth:`startSubmitCase`; returns the worker's result or raises RuntimeError."""
        result, error = self.runBlocking(
            lambda done: self.startSubmitCase(volumeNode, segmentationNode, reviewed, datasetDir, model, device, done),
            timeout_s,
        )
        if error:
            raise RuntimeError(error)
        return result

    # ---------------------------------------------------------------- fine-tune

    def startFinetune(
        self,
        datasetDir: Path,
        model: str,
        steps: int | None,
        device: Device,
        onEvent: Callable[[dict], None] | None = None,
        onDone: Callable[[FinetuneOutcome], None] | None = None,
    ) -> None:
        """Fine-tune ``model`` on the dataset in a ``scdl finetune`` child process on ``device``.

        ``onEvent`` receives ``progress`` (step, total, losses, lr, eta_s) and ``validation`` (dice,
        mean_dice) events; ``onDone`` the outcome with the new model version.

        Raises:
            RuntimeError: fine-tuning is already running.
        """
        if self._finetune is not None:
            raise RuntimeError("Fine-tuning is already running: cancel it or wait for it to finish.")
        onDone = onDone or (lambda outcome: None)

        def done(outcome: FinetuneOutcome) -> None:
            self._finetune = None
            onDone(outcome)

        args = self.engine().finetune(datasetDir, model, steps, device)
        if device is not Device.CPU and self.worker is not None and self.worker.running and not self.worker.pending:
            self.worker.close()  # its model and cached GPU memory would compete with training on a small GPU
            self.onLog(
                "The SCDL engine was stopped to free the GPU for fine-tuning; the next segmentation restarts it."
            )
        self._finetune = FinetuneJob(
            args, self._environment(), onEvent or (lambda event: None), done, self.onLog
        ).start()
        self.onLog(f"Fine-tuning {model} for {steps} steps on {datasetDir} (device {device.value}).")

    def finetune(
        self, datasetDir: Path, model: str, steps: int | None, device: Device, timeout_s: float = 3600.0
    ) -> FinetuneOutcome:
        """Blocking :meth:`startFinetune`; returns the outcome (check its ``error``)."""
        (outcome,) = self.runBlocking(
            lambda done: self.startFinetune(datasetDir, model, steps, device, onDone=done), timeout_s
        )
        return outcome

    def cancelFinetune(self) -> None:
        """Kill the fine-tuning process tree; nothing is registered (the next run starts afresh, with the
        cases the dataset holds then)."""
        if self._finetune is not None:
            self._finetune.cancel()

    # ---------------------------------------------------------------- dependencies

    def checkDependencies(self) -> list[dependencies.RequirementStatus]:
        """torch and the packages of Resources/requirements.txt, checked without importing them."""
        requirements = dependencies.read_requirements(
            Path(__file__).resolve().parent / "Resources" / "requirements.txt"
        )
        return dependencies.check_requirements([dependencies.TORCH_REQUIREMENT, *requirements])

    def installDependencies(self, confirm: bool = True) -> None:
        """Install what is missing: torch through the PyTorch extension, the rest with pip.

        Never called at import time; must run on the GUI thread (Slicer's installers show dialogs).
        Slicer's own numpy and SimpleITK are never installed or replaced.

        Raises:
            RuntimeError: called off the GUI thread, the PyTorch extension is missing, or the user declined.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Dependencies can only be installed from Slicer's main (GUI) thread.")
        missing = dependencies.unsatisfied(self.checkDependencies())
        torchMissing = dependencies.TORCH_REQUIREMENT in missing
        packages = [requirement for requirement in missing if requirement != dependencies.TORCH_REQUIREMENT]
        if torchMissing:
            self._installTorch(confirm)
        if packages:
            self._pipInstall(packages, confirm)

    def _installTorch(self, confirm: bool) -> None:
        try:
            import PyTorchUtils
        except ImportError as err:
            raise RuntimeError(
                "SCDL Segment needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                "restart Slicer, then install the dependencies again."
            ) from err
        requirement = dependencies.TORCH_REQUIREMENT[len("torch") :]
        self.onLog(f"Installing PyTorch ({dependencies.TORCH_REQUIREMENT}) through the PyTorch extension.")
        if (
            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=confirm, torchVersionRequirement=requirement)
            is None
        ):
            raise RuntimeError(
                f"PyTorch {requirement} was not installed. If an older torch is installed, uninstall it in the "
                "'PyTorch Util' module, restart Slicer and try again."
            )

    def _pipInstall(self, packages: list[str], confirm: bool) -> None:
        self.onLog(f"Installing {', '.join(packages)}.")
        skip = ["torch", *dependencies.SLICER_PROVIDED]
        try:
            import slicer.packaging as slicerPackaging  # Slicer >= 5.12 (binds only the alias, not "slicer")
        except ImportError:  # Slicer 5.10: pip_install takes only pip's arguments, so ask first ourselves
            question = f"SCDL Segment will now install: {', '.join(packages)}. Continue?"
            if confirm and not slicer.util.confirmOkCancelDisplay(question, windowTitle="Install dependencies"):
                raise RuntimeError("Installation cancelled.") from None
            # Constraints pin Slicer's numpy, SimpleITK and torch, which monai's dependencies could replace.
            constraints = Path(slicer.util.tempDirectory("SCDLSegment-install")) / "constraints.txt"
            constraints.write_text("\n".join(dependencies.pinned_installed(skip)) + "\n", encoding="utf-8")
            slicer.util.pip_install(["--constraint", str(constraints), *packages])
        else:
            slicerPackaging.pip_ensure(packages, skip_packages=skip, prompt_install=confirm, requester="SCDL Segment")


def _exportForEngine(node, path: Path) -> None:
    """Write a volume for the engine to read (uncompressed: the engine reads it once, and the dataset store
    rewrites it as compressed NIfTI anyway); exportNode logs a failure rather than raising it."""
    slicer.util.exportNode(node, str(path), {"useCompression": 0})
    if not path.is_file():
        raise RuntimeError(f"{node.GetName()!r} could not be written to {path}; see the log.")


def _importedRef(data: Any) -> str:
    """The model ``scdl models import PATH --json`` installed (it prints ``{"ref", "path"}``)."""
    if not isinstance(data, dict) or not data.get("ref"):
        raise ValueError(f"The engine did not say which model it installed: {str(data)[:200]}")
    return str(data["ref"])


def _sampleImage(data: Any) -> str:
    """The CT path ``scdl sample-data NAME --json`` printed (``[{"name", "image", ...}]``)."""
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or not data[0].get("image"):
        raise ValueError(f"The engine did not say where the sample is: {str(data)[:200]}")
    return str(data[0]["image"])


#
# Self-test (runs inside real Slicer)
#


class SCDLSegmentTest(ScriptedLoadableModuleTest):
    """The whole loop on a real CT, on the CPU, with the bundled starter model: segment, check
    organs, names, colors, terminology and geometry; add the CT unlabeled, then submit it reviewed
    (the same case, updated); fine-tune briefly; check that a new model version exists.

    Needs the dependencies installed (Setup and advanced > Install; skipped with a message without
    them) and the public sample CT, which the engine fetches once into its cache. It writes only to
    temporary folders: a private model registry and dataset, and in-memory settings.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SCDLSegment_loop()

    def test_SCDLSegment_loop(self) -> None:
        settings = _MemorySettings()
        Settings(model_dir=slicer.util.tempDirectory("SCDLSegmentTest-models")).save(settings)
        logic = SCDLSegmentLogic(settingsStore=settings)
        missing = dependencies.unsatisfied(logic.checkDependencies())
        if missing:  # e.g. the extension build machines: no torch, no download
            message = (
                f"SCDLSegmentTest skipped: install the dependencies first (Setup and advanced): {', '.join(missing)}"
            )
            logging.warning(message)
            self.skipTest(message)
        try:
            self._runLoop(logic)
        finally:
            logic.shutdown()

    def _runLoop(self, logic: SCDLSegmentLogic) -> None:
        self.delayDisplay("Loading the sample CT")
        volume = logic.loadSampleVolume("ct_abdomen")
        shape = slicer.util.arrayFromVolume(volume).shape

        self.delayDisplay("Adding a segment of the user's own")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "review")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        userId = segmentationNode.GetSegmentation().AddEmptySegment("user_note", "My note", [1.0, 1.0, 0.0])
        note = np.zeros(shape, dtype=np.uint8)
        note[:2, :3, :4] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(note, segmentationNode, userId, volume)

        self.delayDisplay("Segmenting on the CPU")
        model = catalog.pick_model(logic.listModels(), "starter")
        self.assertIsNotNone(model, "No model in the registry: the bundled starter model is missing.")
        outcome = logic.segment(volume, model.ref, Device.CPU, segmentationNode=segmentationNode)
        self.assertIsNone(outcome.error)
        segments = {segment.name: segment for segment in segmentations.existing_segments(segmentationNode)}
        table = model.labels
        for label in table.labels:
            self.assertIn(label.display_name, segments)
            self.assertEqual(segments[label.display_name].organ, label.name)
        segmentation = segmentationNode.GetSegmentation()
        liverId = segments["Liver"].segment_id
        liver = segmentation.GetSegment(liverId)
        self.assertEqual(liver.GetTerminology(), table.terminology_string(table["liver"]))
        np.testing.assert_allclose(liver.GetColor(), labelmap.unit_color(table["liver"]), atol=1e-3)
        self.assertEqual(
            segmentationNode.GetNodeReferenceID(
                slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
            ),
            volume.GetID(),
        )
        liverMask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, liverId, volume)
        self.assertEqual(liverMask.shape, shape)
        self.assertGreater(int(np.count_nonzero(liverMask)), 0, "The starter model found no liver in the sample CT.")
        userMask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, userId, volume)
        self.assertEqual(int(np.count_nonzero(userMask)), int(note.sum()), "The user's segment was changed.")

        self.delayDisplay("Adding the CT unlabeled, then submitting it reviewed")
        datasetDir = Path(slicer.util.tempDirectory("SCDLSegmentTest-dataset"))
        added = logic.submitCase(volume, None, [], datasetDir, model.ref, Device.CPU)
        self.assertEqual(logic.datasetSummary(datasetDir), catalog.DatasetSummary(labeled=0, partial=0, unlabeled=1))
        reviewed = logic.submitCase(volume, segmentationNode, ["liver", "spleen"], datasetDir, model.ref, Device.CPU)
        self.assertEqual(
            (reviewed["case_id"], reviewed["previous"]), (added["case_id"], "unlabeled"), "One CT is one case."
        )
        self.assertEqual(logic.datasetSummary(datasetDir), catalog.DatasetSummary(labeled=0, partial=1, unlabeled=0))

        self.delayDisplay("Fine-tuning for a few steps")
        tuned = logic.finetune(datasetDir, model.ref, steps=2, device=Device.CPU)
        self.assertIsNone(tuned.error)
        refs = [entry.ref for entry in logic.listModels()]
        self.assertIn(tuned.model, refs)
        self.assertNotEqual(tuned.model, model.ref)
        self.delayDisplay("Test passed")


class _MemorySettings:
    """Settings kept in memory, so the self-test leaves the user's settings alone."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def value(self, key: str, defaultValue: Any = None) -> Any:
        return self.values.get(key, defaultValue)

    def setValue(self, key: str, value: Any) -> None:
        self.values[key] = value
