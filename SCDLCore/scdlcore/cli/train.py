"""``scdl train``: train SCDL from a config file (also under ``torchrun --nproc_per_node N``)."""

from __future__ import annotations

import argparse

from scdlcore.cli.options import add_events_option

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a config file (CPS/Mean Teacher + SCDL)",
        description="Train SCDL semi-supervised segmentation. Every setting lives in the config file "
        "(see --print-config); --set overrides single keys. Under torchrun the same command trains with DDP.",
    )
    parser.add_argument("--config", help="YAML or JSON config file")
    parser.add_argument("-o", "--output", help="run folder: checkpoints, history, curves.png, exported bundle (model/)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.safetensors")
    add_events_option(parser)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key, value in JSON (e.g. --set train.steps=500 --set scdl.p2e='\"classes\"')",
    )
    parser.add_argument("--print-config", action="store_true", help="print every config key with its default and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scdlcore.training.config import config_reference, load_config, parse_override

    if args.print_config:
        print(config_reference())
        return 0
    if not args.config or not args.output:
        raise ValueError("scdl train needs --config FILE and --output DIR (or --print-config).")
    from scdlcore.training.trainer import Trainer

    config = load_config(args.config).with_overrides(dict(parse_override(item) for item in args.set))
    result = Trainer(config, args.output, json_events=args.events, resume=args.resume).run()
    if not args.events:
        best = "n/a" if result.best_mean_dice is None else f"{result.best_mean_dice:.3f} at step {result.best_step}"
        print(
            f"{result.status} at step {result.step}; best validation mean Dice {best}; "
            f"bundle: {result.bundle or 'none'}"
        )
    return 0 if result.status == "completed" else 130
