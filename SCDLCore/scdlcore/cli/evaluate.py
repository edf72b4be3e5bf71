"""``scdl evaluate``: Dice, HD95 and ASD per organ, on the native grid or in paper-compatible mode."""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score label maps against references (Dice, HD95, ASD per organ)",
        description="Score predicted label maps against reference label maps on the reference's native grid "
        "(distances in mm). Give PRED REF pairs; with --model, give IMAGE REF pairs and each image is segmented "
        "first. Several pairs are averaged per organ.",
    )
    parser.add_argument("pairs", nargs="+", metavar="PRED_OR_IMAGE REF", help="file pairs (label maps, .seg.nrrd, or images with --model)")
    parser.add_argument("--model", help="segment each IMAGE with this model (name, name@version or bundle path) first")
    parser.add_argument("--models-dir", help="model registry folder (default: $SCDL_MODELS_DIR or the user data folder)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (with --model)")
    parser.add_argument("--labels", default="synapse13", help="label table of the label maps (default: synapse13)")
    parser.add_argument("--paper", action="store_true",
                        help="paper-compatible mode: maps resized to 160x160x80, distances in voxels, 128 for a missed organ")
    parser.add_argument("--json", type=Path, help="also write the scores as JSON")
    parser.add_argument("--csv", type=Path, help="also write the scores as CSV (one row per organ)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..events import to_jsonable
    from ..labels import get_label_table
    from ..metrics import evaluate_files, mean_case_results

    if len(args.pairs) % 2:
        raise ValueError(f"scdl evaluate takes files in pairs (prediction or image, then reference); got {len(args.pairs)} paths.")
    inputs = list(zip(args.pairs[::2], args.pairs[1::2]))
    table = get_label_table(args.labels)
    with tempfile.TemporaryDirectory(prefix="scdl-evaluate-") as predictions:
        pairs = inputs
        if args.model:
            pairs, table = _segment_first(inputs, args, Path(predictions))
        results = [evaluate_files(pred, ref, table, paper_mode=args.paper) for pred, ref in pairs]
    summary = results[0] if len(results) == 1 else mean_case_results(results)
    print(summary.format_table())
    if args.json:
        args.json.write_text(json.dumps(to_jsonable({"summary": summary.to_dict(), "cases": [
            {"image" if args.model else "prediction": str(p), "reference": str(r), **result.to_dict()}
            for (p, r), result in zip(inputs, results)]}), indent=2))
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            rows = summary.to_csv_rows()
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


def _segment_first(pairs, args, folder: Path):
    """Segment each image with the model into a label map in ``folder``; returns (pred, ref) pairs and the model's table."""
    from ..bundle import ModelRegistry
    from ..infer import Predictor
    from ..train import resolve_device

    bundle = ModelRegistry(args.models_dir).resolve(args.model)
    predictor = Predictor(bundle, resolve_device(args.device))
    segmented = []
    for index, (image, reference) in enumerate(pairs):
        output = folder / f"prediction{index}.nii.gz"
        predictor.predict_file(image, output)
        segmented.append((output, reference))
    return segmented, bundle.labels
