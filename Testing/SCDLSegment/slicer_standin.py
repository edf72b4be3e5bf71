"""STAND-IN for 3D Slicer's Python modules (``slicer``, ``qt``, ``ctk``, ``vtk``), for headless tests.

3D Slicer cannot be installed on the build machines, so the module file SCDLSegment.py is
exercised against this small fake. It is NOT Slicer: it implements only the names the module
calls, with the documented behaviour (SLICER_API.md) that matters to it, built on numpy and real
NRRD files (pynrrd) in Slicer's conventions: arrays in (K, J, I) order, node geometry as
IJK-to-RAS, files in LPS. Slicer-only behaviour the module relies on is kept observable: undo
hooks, dialogs, pip calls and GUI state are recorded on :class:`Recorder` for the tests to check.

The widget tree comes from the real SCDLSegment.ui: :func:`load_ui` builds one fake widget per
``<widget>`` element (class name, object name, Designer properties), so a name the module uses
but the .ui lacks fails here as it would in Slicer.

Usage (see ``test_module_headless.py``)::

    standin = SlicerStandIn(tmp_path)
    standin.install(monkeypatch)          # puts the fake modules into sys.modules
    module = standin.import_module()      # imports SCDLSegment.py against them
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import itertools
import sys
import types
import typing
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import nrrd
import numpy as np

__all__ = ["Recorder", "SlicerStandIn", "load_ui"]

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
MODULE_DIR = Path(__file__).resolve().parents[2] / "SCDLSegment"


class Recorder:
    """What the module asked of Slicer's GUI and installers, for the tests to check."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.confirmations: list[str] = []
        self.confirm_answer = True
        self.pip_install: list[Any] = []
        self.pip_ensure: list[dict] = []
        self.open_file = ""
        self.existing_directory = ""
        self.torch_installs: list[dict] = []


# ----------------------------------------------------------------------------- events and vtk


class Observable:
    """VTK-style AddObserver / RemoveObserver / InvokeEvent."""

    def __init__(self) -> None:
        self._observers: dict[int, tuple[int, Any]] = {}
        self._tags = itertools.count(1)

    def AddObserver(self, event, callback, priority=0.0):
        tag = next(self._tags)
        self._observers[tag] = (event, callback)
        return tag

    def RemoveObserver(self, tag) -> None:
        self._observers.pop(tag, None)

    def InvokeEvent(self, event) -> None:
        for observed, callback in list(self._observers.values()):
            if observed == event:
                callback(self, event)


class vtkMatrix4x4:  # noqa: N801
    def __init__(self) -> None:
        self.array = np.eye(4)

    def SetElement(self, row: int, column: int, value: float) -> None:
        self.array[row, column] = value

    def GetElement(self, row: int, column: int) -> float:
        return float(self.array[row, column])


class reference:  # noqa: N801
    """vtk.reference: an output argument."""

    def __init__(self, value) -> None:
        self.value = value

    def get(self):
        return self.value

    def set(self, value) -> None:
        self.value = value


def make_vtk() -> types.ModuleType:
    vtk = types.ModuleType("vtk")
    vtk.vtkMatrix4x4 = vtkMatrix4x4
    vtk.reference = reference
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent=33)
    return vtk


# ----------------------------------------------------------------------------- MRML nodes


class Node(Observable):
    className = "vtkMRMLNode"

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name, self.id, self.scene = name, None, None
        self.references: dict[str, str] = {}
        self.singleton_tag = None
        self.transform_id = None

    def GetName(self):
        return self.name

    def SetName(self, name):
        self.name = name

    def GetID(self):
        return self.id

    def SetNodeReferenceID(self, role, node_id):
        self.references[role] = node_id

    def GetNodeReferenceID(self, role):
        return self.references.get(role)

    def SetSingletonTag(self, tag):
        self.singleton_tag = tag

    def SetAndObserveTransformNodeID(self, node_id):
        self.transform_id = node_id

    def GetTransformNodeID(self):
        return self.transform_id

    def CreateDefaultDisplayNodes(self):
        pass

    def StartModify(self):
        return 0

    def EndModify(self, previous):
        self.InvokeEvent(33)

    def Modified(self):
        self.InvokeEvent(33)


class VolumeNode(Node):
    className = "vtkMRMLScalarVolumeNode"

    def __init__(self, name="", array=None, ijk_to_ras=None) -> None:
        super().__init__(name)
        self.array = array
        self.ijk_to_ras = np.eye(4) if ijk_to_ras is None else np.asarray(ijk_to_ras, dtype=float)

    def GetImageData(self):
        return None if self.array is None else self.array

    def GetIJKToRASMatrix(self, matrix):
        matrix.array[:] = self.ijk_to_ras

    def GetSpacing(self):
        return tuple(np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))


