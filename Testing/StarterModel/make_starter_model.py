"""Train, export and score the bundled starter model, reproducibly.

1. trains ``starter.yaml`` (``--set`` overrides single keys) on the benchmark's data (``bench_accuracy.BenchData``):
   both labeled abdominal CTs, ``ct_abdomen`` (A, non-contrast) and ``ct_abdomen_dicom`` (B, portal venous), and
   ``ct_chest_cta`` and ``ct_chest_nrrd`` unlabeled, resuming an interrupted run. ``--labeled ct_abdomen`` trains
   a leave-one-patient-out fold instead (B never trained on);
2. exports the trained networks as the bundle ``starter`` with float16 weights (a CPS pair at half precision is
   under 10 MB; it predicts with the mean of both, as the benchmark scores it: one network of a pair alone is
   less stable, see "Ship both networks of a CPS pair" in the README);
3. segments both labeled CTs with the bundle, exactly as ``scdl segment`` and ``scdl evaluate`` do, and records
   the per-organ scores in its ``model.json`` (``metrics.native_grid``; each marked training or held out).

It runs on the 2-core CPU in under an hour (the committed starter was made so)::

    python Testing/StarterModel/make_starter_model.py --work /tmp/starter --data .bench-data

then, here, score the returned bundle on the CPU and install it into the package::

    python Testing/StarterModel/make_starter_model.py --rescore RETURNED_BUNDLE --data .bench-data

``--out`` defaults to the package's ``scdlcore/resources/starter_model``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from scdlcore.bundle.format import copy_bundle, load_bundle, save_bundle, update_bundle_metadata
from scdlcore.bundle.registry import STARTER_MODEL_DIR
from scdlcore.device import resolve_device
from scdlcore.evaluation.metrics import evaluate_files
from scdlcore.events import to_jsonable
from scdlcore.inference.postprocess import POSTPROCESSING
from scdlcore.inference.predictor import Predictor
from scdlcore.sample_data import fetch_sample
from scdlcore.training.config import Config, load_config, parse_override

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "Benchmarks"))  # the benchmark's data folder: the same training data
import bench_accuracy as bench  # noqa: E402
from bench_common import machine_name  # noqa: E402

#: The labeled sample CTs: A (non-contrast) and B (portal venous), both scored into model.json.
LABELED_SAMPLES = ("ct_abdomen", bench.TEST_SAMPLE)
#: The starter's version: 1 was trained on its files' own axis order (refused since bundles record an orientation);
#: 2 on 48^3 patches without the contrast phase augmentation; 3 on wide slabs (16 x 96 x 96) with it, supervised;
#: 4 the same semi-supervised (CPS + GA + SCDL, with the unlabeled CTs), both networks of the pair.
STARTER_VERSION = 4


def main() -> None:
    args = _parse()
    data = bench.prepare_data(args.data)
    bundle = args.rescore or _train_and_export(args, data)
    if args.rescore and args.out.resolve() != args.rescore.resolve():
        bundle = copy_bundle(args.rescore, args.out)
    score(
        bundle, data, resolve_device(args.device), trained_on=load_bundle(bundle).lineage.get("labeled", args.labeled)
    )
    if args.folds:
        record_leave_one_out(bundle, args.folds)
    print(f"Starter bundle {bundle} ({sum(p.stat().st_size for p in bundle.iterdir()) / 2**20:.1f} MiB)")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the training dataset, cache and run (needed to train)")
    parser.add_argument(
        "--config", type=Path, default=HERE / "starter.yaml", help="training config (default starter.yaml)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config key"
    )
    parser.add_argument("--data", type=Path, help="benchmark data folder, built when missing (default WORK/data)")
    parser.add_argument(
        "--out", type=Path, default=STARTER_MODEL_DIR, help="where the bundle goes (default: the package's)"
    )
    parser.add_argument(
        "--rescore",
        type=Path,
        metavar="BUNDLE",
        help="no training: score this bundle on --device and write it, with its scores, to --out",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="stop training after this long and ship the weights reached, if past half the steps "
        "(the bundle records where it stopped)",
    )
    parser.add_argument("--device", default="cpu", help="device for scoring (default cpu: the numbers users reproduce)")
    parser.add_argument(
        "--folds",
        nargs="+",
        type=Path,
        metavar="FOLD_BUNDLE",
        help="bundles of the same recipe trained with --labeled on one CT: their held-out scores go into "
        "this bundle's model.json as metrics.leave_one_out",
    )
    parser.add_argument(
        "--labeled",
        nargs="+",
        choices=LABELED_SAMPLES,
        default=list(LABELED_SAMPLES),
        help="the labeled samples trained on (default both; one of them: a leave-one-patient-out fold)",
    )
    args = parser.parse_args()
    if not args.rescore and not args.work:
        parser.error("training needs --work FOLDER (or give --rescore BUNDLE).")
    if args.data is None:
        if args.work is None:
            parser.error("--rescore needs --data FOLDER (the benchmark data folder).")
        args.data = args.work / "data"
    return args


def _train_and_export(args: argparse.Namespace, data: bench.BenchData) -> Path:
    config = load_config(args.config).with_overrides(
        {
            "data.dataset": str(data.train_store(args.work / "train", args.labeled)),
            "data.cache_dir": str(args.work / "cache"),
            **dict(parse_override(item) for item in args.set),
        }
    )
    stop_at = time.time() + args.time_limit if args.time_limit else None
    try:
        bundle, seconds, steps = bench.train_run(config, args.work / "run", stop_at, resume=True)
    except bench.RunCancelled as err:
        raise SystemExit(f"{err} Run again to resume.") from None
    stopped = None
    if steps < config.train.steps:
        stopped = f"stopped by its time limit at step {steps} of {config.train.steps}"
        print(f"Training {stopped}: shipping the weights reached.", flush=True)
    return export_starter(bundle, args.out, config, seconds, args.labeled, stopped)


def export_starter(
    trained_dir: Path, out: Path, config: Config, seconds: float, labeled: list[str], stopped: str | None = None
) -> Path:
    """A trained bundle's networks as the starter bundle, float16 weights, with what it was trained on.

    ``stopped`` says where a run cut short by its time limit stopped (recorded in the description and lineage).
    """
    trained = load_bundle(trained_dir)
    device = resolve_device(config.train.device)
    method = {"cps": "CPS", "mean_teacher": "Mean Teacher", "supervised": "supervised"}[trained.base] + " + GA"
    method += " + SCDL" if config.scdl.enabled else ""
    unlabeled = " plus two unlabeled chest CTs" if trained.base != "supervised" else ""
    description = (
        f"Starter model: {method}, VNet width {config.network.width}, {config.data.spacing[0]:g} mm voxels, "
        f"{trained.lineage['steps']} steps{f' ({stopped})' if stopped else ''} on {machine_name(device)}. "
        f"Trained on {len(labeled)} labeled CT(s) ({', '.join(labeled)}) whose reference labels are TotalSegmentator "
        f"model outputs{unlabeled}: a starting point, not a clinical model. Adapt it to your scans with the "
        "annotation loop (submit corrected cases, fine-tune)."
    )
    return save_bundle(  # atomic: an existing bundle at ``out`` is replaced only once the new one is complete
        out,
        trained.build_networks("cpu"),
        name="starter",
        version=STARTER_VERSION,
        labels=trained.labels,
        spacing=trained.spacing,
        hu_window=trained.hu_window,
        orientation=trained.preprocessing.orientation,
        patch_size=trained.patch_size,
        base=trained.base,
        scdl=trained.scdl,
        metrics=trained.metrics,
        description=description,
        weights_dtype=torch.float16,
        lineage={
            **trained.lineage,
            "trained_on": f"{' + '.join(labeled)} (labeled; TotalSegmentator reference labels)"
            + (" + ct_chest_cta and ct_chest_nrrd (unlabeled)" if unlabeled else "")
            + ", scdlcore sample CTs",
            "labeled": list(labeled),
            "machine": machine_name(device),
            "torch": torch.__version__,
            "train_seconds": round(seconds, 1),
            "config": _portable(config),
            **({"stopped_early": stopped} if stopped else {}),
        },
    )


def _portable(config: Config) -> dict:
    """The config as recorded in model.json: without the training machine's folders."""
    recorded = to_jsonable(config.to_dict())
    recorded["data"].update(dataset="(the training store above)", cache_dir="")
    return recorded


