"""Annotation in the loop: a model trained on one labeled CT, one corrected case, and the model fine-tuned on it.

Protocol (real CTs; the labels of A and B are TotalSegmentator model outputs, not manual ground truth):

1. M0: the trainer's defaults (CPS + GA + SCDL) trained on ``ct_abdomen`` (A, labeled) with ``ct_chest_cta``
   (C) and ``ct_chest_nrrd`` (F) unlabeled, with the budget options of ``bench_accuracy.py``.
2. B (``ct_abdomen_dicom``: another patient, another scanner) is split along z. There is no third labeled real
   CT to hold out, so the correction covers only the first half of B's slices (image and labels cropped to it)
   and M0 and M1 are scored on the second half, which neither model sees in any form: the second half is
   segmented on its own, without the first half as context. Both halves are one patient and one scan, so this
   measures the gain on unseen anatomy of a corrected patient, not on a new patient.
3. Two corrections of the first half, each in its own dataset store (``scdlcore.dataset.store.DatasetStore``, with C
   and F as unlabeled cases): "all": every organ, B's reference labels; "partial": liver, spleen and stomach
   reviewed: M0's segmentation with those organs replaced by the reference and the other organs left as M0 drew
   them (unreviewed, so the trainer ignores them).
4. Each is fine-tuned from M0 with ``scdlcore.training.finetune.finetune`` (A as rehearsal, a temporary model registry)
   into M1 (all) and M1 (partial).
5. Dice per organ (``scdlcore.evaluation.metrics``, B's native grid) of M0, M1 (all) and M1 (partial) on B's
   second half.

Usage::

    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_loop.py --smoke --out /tmp/loop      # CPU, ~3 min
    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_loop.py --device cuda --data .bench-data
        # VNet-16, 3000 steps for M0, 300 per fine-tune -> Testing/Benchmarks/results/loop.md and loop.json
    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_loop.py --device cpu --data .bench-data \\
        --m0 Testing/data/fold1_model --out Testing/Benchmarks/results/loop_fold1_cpu   # M0 given, CPU fine-tunes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path
from typing import Any

import bench_accuracy as bench
import numpy as np
import torch
from bench_common import machine_name

from scdlcore.bundle.registry import ModelRegistry
from scdlcore.dataset.store import DatasetStore
from scdlcore.inference.predictor import Predictor
from scdlcore.io.volume import Volume
from scdlcore.labels import LabelTable
from scdlcore.preprocess import crop
from scdlcore.training.config import default_finetune_steps
from scdlcore.training.finetune import finetune

__all__ = ["CORRECTED_ORGANS", "partial_correction", "split_slices"]

#: The organs of the partial correction.
CORRECTED_ORGANS = ("liver", "spleen", "stomach")
CORRECTION_CASE = "ct_abdomen_dicom_first_half"


def split_slices(volume: Volume) -> tuple[Volume, Volume]:
    """The first and second half of a volume's slices (array axis 0), each with its own geometry.

    Args:
        volume: (D, H, W); the first half gets ``D // 2`` slices, the second the rest.
    """
    half = volume.shape[0] // 2
    whole = (slice(0, volume.shape[1]), slice(0, volume.shape[2]))
    return crop(volume, (slice(0, half), *whole)), crop(volume, (slice(half, volume.shape[0]), *whole))


def partial_correction(
    predicted: np.ndarray, reference: np.ndarray, organs: tuple[str, ...], table: LabelTable
) -> np.ndarray:
    """What a person who fixed only ``organs`` in a model's segmentation saves.

    Args:
        predicted: the model's label map (D, H, W) of label values.
        reference: the correct label map (D, H, W), same grid.
        organs: the organs corrected (reviewed).
        table: the label table of both maps.

    Returns:
        (D, H, W): ``reference`` on the corrected organs, the model's other organs elsewhere, background where
        the model drew a corrected organ that the reference does not hold.
    """
    values = [table[name].value for name in organs]
    corrected = np.where(np.isin(predicted, values), 0, predicted).astype(reference.dtype)
    fixed = np.isin(reference, values)
    corrected[fixed] = reference[fixed]
    return corrected


def main() -> None:
    args = _parse()
    data = bench.prepare_data(args.data)
    out = bench.output_folder(args, "loop")
    if args.work.exists() and any(p.name != "data" for p in args.work.iterdir()):
        raise SystemExit(f"{args.work} already holds runs; give a new --work folder.")
    train = data.train_store(args.work / "train")
    image, reference = data.test_case()
    (first_image, second_image), (first_ref, second_ref) = split_slices(image), split_slices(reference)
    print(f"Work folder {args.work}; results to {out}; {machine_name(args.device)}", flush=True)

    registry = ModelRegistry(args.work / "registry")
    if args.m0:
        print(f"=== M0: the bundle {args.m0}", flush=True)
        m0, m0_seconds = registry.import_(args.m0), None
    else:
        print("=== M0: CPS + GA + SCDL on A (+ C, F unlabeled)", flush=True)
        config = bench.base_config(args, train).with_overrides({"train.seed": args.seed})
        m0_dir, m0_seconds, _ = bench.train_run(config, args.work / "m0")
        m0 = registry.import_(m0_dir)
    m0_labels = Predictor(m0, args.device).predict_volume(image)  # the whole case, as a person would see it
    first_m0 = split_slices(m0_labels)[0]

    corrections = {
        "all": (first_ref.array, None),
        "partial": (
            partial_correction(first_m0.array, first_ref.array, CORRECTED_ORGANS, m0.labels),
            list(CORRECTED_ORGANS),
        ),
    }
    models: dict[str, dict[str, Any]] = {"M0": {"model": m0.ref, "train_seconds": m0_seconds}}
    for name, (labels, reviewed) in corrections.items():
        print(f"=== M1 ({name}): fine-tune M0 on the corrected first half of B", flush=True)
        store = DatasetStore.init(args.work / "stores" / name)
        store.add(
            first_image,
            first_ref.with_array(labels),
            case_id=CORRECTION_CASE,
            reviewed=reviewed,
            source=f"bench_loop: first half of {bench.TEST_SAMPLE}, corrected ({name})",
            model=m0.ref,
        )
        data.add_unlabeled(store)
        start = time.perf_counter()
        overrides = {"train.seed": args.seed, "train.compile": args.compile}
        if args.smoke:  # validate the parent and the end only: each validation costs ~20 s on a 2-core CPU
            overrides["train.val_every"] = args.finetune_steps
        result = finetune(
            m0.ref,
            store.root,
            registry=registry,
            steps=args.finetune_steps,
            output=args.work / f"finetune-{name}",
            device=str(args.device),
            rehearsal=str(train),
            overrides=overrides,
        )
        if result.status != "completed":
            raise SystemExit(f"Fine-tune ({name}) stopped early ({result.status}); nothing to score.")
        models[f"M1 ({name})"] = {
            "model": result.model,
            "train_seconds": time.perf_counter() - start,
            "fit_before": result.before,
            "fit_after": result.after,
        }

    for name, entry in models.items():
        scores = bench.score_bundle(registry.resolve(entry["model"]).path, second_image, second_ref, args.device)
        entry.update(summary=bench.summarise(scores)._asdict(), scores=scores.to_dict())
        print(f"    {name}: mean Dice {entry['summary']['mean_dice']:.3f} on the second half", flush=True)
    m0_about = ". ".join(m0.description.split(". ")[:2]) if args.m0 else None  # what it is and what it saw
    _write_results(models, args, out, image, m0_about)
    print((out / "loop.md").read_text(encoding="utf-8"))
    print(f"Results in {out}", flush=True)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--finetune-steps",
        type=int,
        help="steps of each fine-tune (default: scdl finetune's default on --device; smoke 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of M0 and of both fine-tunes (default 0)")
    parser.add_argument(
        "--m0",
        type=Path,
        metavar="BUNDLE",
        help="start from this model bundle instead of training M0, e.g. Testing/data/fold1_model (the starter's "
        "recipe trained on ct_abdomen alone: it never saw B)",
    )
    bench.add_budget_arguments(parser)
    args = parser.parse_args()
    bench.resolve_budget(args, "loop")
    args.finetune_steps = args.finetune_steps or (
        3 if args.smoke else default_finetune_steps(torch.device(args.device).type)
    )
    return args


def _write_results(
    models: dict[str, dict[str, Any]], args: argparse.Namespace, out: Path, image: Volume, m0_bundle: str | None
) -> None:
    from scdlcore.events import to_jsonable

    half = image.shape[0] // 2
    meta = {
        "command": bench.portable_command(args),
        "machine": machine_name(args.device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "smoke": args.smoke,
        "budget": {
            "m0_steps": None if m0_bundle else args.steps,
            "m0_bundle": m0_bundle,
            "finetune_steps": args.finetune_steps,
            "width": args.width,
            "patch": args.patch,
            "spacing_mm": list(args.spacing),
            "seed": args.seed,
            "compile": args.compile,
            "device": str(args.device),
        },
        "split": {
            "correction_slices": [0, half - 1],
            "scored_slices": [half, image.shape[0] - 1],
            "correction_z_mm": [_slice_z(image, 0), _slice_z(image, half - 1)],
            "scored_z_mm": [_slice_z(image, half), _slice_z(image, image.shape[0] - 1)],
        },
        "reference_labels": "TotalSegmentator model outputs, not manual ground truth",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "loop.json").write_text(
        json.dumps(to_jsonable({**meta, "models": models}), indent=1) + "\n", encoding="utf-8"
    )
    (out / "loop.md").write_text(_markdown(models, meta) + "\n", encoding="utf-8")


def _markdown(models: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    m0 = models["M0"]["summary"]
    organs = list(m0["dice"])
    split, budget = meta["split"], meta["budget"]
    names = list(models)
    lines = [
        "# Annotation in the loop: one corrected CT, before and after fine-tuning",
        "",
        "**Reference labels of A and B are TotalSegmentator model outputs, not manual ground truth.**"
        + (" **Smoke run: tiny budget, the numbers are meaningless.**" if meta["smoke"] else ""),
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; "
        f"seed {budget['seed']} (one seed: no spread)",
        _m0_line(budget),
        f"- The correction: {bench.TEST_SAMPLE} (B, another patient and scanner) "
        f"slices {split['correction_slices'][0]}-{split['correction_slices'][1]} "
        f"(z {split['correction_z_mm'][0]:.1f} to {split['correction_z_mm'][1]:.1f} mm), "
        "stored with C and F (unlabeled) in a dataset store; M1 = `scdlcore.training.finetune.finetune` from M0, "
        f"{budget['finetune_steps']} steps, A as rehearsal. M1 (all): every organ corrected; M1 (partial): only "
        f"{', '.join(CORRECTED_ORGANS)} reviewed, the other organs left as M0 drew them.",
        f"- Scored on B's slices {split['scored_slices'][0]}-{split['scored_slices'][1]} "
        f"(z {split['scored_z_mm'][0]:.1f} to {split['scored_z_mm'][1]:.1f} mm), "
        "segmented on their own: no model saw them in any form. There is no third "
        "labeled real CT, so this half stands in for 'a case neither saw': same patient and scan as the correction, "
        "unseen slices. Dice on the native grid (0.98 x 0.98 x 2 mm).",
        "",
        "| organ | reference voxels | " + " | ".join(names) + " | change (all) | change (partial) |",
        "|---|---|" + "---|" * (len(names) + 2),
    ]
    reference_voxels = models["M0"]["scores"]["organs"]
    for organ in organs:
        values = [models[name]["summary"]["dice"][organ] for name in names]
        marker = " (in partial)" if organ in CORRECTED_ORGANS else ""
        lines.append(
            f"| {organ}{marker} | {reference_voxels[organ]['reference_voxels']} | "
            + " | ".join(_fmt(v) for v in values)
            + f" | {_change(values[1], values[0])} | {_change(values[2], values[0])} |"
        )
    for label, subset in (
        ("mean, all organs present", organs),
        ("mean, liver/spleen/stomach", [o for o in organs if o in CORRECTED_ORGANS]),
        ("mean, other organs", [o for o in organs if o not in CORRECTED_ORGANS]),
    ):
        if subset:
            values = [float(np.mean([models[name]["summary"]["dice"][o] for o in subset])) for name in names]
            lines.append(
                f"| **{label}** ({len(subset)}) | | "
                + " | ".join(_fmt(v) for v in values)
                + f" | {_change(values[1], values[0])} | {_change(values[2], values[0])} |"
            )
    hd95 = [models[name]["summary"]["mean_hd95"] for name in names]
    lines.append("| mean HD95 (mm, organs found) | | " + " | ".join(_fmt(v, 1) for v in hd95) + " | | |")
    fits = [
        f"{name}: {_fmt(_mean(models[name]['fit_before']))} -> {_fmt(_mean(models[name]['fit_after']))}"
        for name in names[1:]
    ]
    lines += [
        "",
        "Fine-tuning's own validation, on the corrected first half (fit, not generalisation; model grid): mean Dice "
        + "; ".join(fits)
        + ".",
    ]
    return "\n".join(lines)


def _m0_line(budget: dict[str, Any]) -> str:
    if budget.get("m0_bundle"):
        return f"- M0: a given bundle (--m0): {budget['m0_bundle']}"
    return (
        f"- M0: CPS + GA + SCDL, VNet-{budget['width']}, {budget['m0_steps']} steps of {budget['patch']}^3 patches at "
        f"{' x '.join(f'{s:g}' for s in budget['spacing_mm'])} mm on ct_abdomen (A, labeled) with ct_chest_cta (C) "
        "and ct_chest_nrrd (F) unlabeled."
    )


def _slice_z(volume: Volume, index: int) -> float:
    """LPS z (mm) of the centre of slice ``index``."""
    return float((volume.ijk_to_lps @ np.array([0.0, 0.0, index, 1.0]))[2])


def _mean(dice: dict[str, float]) -> float:
    finite = [v for v in dice.values() if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _change(after: float, before: float) -> str:
    return "-" if math.isnan(after) or math.isnan(before) else f"{after - before:+.3f}"


if __name__ == "__main__":
    main()