class LabelMapVolumeNode(VolumeNode):
    className = "vtkMRMLLabelMapVolumeNode"


class Segment:
    def __init__(self, name, color) -> None:
        self.name, self.color = name, tuple(color)
        self.tags: dict[str, str] = {}
        self.mask: np.ndarray | None = None

    def GetName(self):
        return self.name

    def SetName(self, name):
        self.name = name

    def SetColor(self, r, g, b):
        self.color = (r, g, b)

    def GetColor(self):
        return self.color

    def SetTerminology(self, text):
        self.tags["TerminologyEntry"] = text

    def GetTerminology(self):
        return self.tags.get("TerminologyEntry", "")

    def SetTag(self, tag, value):
        self.tags[tag] = str(value)

    def GetTag(self, tag, out):
        if tag not in self.tags:
            return False
        out.set(self.tags[tag])
        return True


class Segmentation:
    def __init__(self) -> None:
        self.segments: dict[str, Segment] = {}

    def GetNumberOfSegments(self):
        return len(self.segments)

    def GetNthSegmentID(self, index):
        return list(self.segments)[index]

    def GetSegment(self, segment_id):
        return self.segments.get(segment_id)

    def GenerateUniqueSegmentID(self, base=""):
        candidate, number = base or "Segment", 1
        while candidate in self.segments:
            candidate, number = f"{base}_{number}", number + 1
        return candidate

    def AddEmptySegment(self, segment_id="", name="", color=None):
        segment_id = segment_id or self.GenerateUniqueSegmentID("Segment")
        self.segments[segment_id] = Segment(name or segment_id, color or (0.5, 0.5, 0.5))
        return segment_id


class SegmentationNode(Node):
    className = "vtkMRMLSegmentationNode"

    def __init__(self, name="") -> None:
        super().__init__(name)
        self.segmentation = Segmentation()
        self.reference_geometry_volume = None

    @staticmethod
    def GetReferenceImageGeometryReferenceRole():
        return "referenceImageGeometryRef"

    def GetSegmentation(self):
        return self.segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume):
        self.reference_geometry_volume = volume


class ScriptedModuleNode(Node):
    className = "vtkMRMLScriptedModuleNode"

    def __init__(self, name="") -> None:
        super().__init__(name)
        self.parameters: dict[str, Any] = {}

    def GetParameter(self, name):
        return str(self.parameters.get(name, ""))

    def SetParameter(self, name, value):
        self.parameters[name] = value


class SegmentEditorNode(Node):
    className = "vtkMRMLSegmentEditorNode"


NODE_CLASSES = {cls.className: cls for cls in (VolumeNode, LabelMapVolumeNode, SegmentationNode, ScriptedModuleNode,
                                               SegmentEditorNode)}


class Scene(Observable):
    StartCloseEvent, EndCloseEvent = 66001, 66003

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[Node] = []
        self._ids = itertools.count(1)

    def AddNode(self, node):
        node.id, node.scene = f"{node.className}{next(self._ids)}", self
        self.nodes.append(node)
        return node

    def AddNewNodeByClass(self, class_name, name=""):
        return self.AddNode(NODE_CLASSES[class_name](name))

    def RemoveNode(self, node):
        self.nodes.remove(node)

    def IsNodePresent(self, node) -> int:
        """Slicer returns an int: the node's 1-based position in the scene, 0 when absent."""
        return next((index for index, present in enumerate(self.nodes, start=1) if present is node), 0)

    def GetFirstNodeByClass(self, class_name):
        return next((node for node in self.nodes if node.className == class_name), None)

    def GetSingletonNode(self, tag, class_name):
        return next((n for n in self.nodes if n.singleton_tag == tag and n.className == class_name), None)

    def Clear(self, remove_singletons=0):
        self.InvokeEvent(self.StartCloseEvent)
        self.nodes = [node for node in self.nodes if node.singleton_tag and not remove_singletons]
        self.InvokeEvent(self.EndCloseEvent)


# ----------------------------------------------------------------------------- slicer.util


