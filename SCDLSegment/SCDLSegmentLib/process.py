"""Child processes that report in JSON, read on background threads and polled from the GUI thread.

The engine never runs inside Slicer's process: inference (``scdl worker``), fine-tuning
(``scdl finetune --events``) and listings (``scdl models list --json``...) are child processes.
:class:`ChildProcess` starts one, reads its stdout and stderr on daemon threads into a queue, and
hands the parsed events to whoever calls :meth:`ChildProcess.events` (the panel does it from a
QTimer, so the GUI never waits). Cancel kills the whole process tree: the child is started in its
own process group/session, and every descendant is killed, not only the launcher (PythonSlicer is
itself a launcher that starts the real Python).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

__all__ = ["ChildProcess", "exit_message"]

_OUTPUT_MODES = ("lines", "document")


class ChildProcess:
    """A child process whose stdout carries JSON.

    Args:
        args: the command line (no shell is involved).
        env: the child's whole environment; None inherits this process's.
        cwd: working folder of the child; None = this process's.
        interactive: keep a pipe to the child's stdin for :meth:`send` (``scdl worker``).
        output: ``"lines"``: one JSON object per stdout line (``scdl worker``, ``scdl finetune --events``);
            ``"document"``: stdout is one JSON document, parsed when the child exits (``--json`` listings).
        stderr_lines: how many of the last stderr lines to keep for error reports.

    Events are dicts. The child's own JSON objects pass through unchanged; the runner adds:

    - ``{"event": "log", "stream": "stdout" | "stderr", "message": str}`` for each text line that is
      not a JSON object (stderr lines always), so the panel's log view shows them;
    - ``{"event": "result", "data": value}`` in document mode, when the child exited with code 0;
    - ``{"event": "exit", "returncode": int, "cancelled": bool, "stderr": str}`` last, exactly once.

    Example::

        child = ChildProcess([python, "-m", "scdlcore", "models", "list", "--json"], output="document")
        child.start()
        while child.running:          # in the panel: one QTimer tick per loop
            for event in child.events():
                ...
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        interactive: bool = False,
        output: str = "lines",
        stderr_lines: int = 40,
    ) -> None:
        if not args:
            raise ValueError("ChildProcess needs a command line; got an empty argument list.")
        if output not in _OUTPUT_MODES:
            raise ValueError(f"output must be one of {_OUTPUT_MODES}, got {output!r}.")
        self.args = [str(arg) for arg in args]
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._interactive = interactive
        self._output = output
        self._queue: queue.SimpleQueue[tuple[bool, dict[str, Any]]] = queue.SimpleQueue()  # (is the exit event, event)
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._process: subprocess.Popen | None = None
        self._stderr_thread: threading.Thread | None = None
        self._stdout_thread: threading.Thread | None = None
        self._cancelled = False
        self._exit_delivered = False

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def running(self) -> bool:
        """True from :meth:`start` until :meth:`events` has returned the ``exit`` event."""
        return self._process is not None and not self._exit_delivered

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the child and its reader threads.

        Raises:
            RuntimeError: already started.
            FileNotFoundError: the program does not exist (the message names it).
        """
        if self._process is not None:
            raise RuntimeError(f"{self.args[0]} was already started.")
        try:
            self._process = subprocess.Popen(
                self.args,
                stdin=subprocess.PIPE if self._interactive else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                cwd=self._cwd,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                **_own_process_group(),
            )
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Cannot start {self.args[0]!r}: the program was not found ({err}).") from err
        self._stderr_thread = threading.Thread(
            target=self._read_stderr, args=(self._process.stderr,), name="child-stderr", daemon=True
        )
        self._stderr_thread.start()
        self._stdout_thread = threading.Thread(
            target=self._read_stdout, args=(self._process.stdout,), name="child-stdout", daemon=True
        )
        self._stdout_thread.start()

    def send(self, message: Mapping[str, Any]) -> None:
        """Write one JSON object as one line to the child's stdin.

        Raises:
            RuntimeError: not started with ``interactive=True``.
            OSError: the child has closed its stdin (it exited); its ``exit`` event follows.
        """
        if self._process is None or self._process.stdin is None:
            raise RuntimeError(f"{self.args[0]} was not started as an interactive child process.")
        self._process.stdin.write(json.dumps(message) + "\n")
        self._process.stdin.flush()

    def settle(self, timeout: float = 2.0) -> None:
        """If the child has exited, wait up to ``timeout`` seconds for its reader threads to queue the ``exit``
        event: they lag the exit a moment (more on a busy machine), and whoever asks :attr:`running` to decide
        whether to reuse the child must not be told an exited child still runs."""
        if self._process is not None and self._process.poll() is not None and self._stdout_thread is not None:
            self._stdout_thread.join(timeout)

    def events(self) -> list[dict[str, Any]]:
        """Every event that arrived since the last call; never blocks."""
        drained = []
        while True:
            try:
                is_exit, event = self._queue.get_nowait()
            except queue.Empty:
                return drained
            drained.append(event)
            self._exit_delivered = self._exit_delivered or is_exit

    def cancel(self) -> None:
        """Kill the child and all its descendants; the ``exit`` event then says ``cancelled``."""
        if self._process is None:
            return
        self._cancelled = True
        # Once the child is reaped its pid may be reused: then only its process group is killed.
        _kill_tree(self._process.pid, include_root=self._process.poll() is None)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the child to exit; its return code, or None on timeout."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_tail(self) -> str:
        """The last lines the child wrote to stderr."""
        return "\n".join(self._stderr)

    def _read_stderr(self, stream: IO[str]) -> None:
        for raw in stream:
            line = raw.rstrip()
            if line:
                self._stderr.append(line)
                self._queue.put((False, {"event": "log", "stream": "stderr", "message": line}))

    def _read_stdout(self, stream: IO[str]) -> None:
        text = ""
        if self._output == "lines":
            for raw in stream:
                self._put_line(raw.strip())
        else:
            text = stream.read()
        returncode = self._process.wait()  # type: ignore[union-attr]  # set before this thread starts
        self._stderr_thread.join()  # type: ignore[union-attr]  # so the exit event comes after every log line
        if self._output == "document" and returncode == 0 and not self._cancelled:
            self._queue.put((False, self._document_event(text)))
        exit_event = {
            "event": "exit",
            "returncode": returncode,
            "cancelled": self._cancelled,
            "stderr": self.stderr_tail(),
        }
        self._queue.put((True, exit_event))

    def _put_line(self, line: str) -> None:
        if not line:
            return
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            event = {"event": "log", "stream": "stdout", "message": line}
        self._queue.put((False, event))

    def _document_event(self, text: str) -> dict[str, Any]:
        try:
            return {"event": "result", "data": json.loads(text)}
        except json.JSONDecodeError as err:
            return {
                "event": "error",
                "message": f"{self.args[0]} printed output that is not JSON ({err}): {text[:200]!r}",
            }


def exit_message(event: Mapping[str, Any], program: str = "The SCDL engine") -> str | None:
    """A one-paragraph message for people when a child process failed; None if it succeeded or was cancelled.

    The message quotes the child's last stderr line (usually the error itself); the full tail went
    to the log as ``log`` events, so no traceback ever lands in a dialog.
    """
    if event.get("cancelled") or event.get("returncode") == 0:
        return None
    lines = [line for line in str(event.get("stderr", "")).splitlines() if line.strip()]
    reason = f" Its last message: {lines[-1].strip()}" if lines else ""
    return f"{program} stopped unexpectedly (exit code {event.get('returncode')}).{reason} See the log for details."


def _own_process_group() -> dict[str, Any]:
    """Popen options that give the child its own process group (POSIX: its own session)."""
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}


def _kill_tree(pid: int, include_root: bool, timeout: float = 5.0) -> None:
    """Kill a child started by :class:`ChildProcess` and every process it started.

    On POSIX, killing the child's process group reaches every descendant, also those whose parent
    already died. psutil (a requirement of the engine, which Slicer does not ship: absent until the
    dependencies are installed) also finds descendants that left the group; on Windows without it,
    ``taskkill /T`` ends the tree. The child itself is not waited for here: its reader thread reaps it.
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    root, descendants = None, []
    if include_root and psutil is not None:
        try:
            root = psutil.Process(pid)
            descendants = root.children(recursive=True)
        except psutil.NoSuchProcess:
            root, descendants = None, []
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # pid is the group id: the child leads its own session
    elif psutil is None and include_root:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
    if psutil is None:
        return
    for proc in (*descendants, *([root] if root is not None else [])):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(descendants, timeout=timeout)
