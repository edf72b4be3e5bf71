"""The ``scdl`` command: one entry point, one module per sub-command.

Each sub-command module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a ``run(args) -> int`` function. Sub-command modules import heavy libraries
(torch, SimpleITK) inside ``run`` so that ``scdl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from scdlcore import __version__

__all__ = ["UserError", "build_parser", "main"]


#: Sub-command modules of this package, in the order ``scdl --help`` lists them.
_COMMAND_MODULES = ("segment", "train", "finetune", "evaluate", "models", "dataset", "sample_data", "worker")


class UserError(Exception):
    """A problem the user can fix (bad file, bad option); printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scdl",
        description="SCDL Segment: semi-supervised CT organ segmentation "
        "(train, segment, fine-tune, evaluate, manage models).",
    )
    parser.add_argument("--version", action="version", version=f"scdl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``scdl``; returns the process exit code (0 ok, 1 failure (a file that cannot be written too),
    2 bad input, 130 cancelled)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s")
    with warnings.catch_warnings():  # the caller's warning display is restored afterwards
        warnings.showwarning = functools.partial(_show_warning, args.command)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The sub-command, its errors turned into exit codes and one line for people."""
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as err:
        _report_error(args, err)
        return 2
    except OSError as err:  # a folder that cannot be written, a full disk: the message names the path
        _report_error(args, err)
        return 1
    except KeyboardInterrupt:
        print(f"scdl {args.command}: cancelled", file=sys.stderr)
        return 130
    except Exception as err:  # a bug or e.g. CUDA out of memory: the traceback stays, programs still get the event
        _emit_error_event(args, err)
        raise


def _show_warning(command: str, message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    """A warning as one plain line for people (the message names the file), not Python's source-line format."""
    print(f"scdl {command}: warning: {message}", file=sys.stderr)


def _report_error(args: argparse.Namespace, err: Exception) -> None:
    """One line for people on stderr; with ``--events`` also an ``error`` event on stdout for programs."""
    _emit_error_event(args, err)
    print(f"scdl {args.command}: error: {err}", file=sys.stderr)


def _emit_error_event(args: argparse.Namespace, err: Exception) -> None:
    if getattr(args, "events", False):
        from scdlcore.events import Progress

        Progress(0, args.command, json_lines=True).emit("error", message=str(err), error=type(err).__name__)
