"""ChildProcess: real child Python processes writing JSON lines; cancel kills the whole tree."""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest
from scdlsegment_testing import FAKE_ENGINE, wait_until

from SCDLSegmentLib.process import ChildProcess, exit_message

PY = sys.executable


def run_to_end(child: ChildProcess, timeout: float = 15.0) -> list[dict]:
    events: list[dict] = []
    wait_until(lambda: not child.running, lambda: events.extend(child.events()), timeout)
    return events


def test_json_lines_arrive_in_order_and_exit_comes_last_exactly_once():
    script = (
        "import json, sys\n"
        "for i in range(5):\n"
        "    print(json.dumps({'event': 'progress', 'stage': 'infer', 'progress': i / 4}), flush=True)\n"
        "print('plain text line', flush=True)\n"
        "print('a warning', file=sys.stderr, flush=True)\n"
        "print(json.dumps({'event': 'result', 'output': 'x.nrrd'}), flush=True)\n"
    )
    child = ChildProcess([PY, "-c", script])
    child.start()
    events = run_to_end(child)

    progress = [event["progress"] for event in events if event["event"] == "progress"]
    assert progress == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert {"event": "log", "stream": "stdout", "message": "plain text line"} in events
    assert {"event": "log", "stream": "stderr", "message": "a warning"} in events
    assert [event["event"] for event in events].count("exit") == 1
    assert events[-1] == {"event": "exit", "returncode": 0, "cancelled": False, "stderr": "a warning"}
    assert child.events() == []  # nothing after exit


def test_a_child_that_has_exited_is_not_running_once_settled_however_slow_its_reader(monkeypatch):
    """The exit event comes from a reader thread, which lags the exit (here by 0.5 s, as on a busy machine):
    settle() waits for it, so a caller deciding whether to reuse the child is never told a dead one runs."""
    read_stdout = ChildProcess._read_stdout

    def slow_reader(self, stream):
        time.sleep(0.5)
        read_stdout(self, stream)

    monkeypatch.setattr(ChildProcess, "_read_stdout", slow_reader)
    child = ChildProcess([PY, "-c", "pass"])
    child.start()
    assert child.wait(10) == 0

    child.settle()

    assert [event["event"] for event in child.events()] == ["exit"]
    assert not child.running


def test_a_json_exit_event_from_the_child_does_not_end_polling():
    child = ChildProcess([PY, "-c", "import json; print(json.dumps({'event': 'exit'}))"])
    child.start()
    events = run_to_end(child)
    assert events[0] == {"event": "exit"}  # the child's own object passes through...
    assert events[-1]["returncode"] == 0  # ...and the runner's exit event still ends the run


def test_document_mode_parses_pretty_printed_json_at_exit():
    script = "import json; print(json.dumps([{'name': 'starter', 'version': 1}], indent=2))"
    child = ChildProcess([PY, "-c", script], output="document")
    child.start()
    events = run_to_end(child)
    assert events[-2] == {"event": "result", "data": [{"name": "starter", "version": 1}]}
    assert events[-1]["event"] == "exit"


def test_document_mode_reports_output_that_is_not_json():
    child = ChildProcess([PY, "-c", "print('Traceback: oops')"], output="document")
    child.start()
    events = run_to_end(child)
    assert events[-2]["event"] == "error"
    assert "not JSON" in events[-2]["message"] and "Traceback: oops" in events[-2]["message"]


def test_interactive_child_answers_each_request_line():
    script = (
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    request = json.loads(line)\n"
        "    print(json.dumps({'id': request['id'], 'event': 'result', 'echo': request['text']}), flush=True)\n"
    )
    child = ChildProcess([PY, "-c", script], interactive=True)
    child.start()
    child.send({"id": "r1", "text": "héllo"})
    child.send({"id": "r2", "text": "second"})
    received: list[dict] = []
    wait_until(lambda: len(received) == 2, lambda: received.extend(child.events()))
    assert received == [
        {"id": "r1", "event": "result", "echo": "héllo"},
        {"id": "r2", "event": "result", "echo": "second"},
    ]
    child.cancel()
    run_to_end(child)


