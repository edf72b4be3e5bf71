"""Render the SCDLSegment panel to Resources/Screenshots/panel.png (for the README).

The .ui is loaded in real Qt (offscreen) with the stand-ins of ``qt_standins`` for Slicer's own
widgets, then filled with example content (the texts the panel shows while a segmentation runs
and after a fine-tuning run, made by the module's own formatting helpers). Run from the
repository root::

    PYTHONPATH=SCDLCore python Testing/SCDLSegment/make_panel_screenshot.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO_ROOT / "SCDLSegment"), str(REPO_ROOT / "SCDLCore")]

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtWidgets import QListWidgetItem, QTableWidgetItem, QWidget  # noqa: E402
from qt_standins import load_ui, qt_app  # noqa: E402

from scdlcore.labels import SYNAPSE13  # noqa: E402
from SCDLSegmentLib import catalog, progress  # noqa: E402
from SCDLSegmentLib.settings import Device  # noqa: E402
from SCDLSegmentLib.worker import WorkerInfo  # noqa: E402

OUTPUT = REPO_ROOT / "Resources" / "Screenshots" / "panel.png"


def fill_example(panel: QWidget) -> None:
    """Put the panel in the state it has while segmenting, after one fine-tuning run."""

    def widget(name: str):
        return panel.findChild(QWidget, name)

    widget("inputVolumeSelector").addItem("ct_abdomen (example_ct)")
    widget("outputSegmentationSelector").addItem("Create new segmentation")
    model = catalog.parse_models(
        [
            {
                "name": "starter",
                "version": 2,
                "description": "Abdominal organs, fine-tuned",
                "spacing": [1.5, 1.5, 2.0],
                "lineage": {"parent": "starter@1", "steps": 300},
                "metrics": {"mean_dice": 0.81},
            }
        ]
    )[0]
    widget("modelComboBox").addItems(["starter@2", "starter@1"])
    widget("modelDetailsLabel").setText(model.details())
    widget("deviceComboBox").addItems([device.label() for device in Device])
    info = WorkerInfo("starter@2", "cuda", "2.13.0", True, "NVIDIA H100", 79.6)
    widget("deviceInfoLabel").setText(f"Detected: {info.describe()}")
    widget("applyButton").setText("Cancel")
    widget("applyButton").setEnabled(True)
    percent, text = progress.segment_progress("infer", 0.5)
    widget("segmentProgressBar").setValue(percent)
    widget("segmentProgressBar").setFormat(f"{text}… %p%")
    organs = widget("reviewedOrgansList")
    for label in SYNAPSE13.labels:
        item = QListWidgetItem(label.display_name)
        item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
        item.setCheckState(Qt.Checked if label.name in ("liver", "spleen", "stomach") else Qt.Unchecked)
        organs.addItem(item)
    widget("submitButton").setEnabled(True)
    widget("addUnlabeledButton").setEnabled(True)
    widget("datasetCountsLabel").setText(f"Dataset: {catalog.DatasetSummary(3, 1, 12).describe()}")
    widget("finetuneProgressBar").setValue(100)
    widget("finetuneStatusLabel").setText("New model starter@2 selected.")
    widget("validationLabel").setText(
        progress.format_validation(
            {"step": 300, "dice": {"liver": 0.93, "spleen": 0.88, "stomach": 0.71}, "mean_dice": 0.84}, SYNAPSE13
        )
    )
    rows = progress.dice_rows(
        {"spleen": 0.79, "liver": 0.90, "stomach": 0.55}, {"spleen": 0.88, "liver": 0.93, "stomach": 0.71}, SYNAPSE13
    )
    table = widget("diceTable")
    table.setRowCount(len(rows))
    for row, cells in enumerate(rows):
        for column, text in enumerate(cells):
            table.setItem(row, column, QTableWidgetItem(text))


def render(output: Path) -> None:
    """Load the .ui, fill it with the example content and save it as a PNG."""
    qt_app()
    panel = load_ui(REPO_ROOT / "SCDLSegment" / "Resources" / "UI" / "SCDLSegment.ui")
    fill_example(panel)
    panel.resize(460, 400)
    panel.show()
    qt_app().processEvents()
    panel.resize(460, panel.sizeHint().height())
    qt_app().processEvents()
    output.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(output)):
        raise OSError(f"Could not write {output}")


if __name__ == "__main__":
    render(OUTPUT)
    print(f"wrote {OUTPUT}")
