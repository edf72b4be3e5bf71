"""Slicer's Python modules for headless tests: REAL MRML, STAND-IN application and Qt.

3D Slicer itself cannot be installed on the build machines, but its core libraries can (the
``slicer-core`` wheel, 5.12.4). So the ``slicer`` module SCDLSegment.py imports here holds Slicer's
own MRML classes, scene, Segmentations / Volumes / Terminologies logics and ``slicer.util``
functions, and real ``vtk``. Only what needs the application is a STAND-IN (NOT Slicer): ``qt``
and ``ctk``, the widgets, dialogs, the IO manager's load, pip, ``slicer.app``, the segment editor
effect factory, the parameter node wrapper and the scripted-module base classes. What the module
asks of those is recorded on :class:`Recorder` for the tests to check.

The widget tree comes from the real SCDLSegment.ui: :func:`load_ui` builds one fake widget per
``<widget>`` element (class name, object name, Designer properties), so a name the module uses
but the .ui lacks fails here as it would in Slicer.

Usage (see ``test_module_headless.py``)::

    standin = SlicerStandIn(tmp_path)
    standin.install(monkeypatch)          # puts the fake modules into sys.modules
    module = standin.import_module()      # imports SCDLSegment.py against them
"""

from __future__ import annotations

import enum
import functools
import importlib
import itertools
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import numpy as np
import slicer as real_slicer  # Slicer's own libraries (slicer-core), imported before any stand-in is installed
import slicer.util as real_util
import vtk
from scdlsegment_testing import real_scene

__all__ = ["Recorder", "SlicerStandIn", "load_ui"]

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
        self.io_loads: list[str] = []  # files loaded through the IO manager (they land in File > Recent)
        self.app_connections: list[tuple[str, Any]] = []  # slicer.app.connect(signal, slot)


# ----------------------------------------------------------------------------- slicer.util


def make_util(standin: SlicerStandIn) -> types.ModuleType:
    """Slicer's own slicer.util (slicer-core) for everything MRML; stand-ins for what needs the application
    (IO manager, dialogs, pip, temporary folders, .ui files)."""
    util = types.ModuleType("slicer.util")
    util.__dict__.update({name: value for name, value in vars(real_util).items() if not name.startswith("__")})
    recorder = standin.recorder

    def tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
        folder = standin.temp_root / f"{key}-{next(standin.temp_numbers)}"
        folder.mkdir(parents=True)
        return str(folder)

    def exportNode(node, filename, properties={}, world=False):  # noqa: B006  (Slicer's signature)
        storage = real_slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(filename))
        storage.SetUseCompression(int(properties.get("useCompression", 1)))
        return bool(storage.WriteData(node))

    def loadVolume(filename, properties={}):  # noqa: B006  (Slicer's signature)
        """The IO manager's load: the file is recorded (Slicer adds it to File > Recent)."""
        recorder.io_loads.append(str(filename))
        return standin.read_volume(filename)

    def loadUI(path):
        return load_ui(path)

    def childWidgetVariables(widget):
        return types.SimpleNamespace(**{child.name: child for child in widget.walk() if child.name})

    def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
        recorder.errors.append(text)

    def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
        recorder.confirmations.append(text)
        return recorder.confirm_answer

    def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
        recorder.confirmations.append(text)
        return recorder.confirm_answer

    def pip_install(requirements):
        recorder.pip_install.append(requirements)

    util.tempDirectory = tempDirectory
    util.startupEnvironment = lambda: dict(standin.environment)
    util.exportNode = exportNode
    util.loadVolume = loadVolume
    util.loadLabelVolume = None  # the module must not load its temporary label maps through the IO manager
    util.loadUI = loadUI
    util.childWidgetVariables = childWidgetVariables
    util.errorDisplay = errorDisplay
    util.confirmOkCancelDisplay = confirmOkCancelDisplay
    util.confirmYesNoDisplay = confirmYesNoDisplay
    util.pip_install = pip_install
    util.delayDisplay = lambda message, autoCloseMsec=1000, parent=None, **kwargs: None
    return util


