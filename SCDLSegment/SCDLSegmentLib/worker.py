"""Client of ``scdl worker``: one long-lived engine process that keeps the model loaded.

Protocol version 1, one JSON object per line. Requests (stdin) carry an ``id`` and a ``command``
(``segment``, ``add_case``, ``status``, ``cancel``, ``shutdown``); events (stdout) carry the ``id``
of the request they answer (``progress``, then one of ``result``, ``error``, ``cancelled``), or
``"id": null`` for the worker's own events (``ready`` once the model is loaded, ``log``).
See the README section "Worker protocol (version 1)" for every field.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .process import ChildProcess, exit_message

__all__ = ["PROTOCOL_VERSION", "TERMINAL_EVENTS", "WorkerClient", "WorkerInfo"]

PROTOCOL_VERSION = 1
#: Events after which a request is finished.
TERMINAL_EVENTS = frozenset({"result", "error", "cancelled"})

EventHandler = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class WorkerInfo:
    """What the worker reported when it became ready.

    Attributes:
        model: the loaded model (``name@version``).
        device: ``"cuda"`` or ``"cpu"``, where it actually runs.
        torch: torch version in the worker's Python.
        cuda: whether torch sees a CUDA GPU (even if the CPU was chosen).
        gpu: GPU name, or None.
        gpu_memory_gb: GPU memory in GB, or None.
    """

    model: str
    device: str
    torch: str
    cuda: bool
    gpu: str | None
    gpu_memory_gb: float | None

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> WorkerInfo:
        memory = event.get("gpu_memory_gb")
        return cls(
            model=str(event.get("model", "")),
            device=str(event.get("device", "")),
            torch=str(event.get("torch", "")),
            cuda=bool(event.get("cuda", False)),
            gpu=event.get("gpu") or None,
            gpu_memory_gb=None if memory is None else float(memory),
        )

    def describe(self) -> str:
        """One line for the panel, e.g. ``"GPU: NVIDIA H100 (79.6 GB) · torch 2.13"``."""
        if self.device == "cuda":
            memory = f" ({self.gpu_memory_gb:.1f} GB)" if self.gpu_memory_gb is not None else ""
            where = f"GPU: {self.gpu or 'CUDA device'}{memory}"
        elif self.cuda:
            where = f"CPU (GPU {self.gpu or 'present'} not used)"
        else:
            where = "CPU (no CUDA GPU found)"
        return f"{where} · torch {self.torch}" if self.torch else where


class WorkerClient:
    """Drives one ``scdl worker`` process; all calls come from one thread (the GUI thread).

    Args:
        args: the worker's command line (see :meth:`SCDLSegmentLib.engine.EngineCommand.worker`).
        env: the worker's environment.
        on_status: called with the worker's id-less events: ``ready`` (after :attr:`info` is set),
            ``log``, ``error``, and ``{"event": "stopped", "message":
            str | None}`` once the process is gone (``message`` says why when it could not start,
            crashed or spoke another protocol version).
        cancel_grace_s: how long a cancelled request may take to answer ``cancelled`` before the
            whole worker process tree is killed.
        clock: monotonic time source (tests pass a fake one).

    Each :meth:`request` gets its own handler, called with that request's events; a request always
    ends with exactly one ``result``, ``error`` or ``cancelled`` event, also when the worker dies
    (the client then makes one up).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        on_status: EventHandler | None = None,
        cancel_grace_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.args = list(args)
        self.info: WorkerInfo | None = None
        self._process = ChildProcess(self.args, env=env, interactive=True)
        self._on_status = on_status or (lambda event: None)
        self._cancel_grace_s = cancel_grace_s
        self._clock = clock
        self._ids = (f"r{number}" for number in itertools.count(1))
        self._handlers: dict[str, EventHandler] = {}
        self._kill_at: float | None = None  # when to kill the tree (a cancel or shutdown went unanswered)
        self._cancelling: set[str] = set()
        self._stop_reason: str | None = None

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the ``stopped`` status was delivered."""
        return self._process.running

    @property
    def pending(self) -> list[str]:
        """Ids of the requests still waiting for their last event."""
        return list(self._handlers)

    def start(self) -> None:
        self._process.start()

    def request(self, command: str, on_event: EventHandler, **fields: Any) -> str:
        """Send a request; returns its id. ``on_event`` receives its events, the terminal one last.

        Raises:
            RuntimeError: the worker is not running.
        """
        if not self.running:
            raise RuntimeError("The SCDL worker is not running; start it first.")
        request_id = next(self._ids)
        self._handlers[request_id] = on_event
        self._send({"protocol": PROTOCOL_VERSION, "id": request_id, "command": command, **fields})
        return request_id

    def cancel(self, request_id: str) -> None:
        """Ask the worker to cancel a request; kill the worker if it does not answer in time."""
        if request_id not in self._handlers or request_id in self._cancelling:
            return
        self._cancelling.add(request_id)
        self._send({"protocol": PROTOCOL_VERSION, "id": next(self._ids), "command": "cancel", "target": request_id})
        self._schedule_kill()

    def shutdown(self) -> None:
        """Ask the worker to exit; it is killed if it is still there after the grace time."""
        if self.running:
            self._send({"protocol": PROTOCOL_VERSION, "id": next(self._ids), "command": "shutdown"})
            self._schedule_kill()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the worker now (blocking up to ``timeout`` seconds), e.g. when Slicer closes."""
        if not self._process.started:
            return
        self.shutdown()
        if self._process.wait(timeout) is None:
            self._process.cancel()
        self._process.wait(timeout)

    def poll(self) -> None:
        """Deliver the events that arrived (the exit of a worker that has died included: its requests fail
        and :attr:`running` turns False); kill the worker if a cancel or shutdown went unanswered."""
        self._process.settle()
        for event in self._process.events():
            self._dispatch(event)
        if self._kill_at is not None and self._process.running and self._clock() >= self._kill_at:
            self._kill_at = None
            self._stop_reason = "The SCDL worker did not stop in time and was ended."
            self._process.cancel()

    def _send(self, message: Mapping[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the worker has exited: its exit event fails the pending requests
            self._process.send(message)

    def _schedule_kill(self) -> None:
        if self._kill_at is None:
            self._kill_at = self._clock() + self._cancel_grace_s

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        request_id = event.get("id")
        if kind == "exit":
            self._finish_all(event)
        elif self._stop_reason is not None:
            return  # the worker is being ended: its remaining output is not trusted
        elif request_id is None:
            self._status(event)
        elif request_id in self._handlers:
            handler = self._handlers[request_id]
            if kind in TERMINAL_EVENTS:
                del self._handlers[request_id]
                self._cancelling.discard(request_id)
                if not self._cancelling:
                    self._kill_at = None
            handler(event)
        # events of requests already finished (e.g. the answer to a cancel request) are dropped

    def _status(self, event: dict[str, Any]) -> None:
        if event.get("event") == "error" and event.get("fatal"):  # the worker could not start; it exits next
            self._stop_reason = str(event.get("message") or "The SCDL worker could not start.")
            return  # reported once, as the reason in "stopped"
        if event.get("event") == "ready":
            version = event.get("protocol")
            if version != PROTOCOL_VERSION:
                self._stop_reason = (
                    f"The SCDL engine speaks protocol version {version}, this panel needs version "
                    f"{PROTOCOL_VERSION}. Install matching versions of the extension and the scdlcore package."
                )
                self._process.cancel()
                return
            self.info = WorkerInfo.from_event(event)
        self._on_status(event)

    def _finish_all(self, exit_event: dict[str, Any]) -> None:
        reason = self._stop_reason or exit_message(exit_event, "The SCDL worker")
        for request_id, handler in list(self._handlers.items()):
            if request_id in self._cancelling:
                handler({"id": request_id, "event": "cancelled"})
            else:
                handler({"id": request_id, "event": "error", "message": reason or "The SCDL worker stopped."})
        self._handlers.clear()
        self._cancelling.clear()
        self._on_status({"event": "stopped", "message": reason})
