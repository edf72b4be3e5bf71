"""The bundled starter model, as a user meets it: registered by default, and its recorded scores reproducible.

``model.json`` records the per-organ Dice of both labeled sample CTs (``ct_abdomen`` and ``ct_abdomen_dicom``,
both trained on), scored on the CPU by ``Testing/StarterModel/make_starter_model.py``, and the held-out Dice of
the same recipe's leave-one-patient-out folds. Here each CT goes through the user's commands, ``scdl segment``
then ``scdl evaluate``, on the CPU, and the Dice of every organ in its reference must match.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scdlcore.bundle.registry import STARTER_MODEL_DIR, ModelRegistry
from scdlcore.cli import main


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelRegistry:
    """An empty user registry: the starter must come from the package alone."""
    monkeypatch.setenv("SCDL_MODELS_DIR", str(tmp_path / "registry"))
    return ModelRegistry()


def test_the_starter_is_registered_by_default_and_says_what_it_is(registry: ModelRegistry) -> None:
    assert [(entry.ref, entry.builtin) for entry in registry.list()] == [("starter@4", True)]
    starter = registry.resolve("starter")  # loads it and checks the SHA256 of its weights
    assert starter.labels.name == "synapse13" and len(starter.build_networks("cpu")) == 2
    assert starter.orientation == "RAS"
    assert (STARTER_MODEL_DIR / "weights.safetensors").stat().st_size < 16 * 10**6
    assert "TotalSegmentator" in starter.description and "annotation loop" in starter.description
    assert starter.lineage["labeled"] == ["ct_abdomen", "ct_abdomen_dicom"]
    assert starter.metrics["scored_on"] == "cpu"
    folds = {tuple(fold["trained_on"]): fold["scored"] for fold in starter.metrics["leave_one_out"]}
    assert folds == {("ct_abdomen",): "ct_abdomen_dicom", ("ct_abdomen_dicom",): "ct_abdomen"}


@pytest.mark.slow  # the starter model on real CT
@pytest.mark.parametrize("case, organs_present", [("ct_abdomen", 12), ("ct_abdomen_dicom", 8)])
def test_segmenting_each_labeled_ct_reproduces_the_recorded_dice(
    registry: ModelRegistry, samples, tmp_path: Path, capsys: pytest.CaptureFixture, case: str, organs_present: int
) -> None:
    recorded = registry.resolve("starter").metrics["native_grid"][case]
    sample = samples[case]
    segmentation = tmp_path / f"{case}.seg.nrrd"
    assert main(["segment", str(sample.image), "-o", str(segmentation), "--device", "cpu"]) == 0
    assert main(["evaluate", str(segmentation), str(sample.label), "--json", str(tmp_path / "scores.json")]) == 0
    measured = json.loads((tmp_path / "scores.json").read_text())["summary"]
    assert "starter@4" in capsys.readouterr().out
    present = [organ for organ, scores in recorded["organs"].items() if scores["reference_voxels"] > 0]
    assert len(present) == organs_present
    for organ in present:  # float32 CPU arithmetic may differ in the last bits between processors
        expected, actual = recorded["organs"][organ]["dice"], measured["organs"][organ]["dice"]
        assert math.isclose(actual, expected, abs_tol=2e-3), f"{organ}: Dice {actual} here, {expected} in model.json"
    # Organs absent from the reference are left out: one stray voxel more or less would turn "undefined" into 0.
