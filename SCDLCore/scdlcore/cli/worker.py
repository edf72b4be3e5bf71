"""``scdl worker``: keep a model loaded and answer JSON-lines requests on stdin (for the Slicer panel)."""

from __future__ import annotations

import argparse

from scdlcore.cli.options import add_device_option, add_models_dir_option

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="serve JSON-lines requests on stdin/stdout with a loaded model (used by the Slicer panel)",
        description="A long-lived process for programs: loads the model once, then answers one JSON request per line "
        "(segment, add_case, finetune, cancel, status, shutdown) with JSON events carrying the request id. "
        "See the README's 'Worker protocol' section.",
    )
    parser.add_argument("--model", default="starter", help="model name, name@version or bundle path (default: starter)")
    add_device_option(parser)
    add_models_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scdlcore.worker import main

    return main(args.model, args.device, args.models_dir)
