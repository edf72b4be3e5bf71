"""Where a training step's time goes, stage by stage, in the real trainer on the real benchmark CTs.

``bench_train_step.py`` times the optimisation step alone on random tensors. This script builds the trainer
exactly as ``bench_accuracy.py`` does (fold 1's store: A labeled, C and F unlabeled; the same budget) and times
each stage of ``Trainer.train_step`` separately, per configuration:

- ``sample``: :class:`scdlcore.training.patches.PatchSampler` draws the step's patches from the cached volumes;
- ``augment``: ``Trainer.augmented_batch`` (to tensors; :class:`scdlcore.training.augment.Augmenter`: contrast phase,
  MONAI spatial and intensity, short scan);
- ``step``: :func:`scdlcore.training.trainer.optimisation_step` (forward, losses, backward, SGD) on that batch;
- ``step on MetaTensors``: the same batch wrapped as MONAI MetaTensors, which is what the augmenter handed the
  network before it returned plain tensors: the baseline of that change, measured in the same run.

Every stage is timed on the same steps (after warm-up), interleaved, so the ratios hold on a shared machine.

Usage::

    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_train_pipeline.py --data .bench-data --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_accuracy import base_config, configurations, prepare_data, resolve_budget
from bench_common import table_head, write_table

#: The configurations timed: the starter's recipe and the two semi-supervised bases of the accuracy benchmark.
CONFIGS = ("supervised_no_phase", "cps_ga", "cps_ga_scdl")


def time_stages(trainer, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per stage for each of ``steps`` timed steps of a set-up trainer."""
    from monai.data import MetaTensor

    from scdlcore.training.ssl import Batch
    from scdlcore.training.trainer import optimisation_step

    times: dict[str, list[float]] = {"sample": [], "augment": [], "step": [], "step on MetaTensors": []}
    trainer.model.train()
    for step in range(warmup + steps):
        began = time.perf_counter()
        arrays = trainer.sampler.batch(step)
        sampled = time.perf_counter()
        batch = trainer.augmented_batch(arrays, step)
        augmented = time.perf_counter()
        optimisation_step(trainer.model, trainer.optimizer, batch, 0.5, amp=False)
        stepped = time.perf_counter()
        mask = None if batch.valid is None else MetaTensor(batch.valid)
        meta = Batch(MetaTensor(batch.images), MetaTensor(batch.labels), mask)
        optimisation_step(trainer.model, trainer.optimizer, meta, 0.5, amp=False)
        meta_stepped = time.perf_counter()
        if step >= warmup:
            for name, seconds in zip(
                times, (sampled - began, augmented - sampled, stepped - augmented, meta_stepped - stepped)
            ):
                times[name].append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the benchmark data folder (bench_accuracy.py)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(configurations(48)))
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    args.smoke, args.spacing, args.compile = False, None, False
    args.work = Path(tempfile.mkdtemp(prefix="scdl-pipeline-"))
    args.device = "cpu"
    resolve_budget(args, "pipeline")
    from scdlcore.training.trainer import Trainer

    store = prepare_data(args.data).train_store(args.work / "train")
    lines = table_head(
        f"Training step by stage, median ms over {args.steps} steps (after {args.warmup}): VNet-{args.width}, "
        f"{args.patch}^3 patches, fold 1's training store (A labeled; C, F unlabeled)",
        args.device,
        [
            "configuration",
            "sample",
            "augment",
            "step",
            "whole step",
            "steps/s",
            "step on MetaTensors (before)",
            "whole step before",
            "speed-up",
        ],
    )
    print("\n".join(lines), flush=True)
    for name in args.configs:
        config = base_config(args, store).with_overrides(configurations(args.patch)[name].overrides)
        trainer = Trainer(config, args.work / name)
        trainer.setup()
        medians = {
            stage: statistics.median(s) * 1000 for stage, s in time_stages(trainer, args.steps, args.warmup).items()
        }
        now = medians["sample"] + medians["augment"] + medians["step"]
        before = medians["sample"] + medians["augment"] + medians["step on MetaTensors"]
        lines.append(
            f"| {name} | {medians['sample']:.1f} | {medians['augment']:.1f} | {medians['step']:.1f} | {now:.1f} | "
            f"{1000 / now:.2f} | {medians['step on MetaTensors']:.1f} | {before:.1f} | {before / now:.2f}x |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    write_table(table, args.out)


if __name__ == "__main__":
    main()
