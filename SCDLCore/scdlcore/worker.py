"""``scdl worker``: a long-lived process that keeps a model loaded and answers JSON-lines requests.

The 3D Slicer panel starts one worker and talks to it over stdin/stdout (protocol version 1, see the
README's "Worker protocol (version 1)" section for a transcript). One request per line in, one event per line out;
every event carries the request's ``id``. Jobs (segment, add_case, finetune) queue and run one at a time,
in the order they came, in a job thread, so ``status`` and ``cancel`` are answered while they run or wait;
fine-tuning runs ``scdl finetune`` in a child process whose events are forwarded with the request id, so the
worker (and the model it holds) stays responsive and a crash of the fine-tune cannot take the worker down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from scdlcore.events import PROTOCOL_VERSION, Progress, write_event

__all__ = ["Worker"]

#: How a request ends: ``("result" | "error" | "cancelled", fields)``.
Ending = tuple[str, dict[str, Any]]
#: A job's work: emits its progress and returns its ending (sent once the job thread is free again).
Job = Callable[[], Ending]

#: Per command, its fields: (type, required). Anything else in a request is ignored.
_FIELDS: dict[str, dict[str, tuple[type, bool]]] = {
    "segment": {"input": (str, True), "output": (str, True), "organs": (list, False), "collect": (str, False)},
    "add_case": {
        "dataset": (str, True),
        "image": (str, True),
        "label": (str, False),
        "reviewed": (list, False),
        "case_id": (str, False),
        "source": (str, False),
    },
    "finetune": {"dataset": (str, True), "steps": (int, False), "model": (str, False), "device": (str, False)},
    "cancel": {"target": (str, True)},
}


class _LineWriter:
    """A text stream whose every ``write`` of a whole line is atomic across threads."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self.lock = stream, threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        pass