def _write_nrrd(node: VolumeNode, filename: str) -> None:
    directions = LPS_FROM_RAS @ node.ijk_to_ras[:3, :3]
    header = {"space": "left-posterior-superior", "space directions": directions.T,
              "space origin": LPS_FROM_RAS @ node.ijk_to_ras[:3, 3]}
    nrrd.write(filename, np.ascontiguousarray(node.array), header, index_order="C")


def _read_nrrd(filename: str, cls: type[VolumeNode], scene: Scene, name: str | None = None) -> VolumeNode:
    """NRRD through pynrrd; any other format (NIfTI: the dataset store's files) through SimpleITK, as Slicer's ITK reader."""
    if not str(filename).endswith(".nrrd"):
        return _read_itk(filename, cls, scene)
    array, header = nrrd.read(filename, index_order="C")
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = LPS_FROM_RAS @ np.asarray(header["space directions"], dtype=float).T
    ijk_to_ras[:3, 3] = LPS_FROM_RAS @ np.asarray(header["space origin"], dtype=float)
    return scene.AddNode(cls(name or Path(filename).name.split(".")[0], array, ijk_to_ras))


def _read_itk(filename: str, cls: type[VolumeNode], scene: Scene) -> VolumeNode:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(filename))
    ijk_to_ras = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_ras[:3, :3] = LPS_FROM_RAS @ direction @ np.diag(image.GetSpacing())
    ijk_to_ras[:3, 3] = LPS_FROM_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    return scene.AddNode(cls(Path(filename).name.split(".")[0], sitk.GetArrayFromImage(image), ijk_to_ras))


def make_util(standin: SlicerStandIn) -> types.ModuleType:
    util = types.ModuleType("slicer.util")
    scene, recorder = standin.scene, standin.recorder

    class VTKObservationMixin:
        def __init__(self) -> None:
            self._observations: list[tuple[Any, Any, Any, int]] = []

        def addObserver(self, obj, event, method, group="none", priority=0.0):
            self._observations.append((obj, event, method, obj.AddObserver(event, method)))

        def removeObserver(self, obj, event, method):
            for entry in list(self._observations):
                if entry[:3] == (obj, event, method):
                    obj.RemoveObserver(entry[3])
                    self._observations.remove(entry)

        def removeObservers(self, method=None):
            for obj, event, observed, _tag in list(self._observations):
                if method is None or observed == method:
                    self.removeObserver(obj, event, observed)

    @contextlib.contextmanager
    def NodeModify(node):
        previous = node.StartModify()
        try:
            yield
        finally:
            node.EndModify(previous)

    def tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
        folder = standin.temp_root / f"{key}-{next(standin.temp_numbers)}"
        folder.mkdir(parents=True)
        return str(folder)

    def exportNode(node, filename, properties={}, world=False):  # noqa: B006  (Slicer's signature)
        _write_nrrd(node, filename)
        return True

    def arrayFromVolume(node):
        return node.array

    def arrayFromVTKMatrix(matrix):
        return matrix.array.copy()

    def addVolumeFromArray(narray, ijkToRAS=None, name=None, nodeClassName=None):
        node = NODE_CLASSES[nodeClassName or "vtkMRMLScalarVolumeNode"](name or "Volume")
        node.array, node.ijk_to_ras = np.array(narray), ijkToRAS.array.copy()
        return scene.AddNode(node)

    def updateSegmentBinaryLabelmapFromArray(narray, segmentationNode, segmentId, referenceVolumeNode=None):
        if referenceVolumeNode is None or narray.shape != referenceVolumeNode.array.shape:
            raise RuntimeError("stand-in: the array must be on the reference volume's grid")
        segmentationNode.GetSegmentation().GetSegment(segmentId).mask = (np.asarray(narray) > 0).astype(np.uint8)

    def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
        mask = segmentationNode.GetSegmentation().GetSegment(segmentId).mask
        return np.zeros(referenceVolumeNode.array.shape, np.uint8) if mask is None else mask.copy()

    def loadUI(path):
        return load_ui(path)

    def childWidgetVariables(widget):
        return types.SimpleNamespace(**{child.name: child for child in widget.walk() if child.name})

    def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
        recorder.errors.append(text)

    def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
        recorder.confirmations.append(text)
        return recorder.confirm_answer

    def pip_install(requirements):
        recorder.pip_install.append(requirements)

    util.VTKObservationMixin = VTKObservationMixin
    util.NodeModify = NodeModify
    util.tempDirectory = tempDirectory
    util.startupEnvironment = lambda: dict(standin.environment)
    util.exportNode = exportNode
    util.loadLabelVolume = lambda filename, properties={}: _read_nrrd(filename, LabelMapVolumeNode, scene)  # noqa: B006
    util.loadVolume = lambda filename, properties={}: _read_nrrd(filename, VolumeNode, scene)  # noqa: B006
    util.getNodesByClass = lambda className, scene=None: [node for node in standin.scene.nodes if node.className == className]
    util.arrayFromVolume = arrayFromVolume
    util.arrayFromVTKMatrix = arrayFromVTKMatrix
    util.addVolumeFromArray = addVolumeFromArray
    util.updateSegmentBinaryLabelmapFromArray = updateSegmentBinaryLabelmapFromArray
    util.arrayFromSegmentBinaryLabelmap = arrayFromSegmentBinaryLabelmap
    util.loadUI = loadUI
    util.childWidgetVariables = childWidgetVariables
    util.errorDisplay = errorDisplay
    util.confirmOkCancelDisplay = confirmOkCancelDisplay
    util.pip_install = pip_install
    util.delayDisplay = lambda message, autoCloseMsec=1000, parent=None, **kwargs: None
    return util


