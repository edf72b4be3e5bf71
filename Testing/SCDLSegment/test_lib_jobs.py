"""CommandJob and FinetuneJob: one-shot listings and fine-tuning runs as real child processes."""

from __future__ import annotations

import json
import os
import sys

from scdlsegment_testing import wait_until

from SCDLSegmentLib.jobs import CommandJob, FinetuneJob, FinetuneOutcome

PY = sys.executable


def run(job) -> None:
    job.start()
    wait_until(lambda: not job.running, job.poll)


def test_command_job_returns_the_document_and_logs_stderr():
    script = (
        "import json, sys\nprint('reading registry', file=sys.stderr)\nprint(json.dumps({'models': []}, indent=1))\n"
    )
    done, logs = [], []
    run(CommandJob([PY, "-c", script], dict(os.environ), lambda data, error: done.append((data, error)), logs.append))
    assert done == [({"models": []}, None)]
    assert logs == ["reading registry"]


def test_command_job_failure_is_one_readable_message():
    script = "import sys\nprint('scdl models: error: registry.json is damaged', file=sys.stderr)\nsys.exit(2)\n"
    done = []
    run(
        CommandJob([PY, "-c", script], dict(os.environ), lambda data, error: done.append((data, error)), lambda _: None)
    )
    ((data, error),) = done
    assert data is None
    assert error.startswith("The SCDL engine stopped unexpectedly (exit code 2).")
    assert "registry.json is damaged" in error


def finetune_script(*events, code: int = 0) -> list[str]:
    lines = "".join(f"print({json.dumps(json.dumps(event))}, flush=True)\n" for event in events)
    return [PY, "-c", f"{lines}import sys\nsys.exit({code})\n"]


def test_finetune_job_forwards_events_and_reports_the_new_model():
    events, done = [], []
    args = finetune_script(
        {"event": "progress", "stage": "train", "step": 1, "total": 2},
        {"event": "validation", "step": 2, "dice": {"liver": 0.9}, "mean_dice": 0.9},
        {"event": "result", "model": "abdomen@4", "before": {"liver": 0.8}, "after": {"liver": 0.9}},
    )
    run(FinetuneJob(args, dict(os.environ), events.append, done.append, lambda _: None))
    assert [event["event"] for event in events] == ["progress", "validation"]
    assert done == [FinetuneOutcome("abdomen@4", {"liver": 0.8}, {"liver": 0.9})]


def test_finetune_job_errors():
    done = []
    run(
        FinetuneJob(
            finetune_script({"event": "error", "message": "No reviewed case."}, code=2),
            dict(os.environ),
            lambda _: None,
            done.append,
            lambda _: None,
        )
    )
    run(FinetuneJob(finetune_script(), dict(os.environ), lambda _: None, done.append, lambda _: None))
    assert done == [
        FinetuneOutcome(error="No reviewed case."),
        FinetuneOutcome(error="Fine-tuning ended without reporting a new model."),
    ]


def test_finetune_job_cancel():
    done = []
    job = FinetuneJob(
        [PY, "-c", "import time; time.sleep(60)"], dict(os.environ), lambda _: None, done.append, lambda _: None
    ).start()
    job.cancel()
    wait_until(lambda: bool(done), job.poll)
    assert done == [FinetuneOutcome(cancelled=True)]
