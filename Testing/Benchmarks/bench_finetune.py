"""How long the annotation loop's fine-tune takes end to end: ``scdl finetune`` with its defaults, as a person runs it.

The store is what a clinician has after one correction: one partially reviewed CT (``ct_abdomen``, liver, spleen
and stomach reviewed) and one unlabeled CT (``ct_chest_nrrd``). Each run is a fresh ``scdl finetune`` process
(imports, preprocessing into an empty cache, the parent's validation, training, the last validation, registering
the new version) on a fresh copy of the store, with a temporary model registry; the wall time is the process's.
``--steps`` measures another step count than the default (e.g. 300, the default before the CPU default existed).

It measures time only. With one reviewed case there is no case to hold out, so the run's own validation is
on its training case and says nothing about other patients; what a fine-tune buys there is ``bench_loop.py``'s
question.

Usage::

    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_finetune.py --device cpu --repeat 3 \
        --out Testing/Benchmarks/results/finetune_cpu.md
    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_finetune.py --device cpu --repeat 3 --steps 300 \
        --add-to Testing/Benchmarks/results/finetune_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import machine_line, median_cell

from scdlcore.dataset.store import DatasetStore
from scdlcore.sample_data import fetch_sample

REVIEWED_ORGANS = ("liver", "spleen", "stomach")
COLUMNS = "| steps | wall time (s), median (range) | per run (s) | command |"


def build_store(folder: Path, cache: Path | None) -> Path:
    """One partially reviewed CT and one unlabeled CT in a new dataset store at ``folder``."""
    reviewed, unlabeled = fetch_sample("ct_abdomen", cache), fetch_sample("ct_chest_nrrd", cache)
    store = DatasetStore.init(folder)
    store.add(reviewed.image, reviewed.label, case_id="reviewed", reviewed=list(REVIEWED_ORGANS))
    store.add(unlabeled.image, case_id="unlabeled")
    return folder


def run_once(store: Path, args: argparse.Namespace, work: Path) -> tuple[float, int]:
    """One ``scdl finetune`` process on a fresh copy of ``store``: its wall time and the steps it trained."""
    copy = work / "store"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(store, copy)
    registry = work / "models"
    shutil.rmtree(registry, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "scdlcore",
        "finetune",
        "--dataset",
        str(copy),
        "--device",
        args.device,
        "--models-dir",
        str(registry),
        "--events",
    ]
    if args.steps:
        command += ["--steps", str(args.steps)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"scdl finetune failed ({done.returncode}):\n{done.stderr[-3000:]}")
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return seconds, next(event["step"] for event in reversed(events) if event["event"] == "trained")


def row(seconds: list[float], steps: int, args: argparse.Namespace) -> str:
    command = (
        "`scdl finetune --dataset STORE --device " + args.device + (f" --steps {args.steps}`" if args.steps else "`")
    )
    per_run = ", ".join(f"{s:.0f}" for s in seconds)
    return f"| {steps} | {median_cell(seconds, 0)} | {per_run} | {command} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    parser.add_argument("--repeat", type=int, default=3, help="runs, the median is reported (default 3)")
    parser.add_argument("--steps", type=int, help="steps instead of the default of --device")
    parser.add_argument("--cache", type=Path, help="sample cache folder (default: scdl's user cache)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--out", type=Path, help="write the table here")
    output.add_argument("--add-to", type=Path, metavar="TABLE", help="append this run's row to an earlier table")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(tmp)
        store = build_store(work / "template", args.cache)
        seconds = []
        for index in range(args.repeat):
            elapsed, steps = run_once(store, args, work)
            seconds.append(elapsed)
            print(f"run {index + 1}/{args.repeat}: {elapsed:.1f} s, {steps} steps", flush=True)
    line = row(seconds, steps, args)
    if args.add_to:
        args.add_to.write_text(args.add_to.read_text().rstrip("\n") + "\n" + line + "\n")
        print(line)
        return
    table = "\n".join(
        [
            "# `scdl finetune` end to end: one partially reviewed CT + one unlabeled CT, the starter model",
            "",
            machine_line(args.device),
            "",
            COLUMNS,
            "|---|---|---|---|",
            line,
        ]
    )
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
