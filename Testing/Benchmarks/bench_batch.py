"""Segmenting N real CTs: N separate ``scdl segment`` commands vs one ``scdl segment`` command for all of them.

Each separate command starts Python, imports torch, SimpleITK and MONAI, and loads the model before it
segments its one CT; the batch command does that once (``scdlcore.inference.batch``). Both are timed end to end as
a user runs them, wall clock from the first process start to the last exit, on the same CTs, the same
model and device, taking turns. The CTs are the real samples ``ct_abdomen`` (NIfTI), ``ct_abdomen_dicom``
(a DICOM series folder) and ``ct_chest_nrrd`` (NRRD), each ``--copies`` times under its own name. The
outputs of the two ways must be identical, voxel for voxel.

Usage (with SCDLCore importable, e.g. ``PYTHONPATH=SCDLCore``)::

    python Testing/Benchmarks/bench_batch.py --copies 2 --repeat 3 --out Testing/Benchmarks/results/batch_cpu.md
    python Testing/Benchmarks/bench_batch.py --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import median_cell, table_head, write_table

from scdlcore.io.files import files_by_case
from scdlcore.io.read import read_label
from scdlcore.sample_data import fetch_sample

SAMPLES = ("ct_abdomen", "ct_abdomen_dicom", "ct_chest_nrrd")


def main() -> None:
    args = _parse()
    with tempfile.TemporaryDirectory(prefix="scdl-bench-batch-") as tmp:
        scans = _make_scans(Path(tmp) / "scans", args.copies)
        times: dict[str, list[float]] = {"one command per CT": [], "one command for all CTs": []}
        for run in range(args.repeat):  # the two ways take turns, so a slow spell of the machine hits both
            separate, batch = Path(tmp) / f"separate{run}", Path(tmp) / f"batch{run}"
            times["one command per CT"].append(
                _time(
                    [
                        _segment(ct, separate / f"{case}.seg.nrrd", args)
                        for case, ct in files_by_case(scans, cts=True).items()
                    ]
                )
            )
            times["one command for all CTs"].append(_time([_segment(scans, batch, args)]))
        identical = _identical(separate, batch)
    table = _table(times, len(SAMPLES) * args.copies, identical, args)
    print(table)
    write_table(table, args.out)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="starter", help="installed model name or bundle path (default: starter)")
    parser.add_argument("--copies", type=int, default=2, help="copies of each of the 3 sample CTs (default: 2)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each way; the table gives the median")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    return parser.parse_args()


def _make_scans(folder: Path, copies: int) -> Path:
    """The sample CTs, ``copies`` times each, under distinct names (DICOM series as subfolders)."""
    folder.mkdir(parents=True)
    for name in SAMPLES:
        image = fetch_sample(name).image
        for copy in range(copies):
            target = folder / f"{name}_{copy}{''.join(image.suffixes) if image.is_file() else ''}"
            (shutil.copytree if image.is_dir() else shutil.copyfile)(image, target)
    return folder


def _segment(source: Path, output: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "scdlcore",
        "segment",
        str(source),
        "-o",
        str(output),
        "--model",
        args.model,
        "--device",
        args.device,
    ]


def _time(commands: list[list[str]]) -> float:
    """Wall time of running the commands one after the other, as a user would."""
    start = time.perf_counter()
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _identical(separate: Path, batch: Path) -> bool:
    outputs = sorted(path.name for path in separate.glob("*.seg.nrrd"))
    return outputs == sorted(path.name for path in batch.glob("*.seg.nrrd")) and all(
        np.array_equal(read_label(separate / name).array, read_label(batch / name).array) for name in outputs
    )


def _table(times: dict[str, list[float]], count: int, identical: bool, args: argparse.Namespace) -> str:
    baseline = statistics.median(times["one command per CT"])
    title = (
        f"`scdl segment`, {count} real CTs ({', '.join(SAMPLES)}, {args.copies} copies each), model {args.model}, "
        f"device {args.device}: one command per CT vs one command for all"
    )
    lines = table_head(title, args.device, ["way", "wall time (s){runs}", "per CT (s)", "speed-up"], args.repeat)
    for name, runs in times.items():
        median = statistics.median(runs)
        lines.append(f"| {name} | {median_cell(runs)} | {median / count:.2f} | {baseline / median:.2f}x |")
    lines += ["", f"The outputs of the two ways are {'identical, voxel for voxel' if identical else 'NOT identical'}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