class Worker:
    """Serves requests for one loaded model.

    Args:
        model: model reference (name, name@version or bundle path) resolved in ``models_dir``.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        models_dir: the model registry folder (None: $SCDL_MODELS_DIR or the user data folder).
        stdin, stdout: the request and event streams.
    """

    def __init__(self, model: str, device: str, models_dir: str | None, stdin: IO[str], stdout: IO[str]) -> None:
        self.model_ref, self.device_name, self.models_dir = model, device, models_dir
        self.stdin, self.out = stdin, _LineWriter(stdout)
        self._job_thread = threading.Thread(target=self._run_jobs, name="scdl-jobs", daemon=True)
        self._jobs: deque[tuple[str, Job]] = deque()  # waiting, oldest first
        self._jobs_changed = threading.Condition()  # guards _jobs, _job_id, _closing and setting _cancel
        self._job_id: str | None = None  # the running job
        self._closing = False
        self._cancel = threading.Event()  # cancels the running job
        self._child: subprocess.Popen | None = None
        self._handlers: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "segment": self._start_segment,
            "add_case": self._start_add_case,
            "finetune": self._start_finetune,
            "cancel": self._cancel_request,
            "status": self._status,
        }

    def serve(self) -> int:
        """Load the model, announce ``ready``, answer requests until ``shutdown`` or end of input."""
        import torch

        from scdlcore.bundle.registry import ModelRegistry
        from scdlcore.device import resolve_device
        from scdlcore.inference.predictor import Predictor

        try:
            self.bundle = ModelRegistry(self.models_dir).resolve(self.model_ref)
            self.device = resolve_device(self.device_name)
            self.predictor = Predictor(self.bundle, self.device)
        except Exception as err:  # whatever stops the start must reach the client in the protocol, not a traceback
            self.emit(None, "error", message=str(err) or type(err).__name__, fatal=True)
            return 2
        cuda = self.device.type == "cuda"
        self.emit(
            None,
            "ready",
            model=self.bundle.ref,
            device=self.device.type,
            torch=torch.__version__,
            cuda=cuda,
            gpu=torch.cuda.get_device_name(self.device) if cuda else None,
            gpu_memory_gb=round(torch.cuda.get_device_properties(self.device).total_memory / 2**30, 1)
            if cuda
            else None,
        )
        self._job_thread.start()
        for line in self.stdin:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                request_id, command = request.get("id"), request["command"]
                if not isinstance(command, str) or not isinstance(request_id, (str, type(None))):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                self.emit(
                    None,
                    "error",
                    message=f'Not a request (a JSON object with "id" and "command" strings): {line.strip()[:200]}',
                )
                continue
            protocol = request.get("protocol", PROTOCOL_VERSION)
            if protocol != PROTOCOL_VERSION:
                self.emit(
                    request_id,
                    "error",
                    message=f"The request speaks protocol {json.dumps(protocol)[:20]}; this "
                    f"worker speaks protocol {PROTOCOL_VERSION}. Update SCDL Segment so that the panel and "
                    "the engine match.",
                )
                continue
            if command == "shutdown":
                self._close_jobs()
                self.emit(request_id, "result", message="bye")
                return 0
            handler = self._handlers.get(command)
            if handler is None:
                self.emit(
                    request_id,
                    "error",
                    message=f"Unknown command {command!r}; known: {', '.join([*self._handlers, 'shutdown'])}.",
                )
                continue
            try:
                _check_fields(command, request)
            except ValueError as err:  # answered, and the worker serves on
                self.emit(request_id, "error", message=str(err))
                continue
            handler(request_id, request)
        self._close_jobs()
        return 0

    def emit(self, request_id: str | None, event: str, **fields: Any) -> None:
        write_event(self.out, request_id, event, **fields)

    # --- requests -------------------------------------------------------------------------------------
    def _start_segment(self, request_id: str, request: dict[str, Any]) -> None:
        def segment() -> Ending:
            from scdlcore.inference.predictor import organ_volumes_ml

            start = time.monotonic()
            progress = Progress(100, "segment", json_lines=True, stream=self.out, request_id=request_id)  # type: ignore[arg-type]
            labels = self.predictor.predict_file(
                request["input"],
                request["output"],
                organs=request.get("organs"),
                progress=progress,
                cancel=self._cancel,
            )
            volumes = organ_volumes_ml(labels, self.bundle.labels)
            result = {
                "output": request["output"],
                "volumes_ml": volumes,
                "organs_found": sum(volume > 0 for volume in volumes.values()),
                "seconds": round(time.monotonic() - start, 2),
                "model": self.bundle.ref,
            }
            if request.get("collect"):
                progress.stage = "collect"
                progress.update(progress.total)  # tells the panel what the last seconds are spent on
                result["collected"] = self._collect(request["input"], request["collect"])
            return "result", result

        self._run_job(request_id, segment)

    def _collect(self, image: str, dataset: str) -> dict[str, Any]:
        """Keep a segmented CT in ``dataset`` as an unlabeled case unless the dataset holds it already.

        A failure is reported in the result, not raised: the segmentation itself succeeded.
        """
        from scdlcore.dataset.manifest import CTAlreadyStored
        from scdlcore.dataset.store import DatasetStore

        try:
            with DatasetStore.created_for(Path(dataset), labels=self.bundle.labels.name) as store:
                try:
                    case, new = store.add(image, source="3D Slicer (segmented)", model=self.bundle.ref), True
                except CTAlreadyStored as err:
                    case, new = err.case, False
            return {"case_id": case.id, "new": new, "status": case.status, "counts": store.counts()}
        except (ValueError, OSError) as err:
            return {"error": str(err)}

    def _start_add_case(self, request_id: str, request: dict[str, Any]) -> None:
        def add_case() -> Ending:
            from scdlcore.dataset.store import DatasetStore

            label = request.get("label")
            with DatasetStore.created_for(Path(request["dataset"]), labels=self.bundle.labels.name) as store:
                before = {case.id: case.status for case in store.cases()}
                case = store.add(
                    request["image"],
                    label,
                    case_id=request.get("case_id"),
                    reviewed=request.get("reviewed") if label else None,  # an unlabeled case reviews nothing
                    source=request.get("source") or "3D Slicer",
                    model=self.bundle.ref,
                )
            return "result", {
                "case_id": case.id,
                "labeled": case.is_labeled,
                "previous": before.get(case.id),
                "counts": store.counts(),
            }

        self._run_job(request_id, add_case)

    def _start_finetune(self, request_id: str, request: dict[str, Any]) -> None:
        command = [
            sys.executable,
            "-m",
            "scdlcore",
            "finetune",
            "--dataset",
            request["dataset"],
            "--model",
            request.get("model") or self.bundle.ref,
            "--device",
            request.get("device") or self.device_name,
            "--events",
        ]
        if request.get("steps") is not None:  # else scdl finetune's default
            command += ["--steps", str(request["steps"])]
        if self.models_dir:
            command += ["--models-dir", self.models_dir]

        def finetune() -> Ending:  # the child's own result, error or cancelled event ends the request
            from scdlcore.inference.predictor import InferenceCancelled

            with self._jobs_changed:  # a cancel that came before the child existed still stops it
                self._child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                if self._cancel.is_set():
                    self._child.terminate()
            stderr_tail: deque[str] = deque(maxlen=5)  # drained meanwhile: a full pipe would stall the child
            drain = threading.Thread(target=stderr_tail.extend, args=(self._child.stderr,), daemon=True)
            drain.start()
            ending: Ending | None = None
            for line in self._child.stdout:  # type: ignore[union-attr]
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                kind = event.pop("event", "log")
                fields = {key: value for key, value in event.items() if key not in ("id", "protocol")}
                if kind not in ("result", "error", "cancelled"):
                    self.emit(request_id, kind, **fields)
                elif ending is None:
                    ending = kind, fields
            code = self._child.wait()
            drain.join(timeout=10)
            if ending is not None:
                return ending  # a second SIGTERM (cancel, then shutdown) may change the exit code: it is answered
            if self._cancel.is_set():
                raise InferenceCancelled
            tail = " | ".join(line.strip() for line in stderr_tail if line.strip())
            raise RuntimeError(f"fine-tuning stopped with exit code {code} before its result: {tail}")

        self._run_job(request_id, finetune)

    def _cancel_request(self, request_id: str, request: dict[str, Any]) -> None:
        """Cancel the running job (it ends with ``cancelled`` when it stops) or drop a waiting one."""
        target = request["target"]
        with self._jobs_changed:
            running = target == self._job_id
            if running:
                self._stop_running_job()
            waiting = [job for job in self._jobs if job[0] == target]
            for job in waiting:
                self._jobs.remove(job)
        self.emit(request_id, "result", cancelled=running or bool(waiting))
        if waiting:
            self.emit(target, "cancelled")

    def _status(self, request_id: str, _request: dict[str, Any]) -> None:
        with self._jobs_changed:
            busy, queued = self._job_id, [job_id for job_id, _ in self._jobs]
        self.emit(request_id, "result", model=self.bundle.ref, device=self.device.type, busy=busy, queued=queued)

    # --- the job thread -------------------------------------------------------------------------------
    def _run_job(self, request_id: str, work: Job) -> None:
        """Queue ``work`` for the job thread."""
        with self._jobs_changed:
            self._jobs.append((request_id, work))
            self._jobs_changed.notify()

    def _run_jobs(self) -> None:
        """The job thread: run the queued jobs one by one until the worker closes."""
        while True:
            with self._jobs_changed:
                while not self._jobs and not self._closing:
                    self._jobs_changed.wait()
                if self._closing:
                    return
                request_id, work = self._jobs.popleft()
                self._job_id = request_id
                self._cancel.clear()
            event, fields = self._run_one(work)
            with self._jobs_changed:
                self._job_id, self._child = None, None  # free before the last event: `status` must say so
            self.emit(request_id, event, **fields)

    @staticmethod
    def _run_one(work: Job) -> Ending:
        from scdlcore.inference.predictor import InferenceCancelled

        try:
            return work()
        except InferenceCancelled:
            return "cancelled", {}
        except Exception as err:  # every failure becomes an error event; the worker lives on
            return "error", {"message": str(err) or type(err).__name__, "kind": type(err).__name__}

    def _stop_running_job(self) -> None:
        with self._jobs_changed:  # so the cancel cannot reach the job that starts next
            self._cancel.set()
            child = self._child
            if child is not None and child.poll() is None:
                child.terminate()  # SIGTERM: the fine-tune stops cleanly and keeps its checkpoint

    def _close_jobs(self) -> None:
        """Closing: drop the waiting jobs (each ends ``cancelled``), stop the running one and wait for it."""
        with self._jobs_changed:
            self._closing = True
            dropped = [job_id for job_id, _ in self._jobs]
            self._jobs.clear()
            self._jobs_changed.notify()
        self._stop_running_job()
        for job_id in dropped:
            self.emit(job_id, "cancelled")
        if self._job_thread.is_alive():
            self._job_thread.join(timeout=60)


def _check_fields(command: str, request: dict[str, Any]) -> None:
    """Raises ValueError naming the first field of ``request`` that is missing or of the wrong type
    (null stands for an optional field left out)."""
    for name, (kind, required) in _FIELDS.get(command, {}).items():
        value = request.get(name)
        if value is None:
            if required:
                raise ValueError(f"Request {command!r} lacks the field {name!r}.")
        elif (
            isinstance(value, bool)
            or not isinstance(value, kind)
            or (kind is list and not all(isinstance(v, str) for v in value))
        ):
            wanted = {str: "a string", int: "a whole number", list: "a list of strings"}[kind]
            raise ValueError(
                f"Request {command!r}: the field {name!r} must be {wanted}, got {json.dumps(value)[:100]}."
            )


def main(model: str, device: str, models_dir: str | None) -> int:
    """Entry point of ``scdl worker``; stdout carries only protocol lines (logs go to stderr)."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return Worker(model, device, models_dir, sys.stdin, sys.stdout).serve()
