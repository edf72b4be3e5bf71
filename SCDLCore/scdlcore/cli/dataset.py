"""``scdl dataset``: create a dataset folder, add, list and remove cases, suggest which to correct next."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from scdlcore.cli.options import add_device_option, add_json_option, add_models_dir_option

if TYPE_CHECKING:
    from scdlcore.dataset.manifest import Case
    from scdlcore.dataset.store import DatasetStore

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dataset",
        help="manage a dataset folder (init, add, import, list, remove, suggest)",
        description="A dataset folder holds CT images and label maps (re-written as NIfTI: geometry and voxels only, "
        "no DICOM tags) and the dataset.json manifest. Writes are atomic and locked, so the Slicer panel and this "
        "command can add cases at the same time.",
    )
    common = argparse.ArgumentParser(add_help=False)
    add_json_option(common)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    init = actions.add_parser("init", parents=[common], help="create an empty dataset folder (or open the one there)")
    init.add_argument("dir", help="dataset folder (created if missing)")
    init.add_argument("--labels", default="synapse13", help="label table of the label maps (default: synapse13)")

    add = actions.add_parser(
        "add",
        parents=[common],
        help="add a case: a CT and, optionally, its label map",
        description="Add a case. One CT is one case: without --id, a CT the folder already holds (the same voxels) "
        "updates that case when a label map comes with it, and is refused without one.",
    )
    add.add_argument("dir", help="dataset folder")
    add.add_argument("image", help="CT image (.nrrd, .nii, .nii.gz, .mha) or a folder holding one DICOM series")
    add.add_argument(
        "--label",
        help="label map on the image's grid (.nii.gz, .nrrd, .mha, or a Slicer .seg.nrrd); "
        "without it the case is unlabeled",
    )
    add.add_argument(
        "--id", dest="case_id", metavar="ID", help="opaque case id, never a patient name (default: the next caseNNNN)"
    )
    add.add_argument(
        "--reviewed",
        nargs="+",
        metavar="ORGAN",
        help="only these organs were checked (e.g. liver spleen); default: every organ",
    )
    add.add_argument("--source", default="", help="where the case comes from, free text (no patient names)")
    add.add_argument("--model", help="model version that first segmented the case (NAME@VERSION)")
    add.add_argument("--replace", action="store_true", help="overwrite the case with this id if it exists")
    add.add_argument(
        "--force",
        action="store_true",
        help="store an image that does not look like a CT in HU (no voxel below -500), refused otherwise",
    )

    bulk = actions.add_parser(
        "import",
        parents=[common],
        help="add every CT of a folder, with the label maps of another folder",
        description="Add every CT of IMAGES (image files, and subfolders as DICOM series) as a case, with the label "
        "map of the same name from --labels (case01.nii.gz for case01.nrrd, or for nnU-Net's case01_0000.nii.gz); "
        "CTs without one are unlabeled. Ids are new (caseNNNN): file names can hold patient names. A CT the folder "
        "holds already is updated with its label map, or kept, so an interrupted import can simply be run again. "
        "A CT that cannot be added is reported and the others go on; the exit code is then 1.",
    )
    bulk.add_argument("dir", help="dataset folder (created if missing)")
    bulk.add_argument("images", help="folder of CT images (.nrrd, .nii, .nii.gz, .mha) or DICOM series subfolders")
    bulk.add_argument(
        "--labels", help="folder of label maps named after their images (Synapse-13 values, or .seg.nrrd)"
    )
    bulk.add_argument("--source", default="", help="where the cases come from, free text (no patient names)")
    bulk.add_argument("--force", action="store_true", help="store images that do not look like CT in HU too")

    listing = actions.add_parser("list", parents=[common], help="the cases: labeled, partial or unlabeled")
    listing.add_argument("dir", help="dataset folder")

    remove = actions.add_parser("remove", parents=[common], help="remove a case and its files")
    remove.add_argument("dir", help="dataset folder")
    remove.add_argument("case_id", metavar="ID", help="case id")

    suggest = actions.add_parser(
        "suggest",
        parents=[common],
        help="rank unlabeled cases by how much correcting them would help",
        description="Score every unlabeled case with a model: CPS bundles by the disagreement of their two networks, "
        "one-network bundles by the entropy of the softmax; the cases where the model is least sure come first.",
    )
    suggest.add_argument("dir", help="dataset folder")
    suggest.add_argument(
        "--model", required=True, help="installed model NAME or NAME@VERSION, or a bundle folder/.scdlmodel path"
    )
    suggest.add_argument("--top", type=int, help="show only the N best cases (default: all)")
    add_device_option(suggest)
    add_models_dir_option(suggest)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scdlcore.dataset.store import DatasetStore

    if args.action == "init":
        store = DatasetStore.init(args.dir, labels=args.labels)
        _report(
            args.json,
            {"root": str(store.root), "labels": store.table.name, "counts": store.counts()},
            f"Dataset {store.root} (label table {store.table.name}): {_summary(store.counts())}",
        )
        return 0
    if args.action == "import":
        return _import(args)
    store = DatasetStore(args.dir)
    if args.action == "add":
        before = {case.id: case.status for case in store.cases()}
        case = store.add(
            args.image,
            args.label,
            case_id=args.case_id,
            reviewed=args.reviewed,
            source=args.source,
            model=args.model,
            replace=args.replace,
            force=args.force,
        )
        previous = before.get(case.id)
        if previous is None:
            text = f"Added {case.id} ({case.status}{_reviewed_note(case)}) to {store.root}"
        else:
            text = f"Updated {case.id} in {store.root}: was {previous}, now {case.status}{_reviewed_note(case)}"
        _report(args.json, {**_case_dict(case), "previous": previous}, text)
        return 0
    if args.action == "list":
        _list(store, args.json)
        return 0
    if args.action == "remove":
        case = store.remove(args.case_id)
        _report(args.json, {"removed": case.id}, f"Removed {case.id} from {store.root}")
        return 0
    return _suggest(store, args)


def _import(args: argparse.Namespace) -> int:
    """Add every CT of a folder; one that fails is reported and the others go on (exit code 1)."""
    from scdlcore.dataset.manifest import CTAlreadyStored
    from scdlcore.dataset.store import DatasetStore, pair_cases
    from scdlcore.events import Progress

    pairs = pair_cases(args.images, args.labels)
    store = DatasetStore.init(args.dir)
    progress = Progress(len(pairs), "import", enabled=not args.json)
    outcomes = []
    statuses = {case.id: case.status for case in store.cases()}  # kept current: a later file may update an earlier one
    for done, (name, image, label) in enumerate(pairs, start=1):
        outcome = {"name": name, "image": str(image), "label": None if label is None else str(label)}
        try:
            case = store.add(image, label, source=args.source, force=args.force)
            outcome.update(case_id=case.id, status=case.status, previous=statuses.get(case.id))
            statuses[case.id] = case.status
        except CTAlreadyStored as err:
            outcome.update(case_id=err.case.id, status=err.case.status, previous=err.case.status)
        except ValueError as err:  # a bad file; its message names it
            outcome.update(case_id=None, status="failed", previous=None, error=str(err))
            progress.emit("failed", message=str(err))
        outcomes.append(outcome)
        progress.update(done)
    progress.close()
    failed = sum(outcome["status"] == "failed" for outcome in outcomes)
    added = sum(outcome["previous"] is None and outcome["status"] != "failed" for outcome in outcomes)
    text = (
        f"Imported {len(pairs)} CT(s) into {store.root}: {added} added, {len(pairs) - added - failed} already there "
        f"(updated when a label map came), {failed} failed. The dataset: {_summary(store.counts())}"
    )
    _report(args.json, {"root": str(store.root), "cases": outcomes, "counts": store.counts()}, text)
    return 1 if failed else 0


def _list(store: DatasetStore, as_json: bool) -> None:
    dataset = store.dataset()
    if as_json:
        _print_json(
            {
                "root": str(store.root),
                "labels": dataset.table.name,
                "counts": dataset.counts(),
                "fingerprint": store.fingerprint(),
                "cases": [_case_dict(case) for case in dataset.cases],
            }
        )
        return
    rows = [("id", "status", "reviewed", "added", "source")]
    for case in dataset.cases:
        reviewed = "-" if case.status == "unlabeled" else "all" if case.reviewed is None else ", ".join(case.reviewed)
        rows.append((case.id, case.status, reviewed, case.added or "-", case.source or "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)) + "  " + row[-1])
    print(f"{len(dataset.cases)} case(s): {_summary(dataset.counts())} (label table {dataset.table.name})")


def _suggest(store: DatasetStore, args: argparse.Namespace) -> int:
    from scdlcore.bundle.registry import ModelRegistry
    from scdlcore.device import resolve_device

    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}.")
    bundle = ModelRegistry(args.models_dir).resolve(args.model)
    suggestions = store.suggest(bundle, resolve_device(args.device), top=args.top)
    if args.json:
        _print_json({"model": bundle.ref, "suggestions": [s.to_dict() for s in suggestions]})
    elif not suggestions:
        print(f"No unlabeled case in {store.root}: nothing to suggest.")
    else:
        print(f"Cases to correct next, by {bundle.ref} ({suggestions[0].measure}):")
        for rank, suggestion in enumerate(suggestions, start=1):
            print(f"{rank:>3}. {suggestion.case_id}: {suggestion.reason}")
    return 0


def _case_dict(case: Case) -> dict[str, Any]:
    return {**case.to_dict(), "status": case.status}


def _reviewed_note(case: Case) -> str:
    return f": {', '.join(case.reviewed)}" if case.status == "partial" and case.reviewed else ""


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {status}" for status, count in counts.items())


def _report(as_json: bool, data: dict[str, Any], text: str) -> None:
    if as_json:
        _print_json(data)
    else:
        print(text)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))