def test_send_to_a_non_interactive_child_is_refused():
    child = ChildProcess([PY, "-c", "pass"])
    child.start()
    with pytest.raises(RuntimeError, match="not started as an interactive"):
        child.send({"id": "r1"})
    run_to_end(child)


def test_crash_is_reported_with_the_stderr_tail():
    script = "import sys\nprint('loading model', file=sys.stderr)\nraise RuntimeError('CUDA out of memory')\n"
    child = ChildProcess([PY, "-c", script])
    child.start()
    exit_event = run_to_end(child)[-1]

    assert exit_event["returncode"] == 1 and not exit_event["cancelled"]
    assert "loading model" in exit_event["stderr"] and "RuntimeError: CUDA out of memory" in exit_event["stderr"]
    message = exit_message(exit_event)
    assert message is not None
    assert "exit code 1" in message
    assert "RuntimeError: CUDA out of memory" in message  # the last line, not the whole traceback
    assert "Traceback" not in message


def test_exit_message_is_none_for_success_and_for_cancel():
    assert exit_message({"event": "exit", "returncode": 0, "cancelled": False, "stderr": "x"}) is None
    assert exit_message({"event": "exit", "returncode": -9, "cancelled": True, "stderr": "x"}) is None


def test_stderr_tail_keeps_only_the_last_lines():
    script = "import sys\nfor i in range(100): print(f'line {i}', file=sys.stderr)\n"
    child = ChildProcess([PY, "-c", script], stderr_lines=3)
    child.start()
    assert run_to_end(child)[-1]["stderr"] == "line 97\nline 98\nline 99"


@pytest.mark.slow
def test_cancel_kills_the_child_and_its_grandchild():
    child = ChildProcess([PY, str(FAKE_ENGINE), "spawn-tree"])
    child.start()
    tree: list[dict] = []
    wait_until(lambda: any(event["event"] == "tree" for event in tree), lambda: tree.extend(child.events()))
    pids = next(event for event in tree if event["event"] == "tree")
    grandchild = psutil.Process(pids["grandchild"])
    assert grandchild.is_running()

    child.cancel()
    exit_event = run_to_end(child)[-1]

    assert exit_event["cancelled"] is True and exit_event["returncode"] != 0
    assert not psutil.pid_exists(pids["child"])
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE


def test_cancel_works_before_psutil_is_installed(monkeypatch):
    """Slicer does not ship psutil: closing the panel before the dependencies are installed must still clean up."""
    child = ChildProcess([PY, str(FAKE_ENGINE), "spawn-tree"])
    child.start()
    tree: list[dict] = []
    wait_until(lambda: any(event["event"] == "tree" for event in tree), lambda: tree.extend(child.events()))
    grandchild = psutil.Process(next(event for event in tree if event["event"] == "tree")["grandchild"])
    with monkeypatch.context() as without_psutil:
        without_psutil.setitem(sys.modules, "psutil", None)  # "import psutil" raises ImportError
        child.cancel()
        exit_event = run_to_end(child)[-1]

    assert exit_event["cancelled"] is True
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE


@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX-only")
def test_cancel_also_kills_a_grandchild_whose_parent_already_exited():
    script = (
        "import json, subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(json.dumps({'event': 'orphan', 'pid': p.pid}), flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    child = ChildProcess([PY, "-c", script])
    child.start()
    seen: list[dict] = []
    wait_until(lambda: any(event["event"] == "orphan" for event in seen), lambda: seen.extend(child.events()))
    orphan = psutil.Process(next(event["pid"] for event in seen if event["event"] == "orphan"))
    psutil.Process(child.pid).kill()  # the middle process dies first: the grandchild is re-parented
    time.sleep(0.2)

    child.cancel()
    run_to_end(child)
    orphan_gone = not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
    assert orphan_gone


def test_a_missing_program_is_named_in_the_error():
    with pytest.raises(FileNotFoundError, match="no-such-python"):
        ChildProcess(["/nonexistent/no-such-python", "-c", "pass"]).start()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="empty argument list"):
        ChildProcess([])
    with pytest.raises(ValueError, match="output must be one of"):
        ChildProcess([PY], output="xml")
