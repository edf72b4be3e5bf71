"""Fine-tuning a model bundle on a dataset store: the annotation loop's learning step.

Reviewed cases (fully or partially corrected) are the labeled data, every other case of the store is
unlabeled; the bundle's semi-supervised base (CPS or Mean Teacher; CPS for a bundle trained supervised, such
as the starter, since the loop is meant to learn from the unlabeled CTs too) and SCDL train on both. The run starts
from the bundle's weights, validates the parent first (the "before" Dice) and then on a cadence, keeps
the best weights (the parent's, if fine-tuning did not beat it) and ends by registering a NEW version of
the model whose lineage names the parent, the dataset fingerprint and the before/after Dice per organ.

Validation: with 3 or more reviewed cases the last one (by id) is held out; with fewer, the reviewed
cases themselves are scored and the metrics say ``"validation": "training cases"`` (too few to hold one
out - the numbers then show fit, not generalisation).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scdlcore.bundle.format import ModelBundle, load_bundle, update_bundle_metadata
from scdlcore.bundle.registry import ModelRegistry
from scdlcore.dataset.manifest import load_dataset
from scdlcore.device import resolve_device
from scdlcore.labels import LabelTable, differences_text
from scdlcore.training.checkpoints import finished_run, holds_run
from scdlcore.training.config import Config, SCDLConfig, default_finetune_steps
from scdlcore.training.trainer import Trainer

__all__ = [
    "FinetuneResult",
    "Verdict",
    "bundle_weights_for_base",
    "check_same_labels",
    "compare_to_parent",
    "default_run_folder",
    "finetune",
    "finetune_config",
]

MIN_CASES_TO_HOLD_OUT = 3
#: An organ whose validation Dice fell by more than this is named as worse than in the parent.
WORSE_BY = 0.01
#: The base a fine-tune trains with, by the parent's base: the annotation loop is semi-supervised.
FINETUNE_BASE = {"supervised": "cps"}


@dataclass(frozen=True)
class Verdict:
    """The new version against its parent on the validation cases.

    Attributes:
        better: the mean Dice rose and no organ fell by more than :data:`WORSE_BY`.
        mean_before, mean_after: mean Dice over the organs validated (None when nothing was validated).
        worse: ``{organ: [before, after]}`` for the organs that fell by more than :data:`WORSE_BY`.
        summary: one sentence for people.
    """

    better: bool
    mean_before: float | None
    mean_after: float | None
    worse: dict[str, list[float]]
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "better": self.better,
            "mean_before": self.mean_before,
            "mean_after": self.mean_after,
            "worse": self.worse,
            "summary": self.summary,
        }


def compare_to_parent(before: dict[str, float], after: dict[str, float], validation: str) -> Verdict:
    """Say whether the fine-tuned weights beat the parent's on ``validation`` (e.g. "held-out reviewed case X")."""
    organs = sorted(set(before) & set(after))
    if not organs:
        return Verdict(
            False, None, None, {}, "Nothing was validated, so it is unknown whether the new version is better."
        )
    mean_before = sum(before[o] for o in organs) / len(organs)
    mean_after = sum(after[o] for o in organs) / len(organs)
    worse = {o: [round(before[o], 4), round(after[o], 4)] for o in organs if after[o] < before[o] - WORSE_BY}
    better = mean_after > mean_before and not worse
    change = f"mean Dice {mean_before:.3f} -> {mean_after:.3f} on the {validation}"
    if better:
        summary = f"Better than its parent: {change}."
    elif mean_after <= mean_before:
        summary = f"Not better than its parent ({change}): the new version keeps the parent's weights."
    else:
        fell = ", ".join(f"{o} {b:.3f} -> {a:.3f}" for o, (b, a) in worse.items())
        summary = f"Better on average ({change}) but worse on {fell}."
    return Verdict(better, round(mean_before, 4), round(mean_after, 4), worse, summary)


@dataclass
class FinetuneResult:
    """``status`` "completed" (then ``model`` is the new registered ref) or "cancelled" (nothing registered)."""

    status: str
    model: str | None
    before: dict[str, float]
    after: dict[str, float]
    output: Path
    verdict: Verdict | None = None