# ----------------------------------------------------------------------------- parameterNodeWrapper


class WithinRange:
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum


def parameterNodeWrapper(cls, store: dict[str, dict[str, Any]]):
    """Each annotated attribute becomes a property of the wrapped scripted-module node (its values kept in
    ``store`` by node id, objects as they are; Slicer serialises them into the node's parameters)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    class Wrapped:
        allParameters = {name: _unannotated(hint) for name, hint in hints.items()}

        def __init__(self, parameterNode) -> None:
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "values", store.setdefault(parameterNode.GetID(), dict(defaults)))

        def __getattr__(self, name):
            if name in defaults:
                return self.values[name]
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name not in defaults:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            self.values[name] = value
            self.parameterNode.Modified()

        def __bool__(self):
            return True

        def __eq__(self, other):
            return isinstance(other, Wrapped) and other.parameterNode is self.parameterNode

        def __hash__(self):
            return hash(self.parameterNode.GetID())

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
            return bound, self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, update)

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
    """The widget/type pairs Slicer's built-in GUI connectors accept (SCDLSegment/docs/SLICER_API.md section 4)."""
    if widget.cls == "qMRMLNodeComboBox":
        ok = (
            isinstance(datatype, type)
            and issubclass(datatype, real_slicer.vtkMRMLNode)
            and datatype.__name__ in widget.properties.get("nodeTypes", [])
        )
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
        if (
            name
            in (
                "setMRMLSegmentEditorNode",
                "setSegmentationNode",
                "setSourceVolumeNode",
                "saveStateForUndo",
                "setActiveEffect",
                "installKeyboardShortcuts",
                "uninstallKeyboardShortcuts",
                "removeViewObservations",
                "updateEffectList",
            )
            and self.cls == "qMRMLSegmentEditorWidget"
        ):
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

    qt.QTimer, qt.QListWidgetItem, qt.QTableWidgetItem, qt.QFileDialog = (
        QTimer,
        QListWidgetItem,
        QTableWidgetItem,
        QFileDialog,
    )
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


class ScriptedLoadableModuleTest(unittest.TestCase):
    """Slicer's is a unittest.TestCase too (with delayDisplay, used by the self-test)."""

    def delayDisplay(self, message, msec=1000):
        pass


class EffectFactory:
    """STAND-IN for qSlicerSegmentEditorEffectFactory.instance(): its effectRegistered(QString) signal."""

    def __init__(self) -> None:
        self.slots: list[Any] = []

    def connect(self, signal: str, slot) -> None:
        assert signal == "effectRegistered(QString)", signal
        self.slots.append(slot)

    def disconnect(self, signal: str, slot) -> None:
        self.slots.remove(slot)

    def register(self, name: str) -> None:
        for slot in list(self.slots):
            slot(name)


class DictSettings:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def value(self, key, defaultValue=None):
        return self.values.get(key, defaultValue)

    def setValue(self, key, value):
        self.values[key] = value


