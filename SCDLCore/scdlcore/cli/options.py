"""The options several sub-commands share, declared once: ``--device``, ``--models-dir``, ``--events``, ``--json``."""

from __future__ import annotations

import argparse

from scdlcore.device import check_device_name

__all__ = ["add_device_option", "add_events_option", "add_json_option", "add_models_dir_option"]


def add_device_option(parser: argparse.ArgumentParser, what: str = "") -> None:
    """``--device auto|cpu|cuda|cuda:N`` (default auto); ``what`` ends the help, e.g. " (with --model)"."""
    parser.add_argument(
        "--device",
        type=_device_name,
        default="auto",
        metavar="{auto,cpu,cuda,cuda:N}",
        help=f"auto = the GPU when PyTorch sees one, else CPU; cuda:N = GPU number N (default: auto){what}",
    )


def add_models_dir_option(parser: argparse.ArgumentParser) -> None:
    """``--models-dir DIR``: the model registry folder."""
    parser.add_argument(
        "--models-dir", metavar="DIR", help="model registry folder (default: $SCDL_MODELS_DIR or the user data folder)"
    )


def add_events_option(parser: argparse.ArgumentParser) -> None:
    """``--events``: JSON-lines events on stdout (what the Slicer module reads) in place of the progress bar."""
    parser.add_argument(
        "--events", action="store_true", help="JSON lines on stdout instead of a progress bar (for programs)"
    )


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json``: the result as one JSON document on stdout in place of text."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of text (for programs)")


def _device_name(value: str) -> str:
    try:
        return check_device_name(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
