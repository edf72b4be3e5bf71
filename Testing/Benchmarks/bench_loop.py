"""Annotation in the loop: a model trained on one labeled CT, corrections of another, and the models fine-tuned on them.

Protocol (real CTs; the labels of A and B are TotalSegmentator model outputs, not manual ground truth):

1. M0: a given bundle (``--m0``, e.g. a fold-1 model of the accuracy benchmark), else the trainer's defaults
   (CPS + GA + SCDL) trained here on ``ct_abdomen`` (A, labeled) with ``ct_chest_cta`` (C) and ``ct_chest_nrrd``
   (F) unlabeled, with the budget options of ``bench_accuracy.py``.
2. B (``ct_abdomen_dicom``: another patient, another scanner) is split along z. There is no third labeled real
   CT to hold out, so the corrections cover B's first half (its two quarters) and every model is scored on the
   second half, which no model sees in any form: it is segmented on its own, without the first half as context.
   Both halves are one patient and one scan, so this measures the gain on unseen anatomy of a corrected patient,
   not on a new patient. Every model is also scored on the whole of A ("what the fine-tune costs elsewhere").
3. Each fine-tune (``scdlcore.training.finetune.finetune`` with the default steps of the device) gets its own
   dataset store (``scdlcore.dataset.store.DatasetStore``) of the corrected slices with C and F unlabeled:

   - M1 (all organs): B's first half with its reference labels, A as rehearsal;
   - M1 (partial): B's first half with liver, spleen and stomach reviewed: M0's segmentation with those organs
     replaced by the reference, the other organs left as M0 drew them (unreviewed: they train as drawn, the
     trainer's default ``data.unreviewed = "kept"``);
   - M1 (partial, unreviewed unknown): the same with ``data.unreviewed = "unknown"`` (the rule before "kept");
   - M1 (partial, no rehearsal): the same without A;
   - M1 (partial, 1st quarter), then M2: the second quarter corrected the same way from M1's result, and M1
     fine-tuned on both quarters (two corrections in a row).
4. ``--seeds N`` repeats the fine-tunes with seeds 0..N-1 (M0 is one model): the tables give mean ± std.

Usage::

    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_loop.py --smoke --out /tmp/loop      # CPU, ~3 min
    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_loop.py --device cuda --data .bench-data --seeds 3
        # VNet-16, 3000 steps for M0, 300 per fine-tune -> Testing/Benchmarks/results/loop.md and loop.json
    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_loop.py --device cpu --data .bench-data --seeds 2 \\
        --m0 Testing/data/fold1_model --out Testing/Benchmarks/results/loop_fold1_cpu   # M0 given, CPU fine-tunes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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
CORRECTION_CASE = "ct_abdomen_dicom_correction"
#: The other labeled CT, scored whole: M0's training CT when M0 is of fold 1.
OTHER_SAMPLE = "ct_abdomen"


def split_slices(volume: Volume, *bounds: int) -> list[Volume]:
    """Consecutive slabs of a volume's slices (array axis 0), each with its own geometry.

    Args:
        volume: (D, H, W). bounds: increasing slice indices in (0, D) where one slab ends and the next begins.

    Returns:
        ``len(bounds) + 1`` volumes: slices ``[0, bounds[0])``, ``[bounds[0], bounds[1])``, ..., ``[bounds[-1], D)``.
    """
    edges = [0, *bounds, volume.shape[0]]
    if any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"Slab bounds {list(bounds)} do not split {volume.shape[0]} slices into non-empty slabs.")
    whole = (slice(0, volume.shape[1]), slice(0, volume.shape[2]))
    return [crop(volume, (slice(a, b), *whole)) for a, b in zip(edges, edges[1:])]


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


class Correction(NamedTuple):
    """One corrected part of B as a person submits it: image, labels, reviewed organs (None: every organ)."""

    name: str
    image: Volume
    labels: Volume
    reviewed: list[str] | None


class Slabs(NamedTuple):
    """B cut along z: its first half (the corrections), that half's two quarters, and the second half (scored)."""

    whole: Volume
    first_half: Volume
    first_quarter: Volume
    second_quarter: Volume
    scored: Volume

    @classmethod
    def of(cls, volume: Volume) -> Slabs:
        first_half, scored = split_slices(volume, volume.shape[0] // 2)
        return cls(volume, first_half, *split_slices(first_half, first_half.shape[0] // 2), scored)


def main() -> None:
    args = _parse()
    data = bench.prepare_data(args.data)
    out = bench.output_folder(args, "loop")
    if args.work.exists() and any(p.name != "data" for p in args.work.iterdir()):
        raise SystemExit(f"{args.work} already holds runs; give a new --work folder.")
    train = data.train_store(args.work / "train")
    image, reference = data.test_case()
    other = data.test_case(OTHER_SAMPLE)
    images, references = Slabs.of(image), Slabs.of(reference)
    print(f"Work folder {args.work}; results to {out}; {machine_name(args.device)}", flush=True)

    registry = ModelRegistry(args.work / "registry")
    if args.m0:
        print(f"=== M0: the bundle {args.m0}", flush=True)
        m0, m0_seconds = registry.import_(args.m0), None
    else:
        print("=== M0: CPS + GA + SCDL on A (+ C, F unlabeled), seed 0", flush=True)
        config = bench.base_config(args, train).with_overrides({"train.seed": 0})
        m0_dir, m0_seconds, _ = bench.train_run(config, args.work / "m0")
        m0 = registry.import_(m0_dir)
    m0_entry = {
        "model": m0.ref,
        "train_seconds": m0_seconds,
        **_scores(registry, m0.ref, images, references, other, args),
    }
    runs = []
    for seed in range(args.seeds):
        models = {"M0": m0_entry, **_finetunes(m0, seed, images, references, train, registry, data, args)}
        for name, entry in models.items():
            if name != "M0":
                entry.update(_scores(registry, entry["model"], images, references, other, args))
        runs.append({"seed": seed, "models": models})
        _write_results(runs, args, out, image, m0.description if args.m0 else None)
    print((out / "loop.md").read_text(encoding="utf-8"))
    print(f"Results in {out}", flush=True)


def _finetunes(
    m0: Any,
    seed: int,
    images: Slabs,
    references: Slabs,
    train: Path,
    registry: ModelRegistry,
    data: bench.BenchData,
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """The fine-tunes of one seed (the module docstring's list), each from the model a person would have had."""
    predict = _predictor_of(registry, args)

    def reviewed(name: str, part: str, parent_result: Slabs) -> Correction:
        """B's ``part`` (a field of :class:`Slabs`) with the parent's result fixed on the corrected organs."""
        reference = getattr(references, part)
        labels = partial_correction(getattr(parent_result, part).array, reference.array, CORRECTED_ORGANS, m0.labels)
        return Correction(name, getattr(images, part), reference.with_array(labels), list(CORRECTED_ORGANS))

    m0_result = Slabs.of(predict(m0.ref, images.whole))  # the whole CT segmented, as a person sees it
    all_organs = Correction("first half, all organs", images.first_half, references.first_half, None)
    partial = reviewed("first half, partial", "first_half", m0_result)
    quarter = reviewed("1st quarter, partial", "first_quarter", m0_result)
    models: dict[str, dict[str, Any]] = {}

    def run(name: str, parent: str, corrections: list[Correction], rehearsal: Path | None, **settings: Any) -> str:
        print(f"=== seed {seed}: {name}", flush=True)
        folder = args.work / f"seed{seed}" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        store = DatasetStore.init(folder / "store")
        for index, correction in enumerate(corrections):
            store.add(
                correction.image,
                correction.labels,
                case_id=f"{CORRECTION_CASE}_{index + 1}",
                reviewed=correction.reviewed,
                source=f"bench_loop: {bench.TEST_SAMPLE}, corrected ({correction.name})",
                model=parent,
            )
        data.add_unlabeled(store)
        overrides = {"train.seed": seed, "train.compile": args.compile, **settings}
        if args.smoke:  # validate the parent and the end only: each validation costs ~20 s on a 2-core CPU
            overrides["train.val_every"] = args.finetune_steps
        start = time.perf_counter()
        result = finetune(
            parent,
            store.root,
            registry=registry,
            steps=args.finetune_steps,
            output=folder / "run",
            device=str(args.device),
            rehearsal=str(rehearsal) if rehearsal else "",
            overrides=overrides,
        )
        if result.status != "completed":
            raise SystemExit(f"Fine-tune {name} stopped early ({result.status}); nothing to score.")
        models[name] = {
            "model": result.model,
            "parent": parent,
            "corrections": [c.name for c in corrections],
            "rehearsal": rehearsal is not None,
            "train_seconds": time.perf_counter() - start,
            "fit_before": result.before,
            "fit_after": result.after,
            "verdict": result.verdict.summary if result.verdict else None,
        }
        return result.model

    run("M1 (all organs)", m0.ref, [all_organs], train)
    run("M1 (partial)", m0.ref, [partial], train)
    run("M1 (partial, unreviewed unknown)", m0.ref, [partial], train, **{"data.unreviewed": "unknown"})
    run("M1 (partial, no rehearsal)", m0.ref, [partial], None)
    m1_quarter = run("M1 (partial, 1st quarter)", m0.ref, [quarter], train)
    second = reviewed("2nd quarter, partial", "second_quarter", Slabs.of(predict(m1_quarter, images.whole)))
    run("M2 (partial, + 2nd quarter)", m1_quarter, [quarter, second], train)
    return models


def _predictor_of(registry: ModelRegistry, args: argparse.Namespace) -> Callable[[str, Volume], Volume]:
    def predict(model: str, image: Volume) -> Volume:
        return Predictor(registry.resolve(model), args.device).predict_volume(image)

    return predict


def _scores(
    registry: ModelRegistry,
    model: str,
    images: Slabs,
    references: Slabs,
    other: tuple[Volume, Volume],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The model's scores on B's uncorrected half and on the other labeled CT (A)."""
    path = registry.resolve(model).path
    scored = bench.score_bundle(path, images.scored, references.scored, args.device)
    elsewhere = bench.score_bundle(path, *other, args.device)
    return {
        "summary": bench.summarise(scored)._asdict(),
        "scores": scored.to_dict(),
        "other_summary": bench.summarise(elsewhere)._asdict(),
    }


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--finetune-steps",
        type=int,
        help="steps of each fine-tune (default: scdl finetune's default on --device; smoke 3)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="fine-tune seeds 0..N-1, for the spread (default 1; M0 is seed 0)"
    )
    parser.add_argument(
        "--m0",
        type=Path,
        metavar="BUNDLE",
        help="start from this model bundle instead of training M0, e.g. Testing/data/fold1_model (starter@2's "
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
    runs: list[dict[str, Any]], args: argparse.Namespace, out: Path, image: Volume, m0_about: str | None
) -> None:
    from scdlcore.events import to_jsonable

    slabs = Slabs.of(image)
    meta = {
        "command": bench.portable_command(args),
        "machine": machine_name(args.device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "smoke": args.smoke,
        "budget": {
            "m0_steps": None if m0_about else args.steps,
            "m0_bundle": m0_about,
            "finetune_steps": args.finetune_steps,
            "width": args.width,
            "patch": args.patch,
            "spacing_mm": list(args.spacing),
            "seeds": len(runs),
            "compile": args.compile,
            "device": str(args.device),
        },
        "split": {
            name: _slab_extent(image, getattr(slabs, name)) for name in ("first_quarter", "second_quarter", "scored")
        },
        "reference_labels": "TotalSegmentator model outputs, not manual ground truth",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "loop.json").write_text(json.dumps(to_jsonable({**meta, "runs": runs}), indent=1) + "\n", encoding="utf-8")
    (out / "loop.md").write_text(_markdown(runs, meta) + "\n", encoding="utf-8")


def _slab_extent(image: Volume, slab: Volume) -> dict[str, list]:
    """A slab's first and last slice index in ``image`` and their LPS z (mm)."""
    origin = slab.ijk_to_lps @ np.array([0.0, 0.0, 0.0, 1.0])
    first = round(float(np.linalg.solve(image.ijk_to_lps, origin)[2]))
    last = first + slab.shape[0] - 1
    return {"slices": [first, last], "z_mm": [_slice_z(image, first), _slice_z(image, last)]}


def _markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    names = list(runs[0]["models"])
    m0 = runs[0]["models"]["M0"]
    organs = list(m0["summary"]["dice"])
    split, budget, seeds = meta["split"], meta["budget"], len(runs)

    def values(name: str, pick: Callable[[dict[str, Any]], float]) -> list[float]:
        return [pick(run["models"][name]) for run in runs]

    def mean(name: str, pick: Callable[[dict[str, Any]], float]) -> str:  # M0 is one model: no spread
        return bench.format_mean_std(values(name, pick)) if seeds > 1 and name != "M0" else _fmt(values(name, pick)[0])

    def change(name: str, pick: Callable[[dict[str, Any]], float]) -> str:
        if name == "M0":
            return "-"
        differences = [a - b for a, b in zip(values(name, pick), values("M0", pick))]
        return bench.format_mean_std(differences, signed=True) if seeds > 1 else f"{differences[0]:+.3f}"

    def span(part: str) -> str:
        (first, last), (z0, z1) = split[part]["slices"], split[part]["z_mm"]
        return f"slices {first}-{last}, z {z0:.1f} to {z1:.1f} mm"

    def mean_dice(entry: dict[str, Any]) -> float:
        return entry["summary"]["mean_dice"]

    def corrected_dice(entry: dict[str, Any]) -> float:
        return float(np.mean([entry["summary"]["dice"][o] for o in organs if o in CORRECTED_ORGANS]))

    def on_a(entry: dict[str, Any]) -> float:
        return entry["other_summary"]["mean_dice"]

    def kept(name: str) -> str:
        """In how many seeds the fine-tune kept its parent's weights: its validation never beat the parent's."""
        if name == "M0":
            return "-"
        count = sum(run["models"][name]["fit_after"] == run["models"][name]["fit_before"] for run in runs)
        return f"{count} of {seeds}"

    spread = f"fine-tune seeds 0-{seeds - 1}: mean ± std" if seeds > 1 else "seed 0 (one seed: no spread)"
    lines = [
        "# Annotation in the loop: corrected slices of a CT, before and after fine-tuning",
        "",
        "**Reference labels of A and B are TotalSegmentator model outputs, not manual ground truth.**"
        + (" **Smoke run: tiny budget, the numbers are meaningless.**" if meta["smoke"] else ""),
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; {spread}",
        _m0_line(budget),
        f"- The corrections: {bench.TEST_SAMPLE} (B, another patient and scanner): its first quarter "
        f"({span('first_quarter')}) and second quarter ({span('second_quarter')}), stored with C and F "
        "(unlabeled) in a new dataset store per fine-tune; every fine-tune is `scdlcore.training.finetune.finetune` "
        f'with {budget["finetune_steps"]} steps. "all organs": B\'s reference labels; "partial": only '
        f"{', '.join(CORRECTED_ORGANS)} reviewed, the other organs as the parent model drew them on the whole CT, "
        'which train as drawn (`data.unreviewed = "kept"`) except in "unreviewed unknown" (left out of the losses). '
        "Rehearsal A: M0's labeled CT trains beside the correction. M2: the second quarter corrected from "
        "M1 (partial, 1st quarter)'s result, and that model fine-tuned on both quarters: two corrections in a row.",
        f"- Scored on B's second half ({span('scored')}), segmented on its own: no model saw it in any form. There "
        "is no third labeled real CT, so this half stands in for 'a case neither saw': same patient and scan as the "
        'corrections, unseen slices. Dice on the native grid (0.98 x 0.98 x 2 mm). "On A": the whole of '
        f"{OTHER_SAMPLE} (A), M0's training CT: what each fine-tune costs on what M0 knew.",
        "- A fine-tune validates on its reviewed case (the only one: fit, not generalisation) and keeps the parent's "
        "weights when it never beats them there (`scdlcore.training.finetune`); the last column counts the seeds "
        "where that happened, and such a model scores as its parent.",
        "",
        "| model | parent | corrections | rehearsal | mean Dice, B's uncorrected half | change | "
        "liver/spleen/stomach | change | mean Dice on A | change on A | fine-tune (min) | parent's weights kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    model_names = {run["models"][n]["model"]: n for run in runs for n in names}
    for name in names:
        entry = runs[0]["models"][name]
        parent = model_names.get(entry.get("parent"), "-")
        minutes = "-" if name == "M0" else _fmt(float(np.mean(values(name, lambda e: e["train_seconds"]))) / 60, 1)
        rehearsal = "-" if name == "M0" else ("A" if entry["rehearsal"] else "none")
        lines.append(
            f"| {name} | {parent} | {' + '.join(entry.get('corrections', [])) or '-'} | {rehearsal} | "
            f"{mean(name, mean_dice)} | {change(name, mean_dice)} | "
            f"{mean(name, corrected_dice)} | {change(name, corrected_dice)} | "
            f"{mean(name, on_a)} | {change(name, on_a)} | {minutes} | {kept(name)} |"
        )
    lines += [
        "",
        "Dice per organ on B's uncorrected half" + (", mean over the seeds:" if seeds > 1 else ":"),
        "",
        "| organ | reference voxels | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for organ in organs:
        marker = " (in partial)" if organ in CORRECTED_ORGANS else ""
        cells = [_fmt(float(np.mean(values(n, lambda e, o=organ: e["summary"]["dice"][o])))) for n in names]
        voxels = m0["scores"]["organs"][organ]["reference_voxels"]
        lines.append(f"| {organ}{marker} | {voxels} | " + " | ".join(cells) + " |")
    hd95 = [_fmt(_finite_mean(values(n, lambda e: e["summary"]["mean_hd95"])), 1) for n in names]
    lines.append("| mean HD95 (mm, organs found) | | " + " | ".join(hd95) + " |")
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


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]  # NaN is null in the JSON
    return float(np.mean(finite)) if finite else math.nan


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