class SlicerStandIn:
    """Builds the modules around one real scene, one recorder and one temporary folder."""

    def __init__(self, temp_root: Path, environment: dict[str, str] | None = None) -> None:
        self.temp_root = Path(temp_root)
        self.temp_numbers = itertools.count(1)
        self.environment = dict(environment or {})
        self.scene = real_scene()
        self.logics = {
            "segmentations": real_slicer.vtkSlicerSegmentationsModuleLogic(),
            "volumes": real_slicer.vtkSlicerVolumesLogic(),
            "terminologies": real_slicer.vtkSlicerTerminologiesModuleLogic(),
        }
        for name in ("segmentations", "volumes"):  # the terminology logic needs no scene (and would look for
            self.logics[name].SetMRMLScene(self.scene)  # Slicer's default terminology files when given one)
        self.recorder = Recorder()
        self.settings = DictSettings()
        self.parameters: dict[str, dict[str, Any]] = {}  # the parameter node wrapper's values, by node id
        self.effect_factory = EffectFactory()
        self.modules: dict[str, types.ModuleType] = {}
        self._build()

    def _build(self) -> None:
        slicer = types.ModuleType("slicer")
        slicer.__dict__.update({name: value for name, value in vars(real_slicer).items() if not name.startswith("__")})
        slicer.__path__ = []  # a package, so "import slicer.packaging" resolves through sys.modules
        util = make_util(self)
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        wrapper.parameterNodeWrapper = functools.partial(parameterNodeWrapper, store=self.parameters)
        wrapper.WithinRange = WithinRange
        scripted = types.ModuleType("slicer.ScriptedLoadableModule")
        scene = self.scene

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None) -> None:
                self.moduleName = type(self).__name__[: -len("Logic")]

            def getParameterNode(self):
                node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
                if node is None:
                    node = real_slicer.vtkMRMLScriptedModuleNode()
                    node.SetName(self.moduleName)
                    node.SetSingletonTag(self.moduleName)
                    node = scene.AddNode(node)
                return node

        scripted.ScriptedLoadableModule = ScriptedLoadableModule
        scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
        scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
        scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
        slicer.util, slicer.i18n, slicer.parameterNodeWrapper, slicer.ScriptedLoadableModule = (
            util,
            i18n,
            wrapper,
            scripted,
        )
        slicer.mrmlScene = scene
        slicer.modules = types.SimpleNamespace(
            **{
                name: types.SimpleNamespace(logic=functools.partial(lambda logic: logic, logic))
                for name, logic in self.logics.items()
            }
        )
        slicer.app = types.SimpleNamespace(
            connect=lambda signal, slot: self.recorder.app_connections.append((signal, slot))
        )
        slicer.qSlicerSegmentEditorEffectFactory = types.SimpleNamespace(instance=lambda: self.effect_factory)
        self.modules = {
            "slicer": slicer,
            "slicer.util": util,
            "slicer.i18n": i18n,
            "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": scripted,
            "qt": make_qt(self),
            "ctk": types.ModuleType("ctk"),
        }

    # ------------------------------------------------------------- helpers for the tests (real MRML)

    def read_volume(self, filename, class_name="vtkMRMLScalarVolumeNode"):
        """A volume file read by Slicer's storage node into a new node named after the file."""
        node = self.scene.AddNewNodeByClass(class_name, Path(filename).name.split(".")[0])
        storage = real_slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(filename))
        if not storage.ReadData(node):
            self.scene.RemoveNode(node)
            raise RuntimeError(f"Failed to load volume from {filename}")
        return node

    @staticmethod
    def array(volume) -> np.ndarray:
        return real_util.arrayFromVolume(volume)

    def segment_mask(self, segmentation, segment_id: str, volume) -> np.ndarray:
        """A segment on the volume's grid, through Slicer's own export."""
        from SCDLSegmentLib.segmentations import _segment_mask

        return _segment_mask(segmentation, segment_id, volume)

    def loaded_terminologies(self) -> list[str]:
        names = vtk.vtkStringArray()
        self.logics["terminologies"].GetLoadedTerminologyNames(names)
        return [names.GetValue(index) for index in range(names.GetNumberOfValues())]

    def add_packaging(self) -> types.ModuleType:
        """Make ``slicer.packaging`` importable, as in Slicer >= 5.12."""
        packaging = types.ModuleType("slicer.packaging")
        packaging.pip_ensure = lambda requirements, **kwargs: self.recorder.pip_ensure.append(
            {"requirements": list(requirements), **kwargs}
        )
        self.modules["slicer"].packaging = packaging
        self.modules["slicer.packaging"] = packaging
        return packaging

    def add_pytorch_extension(self, installs: bool = True) -> None:
        """Make the PyTorch extension's ``PyTorchUtils`` importable."""
        recorder = self.recorder

        class PyTorchUtilsLogic:
            def installTorch(
                self,
                askConfirmation=False,
                forceComputationBackend=None,
                torchVersionRequirement=None,
                torchvisionVersionRequirement=None,
            ):
                recorder.torch_installs.append(
                    {"askConfirmation": askConfirmation, "requirement": torchVersionRequirement}
                )
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
