"""``scdl finetune``: adapt a model to a dataset store (reviewed cases labeled, the others unlabeled)."""

from __future__ import annotations

import argparse

from scdlcore.cli.options import add_device_option, add_events_option, add_models_dir_option

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from scdlcore.training.config import DEFAULT_FINETUNE_STEPS as DEFAULT_STEPS

    defaults = ", ".join(
        f"{steps} on {device.upper() if device == 'cpu' else 'a GPU'}" for device, steps in DEFAULT_STEPS.items()
    )
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on a dataset store and register the result as a new version",
        description="Fine-tune a model semi-supervised on a dataset store: reviewed (corrected) cases are labeled, "
        "the other cases unlabeled. Ends by registering a new version of the model whose lineage names its parent "
        "and the before/after Dice per organ. Ctrl-C stops cleanly "
        "(nothing registered, checkpoint kept; --resume continues).",
    )
    parser.add_argument("--dataset", required=True, help="dataset store folder (scdl dataset init)")
    parser.add_argument(
        "--model", default="starter", help="parent model: name, name@version or bundle path (default: starter)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"optimiser steps (default: {defaults}; more adapts further but takes longer)",
    )
    parser.add_argument(
        "--rehearsal", default="", help="another dataset folder whose labeled cases also train (keeps old knowledge)"
    )
    parser.add_argument(
        "--output",
        help="run folder (default DATASET/runs/finetune-NAME-vVERSION, or -2, -3...: "
        "a folder that holds a run is never reused; --resume continues the last unfinished one)",
    )
    add_device_option(parser)
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted fine-tune from its last checkpoint"
    )
    add_events_option(parser)
    add_models_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scdlcore.bundle.registry import ModelRegistry
    from scdlcore.training.finetune import finetune

    result = finetune(
        args.model,
        args.dataset,
        registry=ModelRegistry(args.models_dir),
        steps=args.steps,
        output=args.output,
        device=args.device,
        rehearsal=args.rehearsal,
        resume=args.resume,
        json_events=args.events,
    )
    if result.status != "completed":
        if not args.events:
            print(
                f"Cancelled; nothing registered. Continue with: scdl finetune ... --resume (run folder {result.output})"
            )
        return 130
    if not args.events:
        print(f"Registered {result.model}. {result.verdict.summary}")
        print(f"{'organ':32s} {'before':>7s} {'after':>7s}")
        for organ in sorted(set(result.before) | set(result.after)):
            b, a = result.before.get(organ), result.after.get(organ)
            print(f"{organ:32s} {'-' if b is None else f'{b:.3f}':>7s} {'-' if a is None else f'{a:.3f}':>7s}")
    return 0
