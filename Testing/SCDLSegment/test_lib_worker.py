"""WorkerClient against fake_engine.py, a real child process speaking protocol version 1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nrrd
import numpy as np
import psutil
import pytest
from scdlsegment_testing import wait_until

from SCDLSegmentLib.engine import EngineCommand
from SCDLSegmentLib.settings import Device
from SCDLSegmentLib.worker import WorkerClient, WorkerInfo


class Recorder:
    """Collects the events of one request (the panel's per-request handler)."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    @property
    def last(self) -> str | None:
        return self.events[-1]["event"] if self.events else None


def start_worker(
    engine: EngineCommand, model: str = "starter", env: dict | None = None, **kwargs
) -> tuple[WorkerClient, list]:
    statuses: list[dict] = []
    client = WorkerClient(
        engine.worker(model, Device.CPU), env=engine.environment(env or os.environ), on_status=statuses.append, **kwargs
    )
    client.start()
    return client, statuses


def write_ct(path: Path) -> np.ndarray:
    """A (D, H, W) = (4, 5, 6) CT: 150+ HU block (liver), 100 HU block (spleen), air elsewhere."""
    image = np.full((4, 5, 6), -1000, dtype=np.int16)
    image[1:3, 1:4, 1:3] = 200
    image[1:3, 1:4, 4:6] = 100
    nrrd.write(
        str(path),
        image,
        {
            "space": "left-posterior-superior",
            "space directions": np.diag([0.8, 0.8, 2.5]),
            "space origin": np.array([10.0, 20.0, 30.0]),
        },
        index_order="C",
    )
    return image


def test_ready_event_fills_worker_info(fake_engine):
    client, statuses = start_worker(fake_engine)
    wait_until(lambda: client.info is not None, client.poll)
    assert client.info == WorkerInfo("starter@1", "cpu", "2.13.0", False, None, None)
    assert client.info.describe() == "CPU (no CUDA GPU found) · torch 2.13.0"
    assert [status["event"] for status in statuses if status["event"] != "log"] == [
        "ready"
    ]  # stderr lines may come first
    client.close()


@pytest.mark.parametrize(
    ("info", "text"),
    [
        (WorkerInfo("m", "cuda", "2.13", True, "NVIDIA H100", 79.6), "GPU: NVIDIA H100 (79.6 GB) · torch 2.13"),
        (WorkerInfo("m", "cpu", "2.13", True, "RTX 4090", 24.0), "CPU (GPU RTX 4090 not used) · torch 2.13"),
        (WorkerInfo("m", "cpu", "", False, None, None), "CPU (no CUDA GPU found)"),
    ],
)
def test_worker_info_describes_what_was_detected(info, text):
    assert info.describe() == text


def test_segment_request_streams_progress_then_result(fake_engine, tmp_path):
    write_ct(tmp_path / "ct.nrrd")
    client, _ = start_worker(fake_engine)
    handler = Recorder()
    request_id = client.request(
        "segment", handler, input=str(tmp_path / "ct.nrrd"), output=str(tmp_path / "labels.nrrd"), organs=["liver"]
    )
    wait_until(lambda: handler.last == "result", client.poll)

    stages = [event["stage"] for event in handler.events if event["event"] == "progress"]
    assert stages == ["load", "preprocess", "infer", "postprocess", "write"]
    assert all(event["id"] == request_id for event in handler.events)
    labels, header = nrrd.read(str(tmp_path / "labels.nrrd"), index_order="C")
    assert sorted(np.unique(labels)) == [0, 6]  # only the requested organ
    np.testing.assert_allclose(header["space origin"], [10.0, 20.0, 30.0])
    assert handler.events[-1]["volumes_ml"]["liver"] == pytest.approx(12 * 0.8 * 0.8 * 2.5 / 1000)
    assert client.pending == []
    client.close()


def test_cancel_is_answered_by_the_worker_and_keeps_it_running(fake_engine, tmp_path):
    write_ct(tmp_path / "ct.nrrd")
    client, _ = start_worker(fake_engine, model="slow")
    handler = Recorder()
    request_id = client.request("segment", handler, input=str(tmp_path / "ct.nrrd"), output=str(tmp_path / "l.nrrd"))
    wait_until(lambda: handler.last == "progress", client.poll)
    client.cancel(request_id)
    wait_until(lambda: handler.last == "cancelled", client.poll)

    assert client.running  # the model stays loaded for the next click
    status = Recorder()
    client.request("status", status)
    wait_until(lambda: status.last == "result", client.poll)
    client.close()


def test_cancel_kills_the_worker_tree_when_it_does_not_answer(fake_engine, tmp_path):
    write_ct(tmp_path / "ct.nrrd")
    now = [0.0]
    client, statuses = start_worker(fake_engine, model="stuck", clock=lambda: now[0], cancel_grace_s=3.0)
    wait_until(lambda: client.info is not None, client.poll)
    handler = Recorder()
    request_id = client.request("segment", handler, input=str(tmp_path / "ct.nrrd"), output=str(tmp_path / "l.nrrd"))
    client.cancel(request_id)
    client.poll()
    assert client.running  # still inside the grace time
    pid = client._process.pid

    now[0] = 3.5  # the grace time has passed without an answer
    wait_until(lambda: not client.running, client.poll)

    assert handler.events[-1] == {"id": request_id, "event": "cancelled"}
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert statuses[-1]["event"] == "stopped"


def test_crash_fails_the_pending_request_with_a_readable_message(fake_engine, tmp_path):
    write_ct(tmp_path / "ct.nrrd")
    client, statuses = start_worker(fake_engine, model="crash")
    handler = Recorder()
    client.request("segment", handler, input=str(tmp_path / "ct.nrrd"), output=str(tmp_path / "l.nrrd"))
    wait_until(lambda: not client.running, client.poll)

    assert handler.last == "error"
    message = handler.events[-1]["message"]
    assert "exit code 3" in message and "CUDA out of memory (simulated)" in message
    assert "Traceback" not in message
    assert statuses[-1] == {"event": "stopped", "message": message}
    assert any(event.get("message") == "Traceback (most recent call last):" for event in statuses)  # went to the log


def test_another_protocol_version_is_refused(fake_engine):
    client, statuses = start_worker(fake_engine, env={**os.environ, "FAKE_ENGINE_PROTOCOL": "2"})
    handler = Recorder()
    client.request("status", handler)
    wait_until(lambda: not client.running, client.poll)

    assert client.info is None
    assert handler.last == "error" and "protocol version 2" in handler.events[-1]["message"]
    assert "protocol version 2" in statuses[-1]["message"]


def test_add_case_and_shutdown(fake_engine, tmp_path):
    write_ct(tmp_path / "ct.nrrd")
    client, statuses = start_worker(fake_engine)
    handler = Recorder()
    client.request(
        "add_case", handler, dataset=str(tmp_path / "ds"), image=str(tmp_path / "ct.nrrd"), label=None, reviewed=[]
    )
    wait_until(lambda: handler.last == "result", client.poll)
    assert handler.events[-1]["case_id"] == "case001"

    client.shutdown()
    wait_until(lambda: not client.running, client.poll)
    assert statuses[-1] == {"event": "stopped", "message": None}


def test_request_to_a_worker_that_is_not_running_is_refused(fake_engine):
    client = WorkerClient(fake_engine.worker("starter", Device.CPU))
    with pytest.raises(RuntimeError, match="not running"):
        client.request("status", Recorder())


def test_worker_that_cannot_start_names_the_program():
    client = WorkerClient(["/nonexistent/PythonSlicer", "-m", "scdlcore", "worker"])
    with pytest.raises(FileNotFoundError, match="PythonSlicer"):
        client.start()


def test_engine_command_lines_and_environment(tmp_path):
    engine = EngineCommand(python="/opt/Slicer/bin/PythonSlicer", python_path=("/ext/lib",), model_dir="/data/models")
    assert engine.worker("starter@1", Device.GPU) == [
        "/opt/Slicer/bin/PythonSlicer",
        "-m",
        "scdlcore",
        "worker",
        "--model",
        "starter@1",
        "--device",
        "cuda",
    ]
    assert engine.finetune(tmp_path, "starter", 50, Device.GPU)[3:] == [
        "finetune",
        "--dataset",
        str(tmp_path),
        "--model",
        "starter",
        "--steps",
        "50",
        "--device",
        "cuda",
        "--events",
    ]
    assert engine.models_list()[3:] == ["models", "list", "--json"]
    assert engine.models_info("starter@1")[3:] == ["models", "info", "starter@1", "--json"]
    assert engine.models_import("/media/abdomen.scdlmodel")[3:] == [
        "models",
        "import",
        "/media/abdomen.scdlmodel",
        "--json",
    ]
    assert engine.sample_data("ct_abdomen")[3:] == ["sample-data", "ct_abdomen", "--json"]
    assert engine.dataset_suggest(tmp_path, "starter@2", Device.CPU)[3:] == [
        "dataset",
        "suggest",
        str(tmp_path),
        "--model",
        "starter@2",
        "--device",
        "cpu",
        "--top",
        "1",
        "--json",
    ]
    env = engine.environment({"PYTHONPATH": "/other", "HOME": "/home/u"})
    assert env["PYTHONPATH"] == os.pathsep.join(["/ext/lib", "/other"])
    assert env["SCDL_MODELS_DIR"] == "/data/models" and env["PYTHONUNBUFFERED"] == "1" and env["HOME"] == "/home/u"
    assert "SCDL_MODELS_DIR" not in EngineCommand(python=sys.executable).environment({})


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_finetune_steps_must_be_a_positive_whole_number(steps, tmp_path):
    with pytest.raises(ValueError, match="steps must be a whole number"):
        EngineCommand(python="py").finetune(tmp_path, "starter", steps, Device.AUTO)


def test_finetune_without_steps_leaves_them_to_the_engine(tmp_path):
    """The panel's "Auto": no --steps, so scdl finetune takes the default of the device it runs on."""
    command = EngineCommand(python="py").finetune(tmp_path, "starter", None, Device.CPU)
    assert "--steps" not in command and command[-3:] == ["--device", "cpu", "--events"]
    assert EngineCommand(python="py").finetune(tmp_path, "starter", 40, Device.CPU)[-5:-3] == ["--steps", "40"]


def test_missing_dataset_folder_says_where_to_set_it():
    with pytest.raises(ValueError, match="Setup and advanced"):
        EngineCommand(python="py").dataset_list("")
