"""The annotation loop end to end on real CT: dataset store -> fine-tune -> new model version; the worker.

The model is the intensity-threshold stand-in of ``conftest.threshold_bundle`` (hand-set weights, not a
trained model): what is checked is the loop's plumbing (lineage, registration, cancel, resume, protocol),
not accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from scdl_test_support import threshold_vnet

from scdlcore.bundle.format import load_bundle, save_bundle
from scdlcore.bundle.registry import ModelRegistry
from scdlcore.dataset.store import DatasetStore
from scdlcore.labels import SYNAPSE13
from scdlcore.training.finetune import bundle_weights_for_base, compare_to_parent, finetune

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = {"train.patch_size": [32, 32, 32], "train.labeled_batch": 1, "train.unlabeled_batch": 1}


@pytest.fixture(scope="module")
def store(samples, tmp_path_factory) -> Path:
    """ct_abdomen reviewed for liver and spleen only (a partial correction), ct_chest_cta unlabeled."""
    root = tmp_path_factory.mktemp("store") / "dataset"
    store = DatasetStore.init(root)
    abdomen = samples["ct_abdomen"]
    store.add(abdomen.image, abdomen.label, case_id="abdomen", reviewed=["liver", "spleen"], source="test")
    store.add(samples["ct_chest_cta"].image, case_id="chest", source="test")
    return root


@pytest.fixture
def registry(threshold_bundle, tmp_path) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "models")
    registry.import_(threshold_bundle)
    return registry


@pytest.mark.slow  # fine-tunes
def test_finetune_registers_a_new_version_naming_its_parent(store, registry, tmp_path):
    result = finetune(
        "threshold", store, registry=registry, steps=4, output=tmp_path / "run", device="cpu", overrides=FAST
    )

    assert (result.status, result.model) == ("completed", "threshold@2")
    child = registry.info("threshold@2")
    assert child.lineage["parent"] == "threshold@1"
    assert child.lineage["steps"] == 4 and len(child.lineage["data_fingerprint"]) == 16
    assert child.metrics["validation"] == "training cases"
    assert set(child.metrics["before_dice"]) == set(child.metrics["after_dice"]) == {"liver", "spleen"}
    assert all(0.0 <= v <= 1.0 for v in [*child.metrics["before_dice"].values(), *child.metrics["after_dice"].values()])
    assert registry.info("threshold").ref == "threshold@2", "the new version is the latest"
    assert result.verdict == compare_to_parent(result.before, result.after, "training cases")


def test_the_verdict_says_whether_the_new_version_beat_its_parent():
    better = compare_to_parent({"liver": 0.80, "spleen": 0.60}, {"liver": 0.90, "spleen": 0.65}, "training cases")
    assert better.better and better.worse == {}
    assert better.summary == "Better than its parent: mean Dice 0.700 -> 0.775 on the training cases."
    kept = compare_to_parent({"liver": 0.80}, {"liver": 0.80}, "held-out reviewed case c3")
    assert not kept.better and "keeps the parent's weights" in kept.summary
    mixed = compare_to_parent({"liver": 0.50, "spleen": 0.80}, {"liver": 0.90, "spleen": 0.70}, "training cases")
    assert not mixed.better and mixed.worse == {"spleen": [0.8, 0.7]}
    assert mixed.summary.endswith("but worse on spleen 0.800 -> 0.700.")
    assert not compare_to_parent({}, {}, "training cases").better


@pytest.mark.slow  # fine-tunes
def test_recorded_before_and_after_dice_are_what_segment_and_evaluate_measure(store, registry, tmp_path):
    """Validation runs through the shipped predictor and scdl evaluate's Dice: the recorded numbers are a user's."""
    from scdlcore.evaluation.metrics import evaluate_files
    from scdlcore.inference.predictor import Predictor

    result = finetune(
        "threshold",
        store,
        registry=registry,
        steps=3,
        output=tmp_path / "run",
        device="cpu",
        overrides={**FAST, "train.val_every": 3},
    )
    stored = DatasetStore(store).case("abdomen")
    image, label = DatasetStore(store).dataset().path(stored.image), DatasetStore(store).dataset().path(stored.label)
    for ref, recorded in (("threshold@1", result.before), (result.model, result.after)):
        output = tmp_path / f"{ref}.seg.nrrd"
        Predictor(registry.resolve(ref), "cpu").predict_file(image, output)
        measured = evaluate_files(output, label, SYNAPSE13)
        assert set(recorded) == {"liver", "spleen"}
        for organ, dice in recorded.items():
            assert dice == pytest.approx(measured.organs[organ].dice, abs=1e-12), (ref, organ)


def cps_bundle(folder: Path, networks: list) -> Path:
    """A CPS bundle named "pair" of ``networks`` (test stand-ins) on the threshold bundle's grid."""
    return save_bundle(
        folder,
        networks,
        name="pair",
        base="cps",
        labels=SYNAPSE13,
        spacing=(6.0, 6.0, 6.0),
        hu_window=(-125, 275),
        patch_size=(64, 64, 64),
    )