def finetune_config(
    bundle: ModelBundle,
    dataset_dir: Path,
    *,
    steps: int,
    device: str,
    rehearsal: str = "",
    overrides: dict[str, Any] | None = None,
) -> Config:
    """The training config of a fine-tune: the bundle's preprocessing, network and base; short schedule."""
    plan = bundle.preprocessing  # a bundle that records no orientation is refused here, before any work
    dataset = load_dataset(dataset_dir)
    check_same_labels(bundle, dataset.table, dataset_dir)
    if rehearsal:
        check_same_labels(bundle, load_dataset(rehearsal).table, rehearsal)
    reviewed = sorted(case.id for case in dataset.labeled)
    network = bundle.networks[0]
    scdl = {k: v for k, v in (bundle.scdl or {}).items() if k in SCDLConfig.__dataclass_fields__}
    return Config.from_dict(
        {
            "data": {
                "dataset": str(dataset_dir),
                "labels": dataset.table.name,
                "spacing": list(plan.spacing),
                "hu_window": list(plan.hu_window),
                "orientation": plan.orientation,
                "rehearsal": rehearsal,
                "val_cases": reviewed[-1:] if len(reviewed) >= MIN_CASES_TO_HOLD_OUT else [],
                "val_on_train": len(reviewed) < MIN_CASES_TO_HOLD_OUT,
            },
            "network": {
                "width": network["width"],
                "norm": network["norm"],
            },  # a prior-path net comes back through scdl.prior
            "ssl": {"base": FINETUNE_BASE.get(bundle.base, bundle.base)},
            "scdl": scdl or {"enabled": True},
            "train": {
                "steps": steps,
                "patch_size": list(bundle.patch_size),
                "lr": 0.005,
                "device": device,
                "val_every": max(steps // 3, 1),
                "checkpoint_every": max(steps // 10, 1),
            },
        },
        f"fine-tune of {bundle.ref}",
    ).with_overrides(overrides or {})


def check_same_labels(bundle: ModelBundle, table: LabelTable, dataset_dir: str | Path) -> None:
    """Refuse a dataset whose label maps use another table than the model's output (before any work is done).

    Raises:
        ValueError: naming both tables and how they differ. Another class count would crash the first step;
            another label set of the same size would train for minutes and register a model that learned
            the wrong organs.
    """
    differences = differences_text(table, bundle.labels)
    if differences:
        raise ValueError(
            f"{dataset_dir}: its label maps use the table {table.name!r} ({len(table)} organs), model {bundle.ref} "
            f"outputs {bundle.labels.name!r} ({len(bundle.labels)} organs); they differ: {differences}. Fine-tune a "
            "model of the same table, or store the cases in a dataset of the model's table. Nothing was trained."
        )


def bundle_weights_for_base(bundle: ModelBundle, base: str) -> dict[str, torch.Tensor]:
    """The bundle's weights as a state dict of the SSL base (``networks.i.*``; Mean Teacher's teacher too)."""
    state: dict[str, torch.Tensor] = {}
    for index, network in enumerate(bundle.build_networks("cpu")):
        for key, value in network.state_dict().items():
            state[f"networks.{index}.{key}"] = value
            if base == "mean_teacher":
                state[f"teacher.{key}"] = value
    return state


def default_run_folder(dataset_dir: Path, parent: ModelBundle, *, resume: bool) -> Path:
    """``DATASET/runs/finetune-NAME-vN``, then ``...-2``, ``...-3``: the first that holds no run (an earlier
    fine-tune of the same parent is never overwritten), or with ``resume`` the last unfinished run."""
    base = dataset_dir / "runs" / f"finetune-{parent.name}-v{parent.version}"
    folder, number, unfinished = base, 1, None
    while holds_run(folder):
        unfinished = unfinished if finished_run(folder) else folder
        number += 1
        folder = base.with_name(f"{base.name}-{number}")
    return unfinished if resume and unfinished is not None else folder


def finetune(
    model: str,
    dataset_dir: str | Path,
    *,
    registry: ModelRegistry,
    steps: int | None = None,
    output: str | Path | None = None,
    device: str = "auto",
    rehearsal: str = "",
    resume: bool = False,
    json_events: bool = False,
    cancel: threading.Event | None = None,
    overrides: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` (name, name@version or path) on a dataset store and register the result.

    Args:
        model: the parent bundle. dataset_dir: the store; its reviewed cases are the labeled data.
        registry: where the parent is looked up and the new version registered.
        steps: optimiser steps; None = :func:`scdlcore.training.config.default_finetune_steps` of the device.
        output: the run folder (default: :func:`default_run_folder`), which ``resume`` continues.
        rehearsal: another dataset folder whose labeled cases join training.
        json_events: JSON-lines progress on stdout. cancel: set it to stop cleanly (nothing is registered).
        overrides: dotted config overrides (``{"train.patch_size": [32, 32, 32]}``).
    """
    dataset_dir = Path(dataset_dir)
    parent = registry.resolve(model)
    if steps is None:
        steps = default_finetune_steps(resolve_device(device).type)
    config = finetune_config(parent, dataset_dir, steps=steps, device=device, rehearsal=rehearsal, overrides=overrides)
    output = Path(output) if output else default_run_folder(dataset_dir, parent, resume=resume)
    lineage = {"parent": parent.ref, "trained_on": f"fine-tune on {dataset_dir.name}"}
    trainer = Trainer(
        config,
        output,
        json_events=json_events,
        resume=resume,
        cancel=cancel,
        init_weights=bundle_weights_for_base(parent, config.ssl.base),
        # A one-network parent (starter@3 shipped one of its CPS pair): the child segments with its first network,
        # as fast as its parent; the second is kept for the disagreement that `dataset suggest` ranks by.
        bundle_meta={
            "name": parent.name,
            "labels": parent.labels.to_dict(),
            "ensemble": parent.ensemble if len(parent.networks) > 1 else "first",
            "description": f"{parent.name} fine-tuned from {parent.ref}",
        },
        final_event="trained",
    )
    result = trainer.run()
    validations = [h for h in trainer.history if h["event"] == "validation"]
    before = validations[0]["dice"] if validations else {}
    after = next((h["dice"] for h in validations if h["step"] == result.best_step), before)
    if result.status != "completed" or result.bundle is None:
        return FinetuneResult(result.status, None, before, after, output)
    verdict = compare_to_parent(before, after, _validation_text(config))
    _record_lineage(result.bundle, trainer, before, after, config, lineage)
    try:
        registered = registry.register(result.bundle)
    except OSError as err:  # a read-only or full registry: the trained bundle is kept in the run folder
        raise OSError(
            f"The fine-tuned model could not be registered ({err}). It is complete in {result.bundle}: "
            f"install it with `scdl models import {result.bundle}` once the registry can be written."
        ) from err
    if json_events:
        from scdlcore.events import Progress

        Progress(0, "finetune", json_lines=True).emit(
            "result", model=registered.ref, before=before, after=after, verdict=verdict.to_dict()
        )
    return FinetuneResult("completed", registered.ref, before, after, output, verdict)


def _validation_text(config: Config) -> str:
    held_out = config.data.val_cases
    return f"held-out reviewed case {held_out[0]}" if held_out else "training cases"


def _record_lineage(
    bundle_dir: Path, trainer: Trainer, before: dict, after: dict, config: Config, lineage: dict[str, Any]
) -> None:
    """Write the exported bundle's lineage and metrics (before/after Dice, what was validated on)."""
    exported = load_bundle(bundle_dir)
    update_bundle_metadata(
        bundle_dir,
        lineage={**exported.lineage, **lineage, "data_fingerprint": trainer.data_fingerprint, "steps": trainer.step},
        metrics={
            **exported.metrics,
            "before_dice": before,
            "after_dice": after,
            "validation": _validation_text(config),
        },
    )
