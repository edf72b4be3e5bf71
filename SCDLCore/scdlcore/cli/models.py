"""``scdl models``: list, inspect, import, export and remove installed model bundles."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from scdlcore.cli.options import add_json_option, add_models_dir_option

if TYPE_CHECKING:
    from scdlcore.bundle.format import ModelBundle

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="manage installed models (list, info, import, export, remove)",
        description="Installed models live in a registry folder ($SCDL_MODELS_DIR, else the user data folder, "
        "e.g. ~/.local/share/scdl/models). Address a model as NAME (its latest version) or NAME@VERSION.",
    )
    common = argparse.ArgumentParser(add_help=False)
    add_models_dir_option(common)
    add_json_option(common)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="installed models and versions")
    info = actions.add_parser("info", parents=[common], help="a model's description (verifies its weights)")
    info.add_argument("name", help="NAME, NAME@VERSION or a bundle path")
    add = actions.add_parser("import", parents=[common], help="install a bundle folder or .scdlmodel archive")
    add.add_argument("path", help="bundle folder or .scdlmodel archive")
    export = actions.add_parser("export", parents=[common], help="write a model as one .scdlmodel archive")
    export.add_argument("name", help="NAME or NAME@VERSION")
    export.add_argument("dest", help="archive path, or an existing folder")
    remove = actions.add_parser("remove", parents=[common], help="uninstall NAME@VERSION, or every version of NAME")
    remove.add_argument("name", help="NAME or NAME@VERSION")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scdlcore.bundle.registry import ModelRegistry

    registry = ModelRegistry(args.models_dir)
    if args.action == "list":
        entries = registry.list()
        if args.json:
            _print_json([entry.to_dict() for entry in entries])
        elif not entries:
            print(f"No models installed in {registry.root}. Install one with `scdl models import PATH`.")
        else:
            for entry in entries:
                builtin = " (built-in)" if entry.builtin else ""
                print(
                    f"{entry.ref:<24} {entry.num_classes - 1:>2} organs  {entry.base:<12} {entry.created:<25} "
                    f"{entry.description}{builtin}"
                )
        return 0
    if args.action == "info":
        bundle = registry.resolve(args.name)
        if args.json:
            _print_json({**bundle.to_dict(), "path": str(bundle.path)})
        else:
            _print_info(bundle)
        return 0
    if args.action == "import":
        bundle = registry.import_(args.path)
        _report(args.json, {"ref": bundle.ref, "path": str(bundle.path)}, f"Installed {bundle.ref} in {bundle.path}")
        return 0
    if args.action == "export":
        path = registry.export(args.name, args.dest)
        _report(args.json, {"path": str(path)}, f"Exported {args.name} to {path}")
        return 0
    removed = registry.remove(args.name)
    _report(args.json, {"removed": removed}, f"Removed {', '.join(removed)}")
    return 0


def _print_info(bundle: ModelBundle) -> None:
    lineage = bundle.lineage
    rows = [
        ("model", bundle.ref),
        ("path", bundle.path),
        ("description", bundle.description),
        ("created", bundle.created),
        ("base", f"{bundle.base}, {len(bundle.networks)} network(s), ensemble {bundle.ensemble}"),
        ("networks", "; ".join(json.dumps(net) for net in bundle.networks)),
        (
            "labels",
            f"{bundle.labels.name}: " + ", ".join(f"{label.value} {label.name}" for label in bundle.labels.labels),
        ),
        ("spacing (mm)", " x ".join(f"{s:g}" for s in bundle.spacing)),
        ("HU window", f"[{bundle.hu_window[0]:g}, {bundle.hu_window[1]:g}]"),
        ("orientation", bundle.orientation or "none recorded: trained on file axes, cannot segment (retrain it)"),
        ("patch size", " x ".join(str(p) for p in bundle.patch_size)),
        ("SCDL", "on" if bundle.scdl else "off"),
        (
            "lineage",
            f"parent {lineage.get('parent')}, {lineage.get('steps')} steps, trained on {lineage.get('trained_on')!r}",
        ),
        ("metrics", json.dumps(bundle.metrics)),
        ("sha256", bundle.sha256.get("weights.safetensors", "")),
    ]
    for key, value in rows:
        print(f"{key + ':':<14} {value}")


def _report(as_json: bool, data: dict[str, Any], text: str) -> None:
    if as_json:
        _print_json(data)
    else:
        print(text)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))