@pytest.mark.slow  # fine-tunes
def test_a_parent_that_ships_one_network_of_its_cps_pair_starts_both_and_its_child_segments_as_fast(
    store, registry, tmp_path
):
    """starter@3's case: a CPS bundle with one network. The child trains both networks from it (see
    test_trainer's test of the copy), keeps both for `dataset suggest`, and segments with the first, like its parent."""
    registry.import_(cps_bundle(tmp_path / "cps1", [threshold_vnet()]))
    result = finetune("pair", store, registry=registry, steps=2, output=tmp_path / "run", device="cpu", overrides=FAST)
    child = registry.info(result.model)
    assert (result.model, len(child.networks), child.ensemble) == ("pair@2", 2, "first")


@pytest.mark.slow  # fine-tunes
def test_a_parent_that_ships_its_cps_pair_starts_each_network_from_its_own_and_its_child_segments_with_the_mean(
    store, registry, tmp_path
):
    """The starter's case (starter@4): a CPS bundle with both networks, segmenting with their mean."""
    second = threshold_vnet()
    with torch.no_grad():
        second.head.bias[1] -= 5.0  # another network than the first
    registry.import_(cps_bundle(tmp_path / "cps2", [threshold_vnet(), second]))
    start = bundle_weights_for_base(registry.resolve("pair"), "cps")
    assert torch.equal(start["networks.1.head.bias"], second.head.bias)
    assert not torch.equal(start["networks.0.head.bias"], second.head.bias)
    result = finetune("pair", store, registry=registry, steps=2, output=tmp_path / "run", device="cpu", overrides=FAST)
    child = registry.info(result.model)
    assert (result.model, len(child.networks), child.ensemble) == ("pair@2", 2, "mean")


@pytest.mark.slow  # fine-tunes
def test_a_parent_trained_supervised_is_fine_tuned_semi_supervised(store, registry, tmp_path):
    """A parent trained supervised (starter@3 was): the annotation loop learns from the store's unlabeled CT too."""
    assert registry.info("threshold@1").base == "supervised"
    result = finetune(
        "threshold", store, registry=registry, steps=2, output=tmp_path / "run", device="cpu", overrides=FAST
    )
    child = registry.info(result.model)
    assert (child.base, len(child.networks), child.ensemble, child.scdl["enabled"]) == ("cps", 2, "first", True)


