"""One-shot engine commands and fine-tuning runs: child processes turned into outcomes.

Each job owns one :class:`~SCDLSegmentLib.process.ChildProcess`; :meth:`poll` (called from the
panel's QTimer) forwards log lines and ends with exactly one ``on_done`` call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .process import ChildProcess, exit_message

__all__ = ["CommandJob", "FinetuneJob", "FinetuneOutcome"]

LogHandler = Callable[[str], None]


class _ChildJob(ABC):
    """What every job shares: its child process, started once, polled from the panel's timer.

    Subclasses keep the ``result`` event (:meth:`_keep_result`) and turn the ``exit`` event into their
    one ``on_done`` call (:meth:`_finish`); other events go to :meth:`_other`.
    """

    process: ChildProcess
    _on_log: LogHandler
    _error: str | None = None  # the child's ``error`` event, for people

    @property
    def running(self) -> bool:
        return self.process.running

    def start(self) -> _ChildJob:
        self.process.start()
        return self

    def poll(self) -> None:
        for event in self.process.events():
            kind = event.get("event")
            if kind == "log":
                self._on_log(str(event.get("message", "")))
            elif kind == "result":
                self._keep_result(event)
            elif kind == "error":
                self._error = str(event.get("message"))
            elif kind == "exit":
                self._finish(event)
            else:
                self._other(event)

    @abstractmethod
    def _keep_result(self, event: dict[str, Any]) -> None:
        """Keep the child's ``result`` event for :meth:`_finish`."""

    @abstractmethod
    def _finish(self, exit_event: dict[str, Any]) -> None:
        """Make the job's one ``on_done`` call from what it kept and the child's ``exit`` event."""

    def _other(self, event: dict[str, Any]) -> None:
        """Events besides log, result, error and exit: ignored unless a job wants them."""


class CommandJob(_ChildJob):
    """An engine command that prints one JSON document (``--json`` listings); ``on_done(data, error)``.

    Args:
        args: the command line.
        env: the child's environment.
        on_done: called once with the parsed document and None, or None and a message for people.
        on_log: receives the lines the command printed besides its JSON (its stderr, mostly).
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        on_done: Callable[[Any, str | None], None],
        on_log: LogHandler,
    ) -> None:
        self.process = ChildProcess(args, env=env, output="document")
        self._on_done, self._on_log = on_done, on_log
        self._data: Any = None

    def _keep_result(self, event: dict[str, Any]) -> None:
        self._data = event.get("data")

    def _finish(self, exit_event: dict[str, Any]) -> None:
        self._on_done(self._data, self._error or exit_message(exit_event))


@dataclass
class FinetuneOutcome:
    """How fine-tuning ended.

    Attributes:
        model: the new model version (``name@version``), or None.
        before: Dice per organ of the starting model on the reviewed cases.
        after: Dice per organ of the new model.
        better: the engine's verdict: the new version beat its parent on the validation cases.
        verdict: the verdict in one sentence.
        error: a message for people when it failed.
        cancelled: the run was cancelled; nothing was registered.
    """

    model: str | None = None
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    better: bool = False
    verdict: str = ""
    error: str | None = None
    cancelled: bool = False


class FinetuneJob(_ChildJob):
    """A ``scdl finetune --events`` run.

    Args:
        args: the command line.
        env: the child's environment.
        on_event: receives ``progress`` and ``validation`` events as they come.
        on_done: called once with the outcome.
        on_log: receives the lines the run printed besides its events.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        on_event: Callable[[dict], None],
        on_done: Callable[[FinetuneOutcome], None],
        on_log: LogHandler,
    ) -> None:
        self.process = ChildProcess(args, env=env)
        self._on_event, self._on_done, self._on_log = on_event, on_done, on_log
        self._result: dict[str, Any] = {}

    def cancel(self) -> None:
        """Kill the training process tree."""
        self.process.cancel()

    def _keep_result(self, event: dict[str, Any]) -> None:
        self._result = event

    def _finish(self, exit_event: dict[str, Any]) -> None:
        self._on_done(self._outcome(exit_event))

    def _other(self, event: dict[str, Any]) -> None:
        self._on_event(event)

    def _outcome(self, exit_event: Mapping[str, Any]) -> FinetuneOutcome:
        if exit_event.get("cancelled"):
            return FinetuneOutcome(cancelled=True)
        error = self._error or exit_message(exit_event, "Fine-tuning")
        if error is None and not self._result.get("model"):
            error = "Fine-tuning ended without reporting a new model."
        if error is not None:
            return FinetuneOutcome(error=error)
        result = self._result
        verdict = result.get("verdict") or {}
        return FinetuneOutcome(
            str(result["model"]),
            dict(result.get("before") or {}),
            dict(result.get("after") or {}),
            bool(verdict.get("better")),
            str(verdict.get("summary") or ""),
        )
