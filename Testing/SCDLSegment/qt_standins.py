"""Load SCDLSegment.ui in real Qt (PySide6's QUiLoader) without 3D Slicer.

Plain Qt does not know Slicer's widget classes (ctkCollapsibleButton, qMRMLWidget,
qMRMLNodeComboBox, qMRMLSegmentEditorWidget). This module registers STAND-IN classes under
those names: ordinary Qt widgets that accept the same Designer properties (so a misspelt or
wrong-typed property still shows up) and look roughly alike in a screenshot. They are not
Slicer's widgets and have no MRML behaviour.

One preprocessing step: the ``<connections>`` block is removed before loading, because its
signatures use C++ MRML types (``mrmlSceneChanged(vtkMRMLScene*)``) that the stand-ins cannot
declare; :func:`ui_connections` returns it so the tests check it separately.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Property, QBuffer, QByteArray, QIODevice, Signal
from PySide6.QtUiTools import QUiLoader
from PySide6.QtWidgets import QApplication, QComboBox, QFrame, QGroupBox, QLabel, QVBoxLayout, QWidget

__all__ = ["STAND_INS", "load_ui", "qt_app", "ui_connections"]


class qMRMLWidget(QWidget):
    """Stand-in: a plain QWidget with the scene signal and slot."""

    mrmlSceneChanged = Signal(object)

    def setMRMLScene(self, scene) -> None:
        self.mrmlSceneChanged.emit(scene)


class ctkCollapsibleButton(QGroupBox):
    """Stand-in: a group box; ``text`` is its title, ``collapsed`` hides its contents."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._collapsed = False

    def _get_text(self) -> str:
        return self.title()

    def _set_text(self, text: str) -> None:
        self.setTitle(("▸ " if self._collapsed else "▾ ") + text.lstrip("▸▾ "))

    def _get_collapsed(self) -> bool:
        return self._collapsed

    def _set_collapsed(self, collapsed: bool) -> None:
        self._collapsed = bool(collapsed)
        self._set_text(self.title())
        self._apply_collapsed()

    def showEvent(self, event) -> None:  # children exist only after the loader set the properties
        self._apply_collapsed()
        super().showEvent(event)

    def _apply_collapsed(self) -> None:
        for child in self.findChildren(QWidget):
            if child.parent() is self:
                child.setVisible(not self._collapsed)
        self.setMaximumHeight(2 * self.fontMetrics().height() if self._collapsed else 16777215)

    text = Property(str, _get_text, _set_text)
    collapsed = Property(bool, _get_collapsed, _set_collapsed)


class qMRMLNodeComboBox(QComboBox):
    """Stand-in: a combo box with the node-selector properties; shows its ``noneDisplay`` or node type."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._values: dict[str, object] = {"nodeTypes": [], "noneDisplay": "None"}

    def setMRMLScene(self, scene) -> None:
        pass

    def _make(name: str, kind, default):
        def getter(self):
            return self._values.get(name, default)

        def setter(self, value):
            self._values[name] = value

        return Property(kind, getter, setter)

    nodeTypes = _make("nodeTypes", "QStringList", [])
    showChildNodeTypes = _make("showChildNodeTypes", bool, True)
    noneEnabled = _make("noneEnabled", bool, False)
    addEnabled = _make("addEnabled", bool, True)
    removeEnabled = _make("removeEnabled", bool, True)
    renameEnabled = _make("renameEnabled", bool, False)
    noneDisplay = _make("noneDisplay", str, "None")
    del _make


class qMRMLSegmentEditorWidget(qMRMLWidget):
    """Stand-in: a framed placeholder where Slicer draws the Segment Editor (segments and effects)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._state = {"undoEnabled": False, "maximumNumberOfUndoStates": 10, "segmentationNodeSelectorVisible": True}
        frame = QFrame(self)
        frame.setFrameShape(QFrame.StyledPanel)
        label = QLabel("Segment Editor (in Slicer: segment list, Paint, Erase, Scissors, Islands…, Undo/Redo)", frame)
        label.setWordWrap(True)
        QVBoxLayout(frame).addWidget(label)
        QVBoxLayout(self).addWidget(frame)
        self.setMinimumHeight(90)

    def _make(name: str, kind):
        return Property(kind, lambda self: self._state[name], lambda self, value: self._state.__setitem__(name, value))

    undoEnabled = _make("undoEnabled", bool)
    maximumNumberOfUndoStates = _make("maximumNumberOfUndoStates", int)
    segmentationNodeSelectorVisible = _make("segmentationNodeSelectorVisible", bool)
    del _make


#: The stand-in classes, by the Slicer class name they replace.
STAND_INS = {
    cls.__name__: cls for cls in (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLSegmentEditorWidget)
}


def qt_app() -> QApplication:
    return QApplication.instance() or QApplication([])


def ui_connections(path: str | Path) -> list[dict[str, str]]:
    """The ``<connections>`` of a .ui file: sender, signal, receiver, slot."""
    root = ElementTree.parse(path).getroot()
    return [
        {key: connection.findtext(key, "") for key in ("sender", "signal", "receiver", "slot")}
        for connection in root.iter("connection")
    ]


def load_ui(path: str | Path) -> QWidget:
    """Load a Slicer .ui file with the stand-ins; raises RuntimeError with Qt's message if it fails."""
    qt_app()
    root = ElementTree.parse(path).getroot()
    for connections in root.findall("connections"):
        root.remove(connections)
    data = QByteArray(ElementTree.tostring(root, encoding="utf-8"))
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    for cls in STAND_INS.values():
        loader.registerCustomWidget(cls)
    widget = loader.load(buffer)
    if widget is None:
        raise RuntimeError(f"Qt could not load {path}: {loader.errorString()}")
    return widget
