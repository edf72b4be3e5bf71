"""``scdl evaluate``: Dice, HD95 and ASD per organ, on the native grid or in paper-compatible mode."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
from pathlib import Path

from scdlcore.cli.options import add_device_option, add_models_dir_option

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score label maps against references (Dice, HD95, ASD per organ)",
        description="Score predicted label maps against reference label maps on the reference's native grid "
        "(distances in mm). Give PRED REF pairs, or a folder of predictions and a folder of references (files "
        "paired by name without suffix: results/case01.seg.nrrd with labels/case01.nii.gz); with --model, "
        "IMAGE REF pairs (or folders) and each image is segmented first. Several cases are listed one per line "
        "and averaged per organ.",
    )
    parser.add_argument(
        "pairs",
        nargs="+",
        metavar="PRED_OR_IMAGE REF",
        help="file or folder pairs (label maps, .seg.nrrd, or images with --model)",
    )
    parser.add_argument("--model", help="segment each IMAGE with this model (name, name@version or bundle path) first")
    add_models_dir_option(parser)
    add_device_option(parser, " (with --model)")
    parser.add_argument("--labels", default="synapse13", help="label table of the label maps (default: synapse13)")
    parser.add_argument(
        "--paper",
        action="store_true",
        help="paper-compatible mode: maps resized to 160x160x80, distances in voxels, 128 for a missed organ",
    )
    parser.add_argument("--json", type=Path, help="also write the scores as JSON")
    parser.add_argument("--csv", type=Path, help="also write the scores as CSV (one row per organ)")
    parser.add_argument(
        "--plot", type=Path, metavar="PNG", help="also draw Dice and HD95 per organ (bars: mean, dots: cases)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scdlcore._atomic import atomic_write_text
    from scdlcore.evaluation.metrics import evaluate_files, format_case_table, mean_case_results
    from scdlcore.events import to_jsonable
    from scdlcore.io.files import case_name
    from scdlcore.labels import get_label_table

    if len(args.pairs) % 2:
        raise ValueError(
            f"scdl evaluate takes files in pairs (prediction or image, then reference); got {len(args.pairs)} paths."
        )
    inputs = [
        pair
        for first, second in zip(args.pairs[::2], args.pairs[1::2])
        for pair in _expand(Path(first), Path(second), images=bool(args.model))
    ]
    table = get_label_table(args.labels)
    with tempfile.TemporaryDirectory(prefix="scdl-evaluate-") as predictions:
        pairs = inputs
        if args.model:
            pairs, table = _segment_first(inputs, args, Path(predictions))
        results = [evaluate_files(pred, ref, table, paper_mode=args.paper) for pred, ref in pairs]
    if len(results) > 1:
        print(format_case_table([(case_name(first), result) for (first, _), result in zip(inputs, results)]) + "\n")
    summary = results[0] if len(results) == 1 else mean_case_results(results)
    print(summary.format_table())
    if args.plot:
        from scdlcore.visualize.score_plot import save_score_plot

        save_score_plot(args.plot, summary, [(case_name(first), result) for (first, _), result in zip(inputs, results)])
    if args.json:
        atomic_write_text(
            args.json,
            json.dumps(
                to_jsonable(
                    {
                        "summary": summary.to_dict(),
                        "cases": [
                            {"image" if args.model else "prediction": str(p), "reference": str(r), **result.to_dict()}
                            for (p, r), result in zip(inputs, results)
                        ],
                    }
                ),
                indent=2,
            ),
        )
    if args.csv:
        rows = summary.to_csv_rows()
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(args.csv, text.getvalue())
    return 0


def _expand(first: Path, second: Path, images: bool) -> list[tuple[Path, Path]]:
    """A file pair as it is; a pair of folders as the pairs of their entries with the same case name (with
    ``images``, the first folder holds CTs: image files and DICOM-series subfolders; see io.match_by_case)."""
    if not (first.is_dir() and second.is_dir()):
        return [(first, second)]
    from scdlcore.io.files import files_by_case, match_by_case

    firsts, seconds = files_by_case(first, cts=images), files_by_case(second)
    matches = {name: match for name, match in match_by_case(firsts, seconds).items() if match}
    if not matches:
        raise ValueError(
            f"No file of {first} has a namesake in {second}; files are paired by their name without "
            "suffix (case01.seg.nrrd with case01.nii.gz)."
        )
    unpaired = ((set(seconds) - set(matches.values()), second, first), (set(firsts) - set(matches), first, second))
    for names, where, other in unpaired:
        alone = sorted(names)
        if alone:
            print(
                f"scdl evaluate: warning: {len(alone)} case(s) of {where} have no namesake in {other} and are not "
                f"scored: {', '.join(alone)}",
                file=sys.stderr,
            )
    return [(firsts[name], seconds[match]) for name, match in matches.items()]


def _segment_first(pairs, args, folder: Path):
    """Segment each image with the model into a label map in ``folder``.

    Returns (pred, ref) pairs and the model's table.
    """
    from scdlcore.bundle.registry import ModelRegistry
    from scdlcore.device import resolve_device
    from scdlcore.inference.predictor import Predictor

    bundle = ModelRegistry(args.models_dir).resolve(args.model)
    predictor = Predictor(bundle, resolve_device(args.device))
    segmented = []
    for index, (image, reference) in enumerate(pairs):
        output = folder / f"prediction{index}.nii.gz"
        predictor.predict_file(image, output)
        segmented.append((output, reference))
    return segmented, bundle.labels
