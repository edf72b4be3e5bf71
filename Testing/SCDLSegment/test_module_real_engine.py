"""SCDLSegment.py against the REAL engine: ``python -m scdlcore worker`` and ``scdl finetune`` as child processes.

Slicer's MRML is real (slicer-core), its application and Qt are the STAND-IN of slicer_standin.py (not Slicer);
the engine is the real one, with the
intensity-threshold stand-in model of ``Testing/conftest.py`` (hand-set weights, not a trained model). This
checks that the panel's client and the engine agree on the protocol, the dataset store and model versions.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from scdlsegment_testing import REPO_ROOT, add_volume
from slicer_standin import SlicerStandIn

from scdlcore.bundle.registry import ModelRegistry
from scdlcore.dataset.store import DatasetStore
from SCDLSegmentLib.catalog import DatasetSummary
from SCDLSegmentLib.engine import EngineCommand
from SCDLSegmentLib.settings import Device

pytestmark = pytest.mark.slow  # the real engine as child processes: seconds to a minute per test


@pytest.fixture
def standin(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return SlicerStandIn(tmp_path / "slicer-temp", environment=dict(os.environ))


@pytest.fixture
def logic(standin, monkeypatch, threshold_bundle, tmp_path):
    standin.install(monkeypatch)
    module = standin.import_module()
    ModelRegistry(tmp_path / "models").import_(threshold_bundle)
    engine = EngineCommand(
        python=sys.executable, python_path=(str(REPO_ROOT / "SCDLCore"),), model_dir=str(tmp_path / "models")
    )
    logic = module.SCDLSegmentLogic(engine=engine, settingsStore=standin.settings)
    yield logic
    logic.shutdown()


def abdomen_like_ct(standin):
    """(D, H, W) = (24, 40, 48) CT at 6 mm.

    Air, a body of fat (-100 HU), a 'spleen' block (60 HU) and dense bone (400 HU).
    """
    image = np.full((24, 40, 48), -1000, dtype=np.int16)
    image[2:22, 4:36, 4:44] = -100
    image[6:14, 10:20, 10:24] = 60
    image[8:12, 24:30, 28:36] = 400
    ijk_to_ras = np.array([[-6.0, 0, 0, 100.0], [0, -6.0, 0, 80.0], [0, 0, 6.0, -50.0], [0, 0, 0, 1]])
    return add_volume(standin.scene, image, ijk_to_ras)


def test_segment_submit_finetune_with_the_real_engine(logic, standin, tmp_path):
    volume = abdomen_like_ct(standin)

    outcome = logic.segment(volume, "threshold", Device.CPU, timeout_s=120)
    assert outcome.error is None, outcome.error
    assert outcome.volumes_ml["spleen"] == pytest.approx(8 * 10 * 14 * 0.216, rel=0.3)  # 6 mm voxels: 0.216 mL

    dataset = tmp_path / "dataset"
    added = logic.submitCase(volume, None, [], dataset, "threshold", Device.CPU)
    assert (added["labeled"], added["previous"]) == (False, None)
    result = logic.submitCase(volume, outcome.segmentationNode, ["spleen", "liver"], dataset, "threshold", Device.CPU)
    assert (result["case_id"], result["previous"]) == (added["case_id"], "unlabeled"), "one CT is one case"
    with pytest.raises(
        RuntimeError, match=f"already holds .* as case {added['case_id']} \\(partial\\); nothing was added"
    ):
        logic.submitCase(volume, None, [], dataset, "threshold", Device.CPU)
    store = DatasetStore(dataset)
    case = store.case(result["case_id"])
    assert case.reviewed == ["spleen", "liver"] and case.model == "threshold@1"
    assert store.counts() == {"labeled": 0, "partial": 1, "unlabeled": 0}
    assert logic.datasetSummary(dataset) == DatasetSummary(labeled=0, partial=1, unlabeled=0)

    tuned = logic.finetune(dataset, "threshold", steps=2, device=Device.CPU, timeout_s=600)
    assert tuned.error is None, tuned.error
    assert tuned.model == "threshold@2" and set(tuned.before) == {"spleen", "liver"}
    assert [model.ref for model in logic.listModels() if model.ref.startswith("threshold")] == [
        "threshold@1",
        "threshold@2",
    ]


def test_a_submit_waits_for_the_running_segmentation_and_suggest_names_a_stored_case(logic, standin, tmp_path):
    """The worker queues jobs: "Add as unlabeled" clicked while a segmentation runs is answered after it."""
    volume, other = abdomen_like_ct(standin), abdomen_like_ct(standin)
    standin.array(other)[10, 20, 20] = 300  # another CT: other voxels
    dataset = tmp_path / "dataset"
    segmented, added = [], {}
    logic.startSegmentation(volume, "threshold", Device.CPU, onDone=segmented.append)
    logic.startSubmitCase(
        other, None, [], dataset, "threshold", Device.CPU, lambda result, error: added.update(r=result, e=error)
    )
    logic.waitFor(lambda: bool(segmented) and bool(added), 120)
    assert segmented[0].error is None and added["e"] is None, (segmented[0].error, added["e"])
    assert logic.datasetSummary(dataset) == DatasetSummary(labeled=0, partial=0, unlabeled=1)

    suggested = {}
    logic.startSuggestCase(
        dataset, "threshold", Device.CPU, lambda suggestion, error: suggested.update(s=suggestion, e=error)
    )
    logic.waitFor(lambda: bool(suggested), 120)
    assert suggested["e"] is None, suggested["e"]
    suggestion = suggested["s"]
    assert suggestion.case_id == added["r"]["case_id"] and "uncertainty" in suggestion.reason
    loaded = standin.modules["slicer"].util.loadVolume(suggestion.image)  # the stored CT, as the panel loads it
    np.testing.assert_array_equal(standin.array(loaded), standin.array(other))


def test_a_worker_that_cannot_start_says_why(logic, standin):
    statuses, logged = [], []
    logic.onWorkerStatus, logic.onLog = statuses.append, logged.append
    outcome = logic.segment(abdomen_like_ct(standin), "no_such_model", Device.CPU, timeout_s=120)
    assert "No model 'no_such_model'" in outcome.error and "threshold@1" in outcome.error
    # The reason reaches the panel once, as why the worker stopped; the worker client keeps its fatal error event.
    assert [event["event"] for event in statuses] == ["stopped"] and "No model 'no_such_model'" in statuses[0][
        "message"
    ]
    assert sum("No model 'no_such_model'" in line for line in logged) == 1