def score(bundle_dir: Path, data: bench.BenchData, device: torch.device, trained_on: list[str]) -> None:
    """Segment both labeled CTs as ``scdl segment`` does, score them as ``scdl evaluate`` does, and record the
    scores in the bundle's model.json, each with its role (training or held out)."""
    bundle = load_bundle(bundle_dir)
    predictor = Predictor(bundle, device)
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in LABELED_SAMPLES:
            role = "training" if case in trained_on else "held_out"
            sample = fetch_sample(case, cache_dir=data.root)
            output = Path(tmp) / f"{case}.seg.nrrd"
            predictor.predict_file(sample.image, output)
            result = evaluate_files(output, sample.label, bundle.labels)
            scores[case] = {"role": role, **to_jsonable(result.to_dict())}
            print(f"{role} case {case} ({device}):\n{result.format_table()}\n", flush=True)
    update_bundle_metadata(
        bundle_dir,
        metrics={
            **{key: value for key, value in bundle.metrics.items() if key != "native_grid"},
            "native_grid": scores,
            "scored_on": str(device),
            "postprocessing": POSTPROCESSING,
            "reference_labels": "TotalSegmentator outputs, not manual annotations",
        },
    )


def record_leave_one_out(bundle_dir: Path, folds: list[Path]) -> None:
    """Record the held-out scores of leave-one-patient-out fold bundles (same recipe, one labeled CT each) in
    ``bundle_dir``'s model.json: what the recipe does on a patient it never saw. Fold 1 (trained on ct_abdomen)
    comes first."""
    bundle = load_bundle(bundle_dir)
    entries = []
    for fold in folds:
        fold_bundle = load_bundle(fold)
        held_out = {
            case: scores for case, scores in fold_bundle.metrics["native_grid"].items() if scores["role"] == "held_out"
        }
        if len(held_out) != 1:
            raise SystemExit(f"{fold}: not a leave-one-out fold bundle (it holds out {sorted(held_out) or 'no CT'}).")
        ((case, scores),) = held_out.items()
        present = {organ: s["dice"] for organ, s in scores["organs"].items() if s["reference_voxels"] > 0}
        entries.append(
            {
                "trained_on": fold_bundle.lineage["labeled"],
                "scored": case,
                "mean_dice_present": sum(present.values()) / len(present),
                "dice": present,
                "steps": fold_bundle.lineage["steps"],
                "machine": fold_bundle.lineage["machine"],
                "train_seconds": fold_bundle.lineage["train_seconds"],
                "postprocessing": fold_bundle.metrics.get("postprocessing", "none"),
            }
        )
        print(
            f"Fold trained on {entries[-1]['trained_on']}, scored on {case}: mean Dice over the "
            f"{len(present)} organs present {entries[-1]['mean_dice_present']:.3f}",
            flush=True,
        )
    # Folds recorded earlier and not given now are kept, each with the postprocessing it was scored with.
    kept = [
        entry
        for entry in bundle.metrics.get("leave_one_out", [])
        if entry["trained_on"] not in [new["trained_on"] for new in entries]
    ]
    update_bundle_metadata(
        bundle_dir,
        metrics={
            **bundle.metrics,
            "leave_one_out": sorted([*kept, *entries], key=lambda entry: entry["trained_on"] != ["ct_abdomen"]),
        },
    )


if __name__ == "__main__":
    main()
