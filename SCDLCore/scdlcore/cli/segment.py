"""``scdl segment``: segment the abdominal organs of one CT or many, write label maps or Slicer segmentations."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

from scdlcore.cli.options import add_device_option, add_events_option, add_models_dir_option

if TYPE_CHECKING:
    from scdlcore.events import Progress
    from scdlcore.inference.batch import BatchCase, CaseResult
    from scdlcore.inference.predictor import Predictor
    from scdlcore.labels import LabelTable

__all__ = ["register", "run"]

_VOLUMES_CSV = "volumes.csv"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment the organs of CTs (files or DICOM folders)",
        description=textwrap.fill(
            "Segment CTs with a model bundle. Each output lies exactly on its input's voxel grid; it is "
            "a 3D Slicer segmentation (.seg.nrrd: organ names, colors, terminology) or a plain label map "
            "(.nii.gz, .nii, .nrrd, .mha) holding the label table's values. One CT: -o names the output file and "
            "each organ's volume (mL) is printed. Several CTs, or -o an existing folder: the model is loaded once, "
            "each CT is written into the folder as NAME.seg.nrrd (see --format), a CT that fails is reported and the "
            f"others go on, FOLDER/{_VOLUMES_CSV} lists every case's organ volumes, "
            "and the exit code is 1 if any CT failed.",
            79,
        ),
        epilog="examples:\n  scdl segment ct.nii.gz -o ct.seg.nrrd --overview\n"
        "  scdl segment scans/ -o results/ --skip-existing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="input",
        help="CT image (.nrrd, .nii, .nii.gz, .mha) or a folder holding one DICOM series; several for a "
        "batch; a folder of CT files or DICOM-series subfolders stands for all of them",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="output .seg.nrrd or label map .nii.gz/.nii/.nrrd/.mha; a folder for several CTs",
    )
    parser.add_argument(
        "--format",
        metavar="SUFFIX",
        help="file type written into an output folder: seg.nrrd (default), nii.gz, nii, nrrd or mha",
    )
    parser.add_argument(
        "--model",
        default="starter",
        help="installed model NAME or NAME@VERSION, or a bundle folder/.scdlmodel path (default: starter)",
    )
    add_device_option(parser)
    parser.add_argument(
        "--organs",
        nargs="+",
        metavar="ORGAN",
        help="keep only these organs (machine names, e.g. liver spleen); default: all",
    )
    parser.add_argument(
        "--overlap",
        type=float,
        default=0.5,
        help="sliding-window overlap in [0, 1): more is smoother and slower (default: 0.5)",
    )
    parser.add_argument(
        "--overview",
        nargs="?",
        const="",
        metavar="PNG",
        help="also write an axial/coronal/sagittal montage: to PNG, or without a name next to each "
        "output as NAME_overview.png",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="keep outputs that exist (from an interrupted run) and read their volumes back",
    )
    add_events_option(parser)
    add_models_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scdlcore.bundle.registry import ModelRegistry
    from scdlcore.device import resolve_device
    from scdlcore.events import Progress
    from scdlcore.inference.batch import segment_cases
    from scdlcore.inference.predictor import Predictor, check_organs

    start = time.monotonic()
    events = Progress(total=0, stage="segment", json_lines=True) if args.events else None
    args.inputs, expanded = _expand_folders(args.inputs)
    folder = _output_folder(args, batch=expanded)
    cases = _plan(args, folder)
    device = resolve_device(args.device)
    bundle = ModelRegistry(args.models_dir).resolve(args.model)
    organs = check_organs(bundle.labels, args.organs)
    predictor = Predictor(bundle, device, overlap=args.overlap)
    summary = {"model": bundle.ref, "device": str(device)}
    if folder is not None:
        return _run_batch(args, predictor, cases, folder, organs, events, summary, start)
    (result,) = segment_cases(
        predictor,
        cases,
        organs=args.organs,
        skip_existing=args.skip_existing,
        progress=lambda _index, _case: Progress(100, "segment", json_lines=args.events),
    )
    if result.error is not None:
        raise result.error  # scdl's main reports it (with --events also as an error event)
    _report_single(result, organs, bundle.labels, events, {**summary, "seconds": time.monotonic() - start})
    return 0


def _expand_folders(inputs: list[str]) -> tuple[list[str], bool]:
    """Each input folder that is not a DICOM series replaced by the CTs in it (image files, series subfolders);
    returns the inputs and whether a folder was expanded."""
    from scdlcore.io.files import files_by_case, is_dicom_folder

    expanded, found = [], False
    for source in inputs:
        cases = files_by_case(source, cts=True) if Path(source).is_dir() else {}
        if cases and is_dicom_folder(source):  # DICOM files beside them: the folder is one series
            cases = {}
        expanded += [str(path) for path in cases.values()] or [source]
        found = found or bool(cases)
    return expanded, found


def _output_folder(args: argparse.Namespace, *, batch: bool) -> Path | None:
    """The output folder of a batch, or None when ``-o`` names the one output file."""
    output = args.output
    if batch or len(args.inputs) > 1 or output.endswith(("/", os.sep)) or Path(output).is_dir():
        if Path(output).is_file():
            raise ValueError(f"{output}: is a file; with several CTs, -o names the folder to write their outputs into.")
        return Path(output)
    if args.format:
        raise ValueError(f"--format applies when -o is a folder; the suffix of {output} already chooses the file type.")
    return None


def _plan(args: argparse.Namespace, folder: Path | None) -> list[BatchCase]:
    """The cases, their outputs checked to be writable before any work."""
    from scdlcore.inference.batch import BatchCase, overview_path, plan_cases
    from scdlcore.io.files import check_label_output, check_writable_folder

    if folder is None:
        overview = None if args.overview is None else Path(args.overview or overview_path(args.output))
        if overview is not None:
            check_writable_folder(overview.parent)
        return [BatchCase(Path(args.inputs[0]), check_label_output(args.output), overview)]
    if args.overview:
        raise ValueError(
            "With an output folder, --overview takes no file name: each CT's overview is written "
            "next to its output as NAME_overview.png."
        )
    check_writable_folder(folder)
    suffix = "." + (args.format or "seg.nrrd").lstrip(".")
    return plan_cases(args.inputs, folder, suffix=suffix, overviews=args.overview is not None)


def _report_single(
    result: CaseResult, organs: list[str], table: LabelTable, events: Progress | None, summary: dict
) -> None:
    case = result.case
    volumes = {name: result.volumes_ml[name] for name in organs}
    overview = None if case.overview is None or result.status == "skipped" else str(case.overview)
    found = [name for name, volume in volumes.items() if volume > 0]
    if not found:  # exit code 0 (the run worked), but an empty result must not pass unnoticed
        print(
            f"Warning: {summary['model']} found none of the organs in {case.input}. Is it an abdominal CT in "
            "Hounsfield units?",
            file=sys.stderr,
        )
    if events is not None:
        events.emit(
            "result",
            output=str(case.output),
            overview=overview,
            status=result.status,
            volumes_ml=volumes,
            organs_found=len(found),
            **summary,
        )
        return
    if result.status == "skipped":
        print(f"Kept the existing {case.output} (--skip-existing)")
    else:
        print(
            f"Segmented {case.input} with {summary['model']} on {summary['device']} "
            f"in {summary['seconds']:.1f} s -> {case.output}"
        )
    if overview:
        print(f"Overview: {overview}")
    width = max(len(table[name].display_name) for name in organs)
    print(f"{'organ':<{width}}  volume (mL)")
    for name in organs:
        print(f"{table[name].display_name:<{width}}  {volumes[name]:11.1f}")


def _run_batch(
    args: argparse.Namespace,
    predictor: Predictor,
    cases: list[BatchCase],
    folder: Path,
    organs: list[str],
    events: Progress | None,
    summary: dict,
    start: float,
) -> int:
    """Segment every case, reporting each as it ends and rewriting the volumes table; exit code 1 if any failed."""
    from scdlcore.events import Progress
    from scdlcore.inference.batch import segment_cases, write_volumes_csv

    def case_progress(index: int, case: BatchCase) -> Progress:
        return Progress(
            100, f"{index + 1}/{len(cases)} {case.input.name}", json_lines=args.events, context={"case": index}
        )

    results: list[CaseResult] = []
    table = folder / _VOLUMES_CSV
    try:
        for result in segment_cases(
            predictor, cases, organs=args.organs, skip_existing=args.skip_existing, progress=case_progress
        ):
            results.append(result)
            write_volumes_csv(table, results, organs)
            _report_case(len(results), len(cases), result, organs, events)
    except KeyboardInterrupt:
        print(
            f"Stopped after {len(results)} of {len(cases)} CTs; the same command with --skip-existing goes on "
            "where it stopped.",
            file=sys.stderr,
        )
        raise
    counts = {status: sum(r.status == status for r in results) for status in ("segmented", "skipped", "failed")}
    seconds = time.monotonic() - start
    if events is not None:
        events.emit(
            "result", output=str(folder), volumes_csv=str(table), cases=len(cases), **counts, **summary, seconds=seconds
        )
    else:
        print(
            f"{counts['segmented']} segmented, {counts['skipped']} kept, {counts['failed']} failed of {len(cases)} CTs "
            f"with {summary['model']} on {summary['device']} in {seconds:.1f} s. Organ volumes: {table}"
        )
    return 1 if counts["failed"] else 0


def _report_case(number: int, total: int, result: CaseResult, organs: list[str], events: Progress | None) -> None:
    case = result.case
    if events is not None:
        events.emit(
            "case",
            case=number - 1,
            input=str(case.input),
            output=str(case.output),
            status=result.status,
            seconds=result.seconds,
            volumes_ml={name: result.volumes_ml[name] for name in organs} if result.volumes_ml else None,
            message=None if result.error is None else str(result.error),
        )
    elif result.status == "failed":
        print(f"[{number}/{total}] {case.input}: FAILED: {result.error}", file=sys.stderr)
    elif result.status == "skipped":
        print(f"[{number}/{total}] {case.input}: kept the existing {case.output}")
    else:
        print(f"[{number}/{total}] {case.input} -> {case.output} ({result.seconds:.1f} s)")