# ----------------------------------------------------------------------------- parameterNodeWrapper


class WithinRange:
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum


def parameterNodeWrapper(cls):
    """Each annotated attribute becomes a property stored on the wrapped scripted-module node."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    class Wrapped:
        allParameters = {name: _unannotated(hint) for name, hint in hints.items()}

        def __init__(self, parameterNode) -> None:
            object.__setattr__(self, "parameterNode", parameterNode)
            for name, default in defaults.items():
                parameterNode.parameters.setdefault(f"wrapped:{name}", default)

        def __getattr__(self, name):
            if name in defaults:
                return self.parameterNode.parameters[f"wrapped:{name}"]
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name not in defaults:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            self.parameterNode.parameters[f"wrapped:{name}"] = value
            self.parameterNode.Modified()

        def __bool__(self):
            return True

        def __eq__(self, other):
            return isinstance(other, Wrapped) and other.parameterNode is self.parameterNode

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

        def connectGui(self, gui):
            """Bind widgets carrying SlicerParameterName (raising like Slicer's createGuiConnector would);
            each widget's ``bound_value`` follows its parameter."""
            bound = {}
            for widget in vars(gui).values():
                parameter = widget.properties.get("SlicerParameterName")
                if parameter is None:
                    continue
                if parameter not in defaults:
                    raise RuntimeError(f"{widget.name}: no parameter {parameter!r} in {cls.__name__}")
                _check_connector(widget, Wrapped.allParameters[parameter])
                bound[parameter] = widget

            def update(caller=None, event=None):
                for parameter, widget in bound.items():
                    widget.bound_value = getattr(self, parameter)

            update()
            return bound, self.parameterNode.AddObserver(33, update)

        def disconnectGui(self, tag):
            widgets, observer = tag
            self.parameterNode.RemoveObserver(observer)
            for widget in widgets.values():
                widget.bound_value = None

    Wrapped.__name__ = Wrapped.__qualname__ = cls.__name__
    return Wrapped


def _unannotated(hint):
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def _check_connector(widget: FakeWidget, datatype) -> None:
    """The widget/type pairs Slicer's built-in GUI connectors accept (SLICER_API.md section 4)."""
    if widget.cls == "qMRMLNodeComboBox":
        ok = isinstance(datatype, type) and issubclass(datatype, Node) and datatype.className in widget.properties.get("nodeTypes", [])
    elif widget.cls == "QComboBox":
        ok = isinstance(datatype, type) and issubclass(datatype, enum.Enum)
    else:
        ok = {"QSpinBox": int, "QLineEdit": str, "QCheckBox": bool}.get(widget.cls) is datatype
    if not ok:
        raise RuntimeError(f"Unable to create GUI connector from datatype '{datatype}' to widget type '{widget.cls}'")


# ----------------------------------------------------------------------------- widgets from the .ui


class Signal:
    def __init__(self) -> None:
        self.slots: list[Any] = []

    def connect(self, slot) -> None:
        self.slots.append(slot)

    def emit(self, *args) -> None:
        for slot in list(self.slots):
            slot()


class FakeWidget:
    """One widget of the .ui: its Designer properties plus the state the module sets."""

    def __init__(self, cls: str, name: str, properties: dict[str, Any]) -> None:
        self.cls, self.name, self.properties = cls, name, properties
        self.children: list[FakeWidget] = []
        self.text = properties.get("text", "")
        self.enabled = properties.get("enabled", True)
        self.toolTip, self.format, self.value = properties.get("toolTip", ""), properties.get("format", ""), 0
        self.items: list[Any] = []
        self.currentIndex = -1
        self.plainText: list[str] = []
        self.rowCount, self.cells = 0, {}
        self.bound_value = None
        self.calls: list[tuple] = []  # segment editor calls, in order
        self.clicked, self.currentIndexChanged = Signal(), Signal()

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    # QWidget / QAbstractButton / QLabel / QProgressBar
    def setText(self, text):
        self.text = text

    def setEnabled(self, enabled):
        self.enabled = bool(enabled)

    def setToolTip(self, text):
        self.toolTip = text

    def setValue(self, value):
        self.value = value

    def setFormat(self, text):
        self.format = text

    def blockSignals(self, block):
        return False

    # QComboBox / QListWidget
    def clear(self):
        self.items, self.currentIndex = [], -1

    def addItem(self, item, data=None):
        self.items.append(item if data is None else (item, data))

    def setCurrentIndex(self, index):
        self.currentIndex = index

    @property
    def currentText(self):
        return self.items[self.currentIndex][0] if 0 <= self.currentIndex < len(self.items) else ""

    @property
    def count(self):
        return len(self.items)

    def item(self, row):
        return self.items[row]

    # QPlainTextEdit / QTableWidget
    def appendPlainText(self, text):
        self.plainText.append(text)

    def setRowCount(self, rows):
        self.rowCount = rows

    def setItem(self, row, column, item):
        self.cells[row, column] = item.text

    # qMRMLWidget and qMRMLSegmentEditorWidget
    def setMRMLScene(self, scene):
        for child in self.walk():
            if child is not self and child.cls.startswith("qMRML"):
                child.calls.append(("setMRMLScene",))

    def __getattr__(self, name):
        if name in ("setMRMLSegmentEditorNode", "setSegmentationNode", "setSourceVolumeNode", "saveStateForUndo",
                    "setActiveEffect") and self.cls == "qMRMLSegmentEditorWidget":
            return lambda *args: self.calls.append((name, *args))
        raise AttributeError(f"stand-in {self.cls} {self.name!r} has no {name!r}")


def load_ui(path) -> FakeWidget:
    root = ElementTree.parse(path).getroot().find("widget")
    return _widget(root)


def _widget(element) -> FakeWidget:
    properties = {prop.get("name"): _property_value(prop) for prop in element.findall("property")}
    widget = FakeWidget(element.get("class"), element.get("name"), properties)
    for child in element.iter("widget"):
        if child is not element and _parent_widget(element, child):
            widget.children.append(_widget(child))
    return widget


def _parent_widget(parent, child) -> bool:
    """True if ``child`` is a direct widget descendant of ``parent`` (through layouts only)."""
    stack = list(parent)
    while stack:
        node = stack.pop()
        if node is child:
            return True
        if node.tag != "widget":
            stack.extend(list(node))
    return False


def _property_value(prop):
    value = prop[0]
    if value.tag == "bool":
        return value.text == "true"
    if value.tag == "number":
        return int(value.text)
    if value.tag == "stringlist":
        return [item.text for item in value.findall("string")]
    return value.text or ""


# ----------------------------------------------------------------------------- qt


def make_qt(standin: SlicerStandIn) -> types.ModuleType:
    qt = types.ModuleType("qt")
    recorder = standin.recorder

    class QTimer:
        def __init__(self) -> None:
            self.timeout, self.active, self.interval = Signal(), False, 0

        def setInterval(self, msec):
            self.interval = msec

        def start(self):
            self.active = True

        def stop(self):
            self.active = False

        def isActive(self):
            return self.active

    class QListWidgetItem:
        def __init__(self, text) -> None:
            self.text, self._flags, self._check, self._data = text, 1, 0, {}

        def flags(self):
            return self._flags

        def setFlags(self, flags):
            self._flags = flags

        def setCheckState(self, state):
            self._check = state

        def checkState(self):
            return self._check

        def setData(self, role, value):
            self._data[role] = value

        def data(self, role):
            return self._data.get(role)

    class QTableWidgetItem:
        def __init__(self, text) -> None:
            self.text = text

    class QFileDialog:
        @staticmethod
        def getOpenFileName(parent, caption, directory, filter=""):
            return recorder.open_file

        @staticmethod
        def getExistingDirectory(parent, caption, directory):
            return recorder.existing_directory

    qt.QTimer, qt.QListWidgetItem, qt.QTableWidgetItem, qt.QFileDialog = QTimer, QListWidgetItem, QTableWidgetItem, QFileDialog
    qt.Qt = types.SimpleNamespace(ItemIsUserCheckable=16, Unchecked=0, Checked=2, UserRole=256)
    qt.QSettings = lambda: standin.settings
    return qt


# ----------------------------------------------------------------------------- slicer package


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent, self.moduleName = parent, type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent or types.SimpleNamespace(isEntered=True)
        self.moduleName = type(self).__name__[: -len("Widget")]
        self.layout = types.SimpleNamespace(widgets=[], addWidget=lambda widget: self.layout.widgets.append(widget))

    def resourcePath(self, filename):
        return str(MODULE_DIR / "Resources" / filename)

    def setup(self):
        pass


class ScriptedLoadableModuleTest:
    pass


class DictSettings:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def value(self, key, defaultValue=None):
        return self.values.get(key, defaultValue)

    def setValue(self, key, value):
        self.values[key] = value


class SlicerStandIn:
    """Builds the fake modules around one scene, one recorder and one temporary folder."""

    def __init__(self, temp_root: Path, environment: dict[str, str] | None = None) -> None:
        self.temp_root = Path(temp_root)
        self.temp_numbers = itertools.count(1)
        self.environment = dict(environment or {})
        self.scene = Scene()
        self.recorder = Recorder()
        self.settings = DictSettings()
        self.terminology_files: list[str] = []
        self.modules: dict[str, types.ModuleType] = {}
        self._build()

    def _build(self) -> None:
        slicer = types.ModuleType("slicer")
        slicer.__path__ = []  # a package, so "import slicer.packaging" resolves through sys.modules
        util = make_util(self)
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        wrapper.parameterNodeWrapper, wrapper.WithinRange = parameterNodeWrapper, WithinRange
        scripted = types.ModuleType("slicer.ScriptedLoadableModule")
        scene = self.scene

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None) -> None:
                self.moduleName = type(self).__name__[: -len("Logic")]

            def getParameterNode(self):
                node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
                if node is None:
                    node = ScriptedModuleNode(self.moduleName)
                    node.SetSingletonTag(self.moduleName)
                    scene.AddNode(node)
                return node

        scripted.ScriptedLoadableModule = ScriptedLoadableModule
        scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
        scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
        scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
        terminologies = types.SimpleNamespace(LoadTerminologyFromFile=self._load_terminology)
        slicer.util, slicer.i18n, slicer.parameterNodeWrapper, slicer.ScriptedLoadableModule = util, i18n, wrapper, scripted
        slicer.mrmlScene = scene
        slicer.modules = types.SimpleNamespace(terminologies=types.SimpleNamespace(logic=lambda: terminologies))
        slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLSegmentationNode = VolumeNode, SegmentationNode
        slicer.vtkMRMLSegmentEditorNode = SegmentEditorNode
        ctk = types.ModuleType("ctk")
        self.modules = {
            "slicer": slicer, "slicer.util": util, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": scripted, "qt": make_qt(self), "ctk": ctk, "vtk": make_vtk(),
        }

    def _load_terminology(self, path: str) -> str:
        import json

        self.terminology_files.append(path)
        return json.loads(Path(path).read_text(encoding="utf-8"))["SegmentationCategoryTypeContextName"]

    def add_packaging(self) -> types.ModuleType:
        """Make ``slicer.packaging`` importable, as in Slicer >= 5.12."""
        packaging = types.ModuleType("slicer.packaging")
        packaging.pip_ensure = lambda requirements, **kwargs: self.recorder.pip_ensure.append(
            {"requirements": list(requirements), **kwargs})
        self.modules["slicer"].packaging = packaging
        self.modules["slicer.packaging"] = packaging
        return packaging

    def add_pytorch_extension(self, installs: bool = True) -> None:
        """Make the PyTorch extension's ``PyTorchUtils`` importable."""
        recorder = self.recorder

        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                             torchvisionVersionRequirement=None):
                recorder.torch_installs.append({"askConfirmation": askConfirmation, "requirement": torchVersionRequirement})
                return object() if installs else None

        self.modules["PyTorchUtils"] = types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic)

    def install(self, monkeypatch) -> None:
        """Put the fake modules into sys.modules (undone by pytest's monkeypatch)."""
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        for name in ("SCDLSegment",):
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.syspath_prepend(str(MODULE_DIR))

    def import_module(self) -> types.ModuleType:
        return importlib.import_module("SCDLSegment")