@pytest.mark.slow  # fine-tunes
def test_cancelled_finetune_registers_nothing_and_resumes(store, registry, tmp_path):
    cancel = threading.Event()
    cancel.set()  # stop at once: the run writes its checkpoint and returns
    first = finetune(
        "threshold",
        store,
        registry=registry,
        steps=4,
        output=tmp_path / "run",
        device="cpu",
        cancel=cancel,
        overrides=FAST,
    )
    assert (first.status, first.model) == ("cancelled", None)
    assert [entry.ref for entry in registry.list() if entry.name == "threshold"] == ["threshold@1"]

    resumed = finetune(
        "threshold",
        store,
        registry=registry,
        steps=4,
        output=tmp_path / "run",
        device="cpu",
        resume=True,
        overrides=FAST,
    )
    assert (resumed.status, resumed.model) == ("completed", "threshold@2")


@pytest.mark.slow  # fine-tunes
def test_a_finetune_never_overwrites_an_earlier_run(store, registry, tmp_path):
    """The default run folder: a run cancelled in the panel is resumed by --resume, and a new fine-tune of the
    same parent goes into the next free folder; a run folder given twice without --resume is refused."""
    store = Path(shutil.copytree(store, tmp_path / "dataset"))
    cancel = threading.Event()
    cancel.set()
    first = finetune("threshold", store, registry=registry, steps=4, device="cpu", cancel=cancel, overrides=FAST)
    assert (first.status, first.output) == ("cancelled", store / "runs" / "finetune-threshold-v1")
    resumed = finetune("threshold", store, registry=registry, steps=4, device="cpu", resume=True, overrides=FAST)
    assert (resumed.status, resumed.model, resumed.output) == ("completed", "threshold@2", first.output)
    again = finetune("threshold@1", store, registry=registry, steps=4, device="cpu", overrides=FAST)
    assert (again.model, again.output) == ("threshold@3", store / "runs" / "finetune-threshold-v1-2")
    with pytest.raises(
        ValueError, match=r"finetune-threshold-v1 holds a training run already: continue it with --resume"
    ):
        finetune("threshold@1", store, registry=registry, steps=4, device="cpu", output=first.output, overrides=FAST)
    with pytest.raises(FileNotFoundError, match=r"Cannot resume: no checkpoint at .*finetune-threshold-v1-3"):
        finetune(
            "threshold@1", store, registry=registry, steps=4, device="cpu", resume=True, overrides=FAST
        )  # all finished


@pytest.mark.slow  # fine-tunes
def test_sigkilled_finetune_resumes_to_completion(store, registry, tmp_path):
    command = [
        sys.executable,
        "-m",
        "scdlcore",
        "finetune",
        "--dataset",
        str(store),
        "--model",
        "threshold",
        "--steps",
        "40",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "run"),
        "--events",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(registry))
    for line in process.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["step"] >= 6:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.safetensors"
    assert checkpoint.is_file(), "a checkpoint is written every 4 steps of a 40-step fine-tune"

    done = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600, env=_env(registry))
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["event"] == "progress" and events[0]["step"] > 1, "resumed, not restarted"
    assert events[-1]["event"] == "result" and events[-1]["model"] == "threshold@2"
    assert load_bundle(registry.root / "threshold" / "2").lineage["steps"] == 40


# ---------------------------------------------------------------- the worker (protocol 1), one behaviour per test


class WorkerSession:
    """A running ``python -m scdlcore worker`` with the threshold model: requests in on stdin, events out on stdout."""

    def __init__(self, registry: ModelRegistry, log: Path) -> None:
        self.log = log
        with open(log, "w") as stderr:  # a file, not a pipe: a long session's log must never block the worker
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scdlcore", "worker", "--model", "threshold", "--device", "cpu"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=_env(registry),
            )
        self.ready = json.loads(self.process.stdout.readline() or "null")

    def send(self, **request) -> None:
        self.process.stdin.write(json.dumps({"protocol": 1, **request}) + "\n")
        self.process.stdin.flush()

    def events_until(self, request_id: str | None, ends=("result", "error", "cancelled")) -> list[dict]:
        """Every event read up to and including the end of ``request_id``."""
        seen = []
        for line in self.process.stdout:
            event = json.loads(line)
            seen.append(event)
            if event["id"] == request_id and event["event"] in ends:
                return seen
        raise AssertionError(f"worker ended before answering {request_id}: {self.log.read_text()[-2000:]}")

    def request(self, request_id: str, **request) -> list[dict]:
        self.send(id=request_id, **request)
        return self.events_until(request_id)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send(id="close", command="shutdown")
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


