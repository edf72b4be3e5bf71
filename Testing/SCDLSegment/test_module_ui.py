"""SCDLSegment.ui loads in real Qt (PySide6, offscreen) and matches what SCDLSegment.py uses.

Slicer's own widget classes are replaced by the registered stand-ins of ``qt_standins`` and the
``<connections>`` block is removed before loading (its MRML signatures cannot be declared in
plain Qt); the connections are checked separately here.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ElementTree

import pytest
from PySide6.QtWidgets import QComboBox, QLineEdit, QSpinBox, QWidget
from qt_standins import STAND_INS, load_ui, ui_connections
from scdlsegment_testing import MODULE_DIR

UI_PATH = MODULE_DIR / "Resources" / "UI" / "SCDLSegment.ui"
MODULE_SOURCE = (MODULE_DIR / "SCDLSegment.py").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def panel():
    return load_ui(UI_PATH)


def widgets_the_module_uses() -> set[str]:
    """Every ``self.ui.NAME`` in SCDLSegment.py."""
    tree = ast.parse(MODULE_SOURCE)
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }


def parameter_fields() -> dict[str, str]:
    """The annotated fields of SCDLSegmentParameterNode, as source text."""
    tree = ast.parse(MODULE_SOURCE)
    cls = next(
        node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == "SCDLSegmentParameterNode"
    )
    return {item.target.id: ast.unparse(item.annotation) for item in cls.body if isinstance(item, ast.AnnAssign)}


def bound_widgets(panel: QWidget) -> dict[str, QWidget]:
    return {
        w.property("SlicerParameterName"): w for w in panel.findChildren(QWidget) if w.property("SlicerParameterName")
    }


def test_the_ui_loads_in_real_qt(panel):
    assert type(panel).__name__ == "qMRMLWidget" and panel.objectName() == "SCDLSegment"
    assert len(panel.findChildren(QWidget)) > 40


def test_every_widget_the_module_uses_exists(panel):
    used = widgets_the_module_uses()
    assert len(used) > 25  # the walker found the module's widgets
    missing = sorted(name for name in used if panel.findChild(QWidget, name) is None)
    assert missing == []


def test_every_designer_property_is_a_real_property_of_its_widget(panel):
    """Qt turns an unknown Designer property into a dynamic property: there must be none but
    SlicerParameterName (so a misspelt property of a Qt widget or a Slicer stand-in shows up)."""
    assert unknown_properties(panel) == {}


def test_a_misspelt_property_is_caught(tmp_path):
    broken = tmp_path / "broken.ui"
    broken.write_text(UI_PATH.read_text(encoding="utf-8").replace('name="noneDisplay"', 'name="noneDisplai"'))
    assert unknown_properties(load_ui(broken)) == {"outputSegmentationSelector": ["noneDisplai"]}


def unknown_properties(panel: QWidget) -> dict[str, list[str]]:
    unknown = {
        widget.objectName(): [
            name
            for name in map(_text, widget.dynamicPropertyNames())
            if name != "SlicerParameterName" and not name.startswith("_")
        ]  # "_": Qt/PySide internals
        for widget in panel.findChildren(QWidget)
    }
    return {name: props for name, props in unknown.items() if props}


def test_parameter_bindings_match_the_parameter_node(panel):
    fields = parameter_fields()
    bound = bound_widgets(panel)
    assert set(bound) <= set(fields)
    assert set(fields) - set(bound) == {"model"}  # filled from the registry, not bound
    expected = {  # the GUI connectors Slicer has for these pairs (SCDLSegment/docs/SLICER_API.md section 4)
        "inputVolume": ("qMRMLNodeComboBox", "vtkMRMLScalarVolumeNode"),
        "outputSegmentation": ("qMRMLNodeComboBox", "vtkMRMLSegmentationNode"),
        "device": (QComboBox, "Device"),
        "finetuneSteps": (QSpinBox, "Annotated[int, WithinRange(0, 1000000)]"),
        "datasetDir": (QLineEdit, "str"),
        "modelDir": (QLineEdit, "str"),
    }
    for name, (widget_type, annotation) in expected.items():
        widget = bound[name]
        if isinstance(widget_type, str):
            assert type(widget).__name__ == widget_type
            assert widget.property("nodeTypes") == [annotation]
        else:
            assert type(widget) is widget_type  # Slicer's connectors match the exact class
        assert fields[name] == annotation


def test_connections_give_the_scene_to_every_mrml_widget(panel):
    connections = ui_connections(UI_PATH)
    receivers = {connection["receiver"] for connection in connections}
    mrml_widgets = {w.objectName() for w in panel.findChildren(QWidget) if type(w).__name__.startswith("qMRML")}
    assert receivers == mrml_widgets
    for connection in connections:
        assert connection["sender"] == "SCDLSegment"
        assert (connection["signal"], connection["slot"]) == (
            "mrmlSceneChanged(vtkMRMLScene*)",
            "setMRMLScene(vtkMRMLScene*)",
        )


def test_sections_and_initial_state(panel):
    sections = [w for w in panel.findChildren(QWidget) if type(w).__name__ == "ctkCollapsibleButton"]
    assert [w.objectName() for w in sections] == [
        "segmentCollapsibleButton",
        "reviewCollapsibleButton",
        "finetuneCollapsibleButton",
        "setupCollapsibleButton",
    ]
    assert [w.property("collapsed") for w in sections] == [False, False, False, True]
    assert not panel.findChild(QWidget, "applyButton").isEnabled()  # until an input volume is selected
    assert panel.findChild(QWidget, "segmentEditorWidget").property("undoEnabled") is True


def test_stand_ins_cover_every_custom_widget_of_the_ui():
    classes = {element.text for element in ElementTree.parse(UI_PATH).iter("class")}
    custom = {name for name in classes if name and name.startswith(("ctk", "qMRML"))}
    assert custom == set(STAND_INS)


def _text(name) -> str:
    return bytes(name).decode()


def test_the_readme_screenshot_renders_from_the_real_ui(tmp_path):
    """make_panel_screenshot.py fills the panel with the module's own formatting helpers; it must keep up with them."""
    from make_panel_screenshot import render
    from PySide6.QtGui import QImage

    render(tmp_path / "panel.png")
    image = QImage(str(tmp_path / "panel.png"))
    assert image.width() >= 460 and image.height() > 400