@pytest.fixture(scope="module")
def worker_registry(threshold_bundle, tmp_path_factory) -> ModelRegistry:
    registry = ModelRegistry(tmp_path_factory.mktemp("worker") / "models")
    registry.import_(threshold_bundle)
    return registry


@pytest.fixture(scope="module")
def worker(worker_registry, tmp_path_factory) -> Iterator[WorkerSession]:
    """One worker for the module's requests (it serves request after request, as in the Slicer panel); every
    test waits for the end of what it sent, so the next one finds it idle."""
    session = WorkerSession(worker_registry, tmp_path_factory.mktemp("worker-log") / "stderr.txt")
    yield session
    session.close()


@pytest.mark.slow
def test_the_worker_announces_its_model_and_device_when_ready(worker):
    ready = worker.ready
    assert ready == {
        **ready,
        "protocol": 1,
        "id": None,
        "event": "ready",
        "model": "threshold@1",
        "device": "cpu",
        "cuda": False,
    }


@pytest.mark.slow
def test_a_segment_request_streams_its_progress_then_the_result(worker, samples, tmp_path):
    output = tmp_path / "ct.seg.nrrd"
    transcript = worker.request("s1", command="segment", input=str(samples["ct_abdomen"].image), output=str(output))
    assert all(event["id"] == "s1" for event in transcript)
    assert [e["event"] for e in transcript].count("progress") >= 3
    assert transcript[-1]["event"] == "result" and transcript[-1]["volumes_ml"]["liver"] > 100
    assert output.is_file()


@pytest.mark.slow
def test_jobs_queue_behind_the_running_one_and_a_waiting_or_running_job_can_be_cancelled(worker, samples, tmp_path):
    chest = str(samples["ct_chest_cta"].image)
    worker.send(id="s2", command="segment", input=chest, output=str(tmp_path / "b.nii.gz"))
    worker.send(id="s3", command="segment", input=chest, output=str(tmp_path / "c.nii.gz"))
    worker.send(
        id="a1",
        command="add_case",
        dataset=str(tmp_path / "dataset"),
        image=str(samples["ct_chest_nrrd"].image),
        label=None,
        source=None,
    )
    worker.send(id="q0", command="status")
    worker.send(id="c0", command="cancel", target="s3")  # waiting
    worker.send(id="c1", command="cancel", target="s2")  # running
    seen = worker.events_until("s2")

    ends = [(e["id"], e["event"]) for e in seen if e["event"] in ("result", "cancelled", "error")]
    assert ends == [("q0", "result"), ("c0", "result"), ("s3", "cancelled"), ("c1", "result"), ("s2", "cancelled")]
    status = next(e for e in seen if e["id"] == "q0")
    assert [job for job in [status["busy"], *status["queued"]] if job] == ["s2", "s3", "a1"]
    assert [e["cancelled"] for e in seen if e["id"] in ("c0", "c1")] == [True, True]
    assert not (tmp_path / "c.nii.gz").exists() and not any(e["id"] == "s3" and e["event"] == "progress" for e in seen)
    assert worker.events_until("a1")[-1]["event"] == "result"  # the job behind them runs once they are cancelled


@pytest.mark.slow
def test_add_case_stores_the_ct_unlabeled_with_the_default_source(worker, samples, tmp_path):
    added = worker.request(
        "a2",
        command="add_case",
        dataset=str(tmp_path / "dataset"),
        image=str(samples["ct_chest_nrrd"].image),
        label=None,
        source=None,
    )[-1]
    assert added["event"] == "result", added
    assert added["labeled"] is False and added["counts"]["unlabeled"] == 1
    assert [case.source for case in DatasetStore(tmp_path / "dataset").cases()] == ["3D Slicer"]  # a null source


@pytest.mark.slow
def test_collect_keeps_the_segmented_ct_in_the_dataset_once(worker, samples, tmp_path):
    for request_id, new in (("k1", True), ("k2", False)):
        transcript = worker.request(
            request_id,
            command="segment",
            input=str(samples["ct_abdomen"].image),
            output=str(tmp_path / "ct.seg.nrrd"),
            collect=str(tmp_path / "dataset"),
        )
        assert transcript[-2]["stage"] == "collect" and transcript[-2]["event"] == "progress"
        collected = transcript[-1]["collected"]
        assert collected == {**collected, "case_id": "case0001", "new": new, "status": "unlabeled"}
        assert collected["counts"] == {"labeled": 0, "partial": 0, "unlabeled": 1}


@pytest.mark.slow
def test_a_line_that_is_not_a_request_is_answered_without_an_id_and_the_worker_serves_on(worker):
    worker.send(id="x0", command=["segment"])
    assert worker.events_until(None, ends=("error",))[-1]["message"].startswith("Not a request")
    assert worker.request("q1", command="status")[-1]["event"] == "result"


@pytest.mark.slow
def test_an_unknown_command_is_answered_with_an_error_naming_it(worker):
    answer = worker.request("x1", command="no_such_command")[-1]
    assert answer["event"] == "error" and "Unknown command 'no_such_command'" in answer["message"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("request_fields", "fragments"),
    [
        (
            {"command": "finetune", "dataset": "{tmp}/dataset", "steps": "abc"},
            ("Request 'finetune'", "'steps'", "whole number"),
        ),
        ({"command": "segment", "output": "{tmp}/ct.seg.nrrd"}, ("Request 'segment'", "lacks the field 'input'")),
        (
            {"command": "segment", "input": "{tmp}/ct.nrrd", "output": "{tmp}/ct.seg.nrrd", "organs": "liver"},
            ("Request 'segment'", "'organs'", "list of strings"),
        ),
    ],
    ids=["steps-not-a-number", "no-input", "organs-not-a-list"],
)
def test_a_malformed_request_is_answered_with_an_error_naming_the_field(worker, tmp_path, request_fields, fragments):
    request = {
        key: value.format(tmp=tmp_path) if isinstance(value, str) else value for key, value in request_fields.items()
    }
    answer = worker.request("b1", **request)[-1]
    assert answer["event"] == "error", answer
    assert answer["message"].startswith(fragments[0]) and all(fragment in answer["message"] for fragment in fragments)


@pytest.mark.slow
def test_a_finetune_that_fails_before_training_is_one_error_with_the_childs_reason(worker, samples, tmp_path):
    DatasetStore.init(tmp_path / "dataset").add(samples["ct_chest_nrrd"].image, source="test")  # nothing labeled
    seen = worker.request("f1", command="finetune", dataset=str(tmp_path / "dataset"), steps=2, device="cpu")
    assert [e["event"] for e in seen if e["id"] == "f1"] == ["error"]
    assert "has no labeled case" in seen[-1]["message"]  # the child's own error event, passed on
    status = worker.request("q2", command="status")[-1]
    assert (status["busy"], status["queued"]) == (None, [])  # the worker is idle again


@pytest.mark.slow
def test_shutdown_is_answered_and_the_worker_exits_cleanly(worker_registry, tmp_path):
    session = WorkerSession(worker_registry, tmp_path / "stderr.txt")
    try:
        assert session.ready["event"] == "ready"
        assert session.request("z1", command="shutdown")[-1]["event"] == "result"
        assert session.process.wait(timeout=60) == 0
    finally:
        session.close()


def _env(registry: ModelRegistry) -> dict[str, str]:
    env = dict(os.environ)
    env["SCDL_MODELS_DIR"] = str(registry.root)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "SCDLCore"), env.get("PYTHONPATH")]))
    return env
