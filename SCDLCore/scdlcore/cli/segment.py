"""``scdl segment``: segment the abdominal organs of one CT, write a label map or Slicer segmentation."""

from __future__ import annotations

import argparse
import time

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment the organs of a CT (file or DICOM folder)",
        description="Segment a CT with a model bundle. The output lies exactly on the input's voxel grid; it is "
        "a 3D Slicer segmentation (.seg.nrrd: organ names, colors, terminology) or a plain label map "
        "(.nii.gz, .nii, .nrrd, .mha) holding the label table's values. Prints each organ's volume in mL.",
    )
    parser.add_argument("input", help="CT image (.nrrd, .nii, .nii.gz, .mha) or a folder holding one DICOM series")
    parser.add_argument("-o", "--output", required=True, help="output .seg.nrrd, or label map .nii.gz/.nii/.nrrd/.mha")
    parser.add_argument("--model", default="starter",
                        help="installed model NAME or NAME@VERSION, or a bundle folder/.scdlmodel path (default: starter)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = the GPU when PyTorch sees one, else CPU (default: auto)")
    parser.add_argument("--organs", nargs="+", metavar="ORGAN",
                        help="keep only these organs (machine names, e.g. liver spleen); default: all")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="sliding-window overlap in [0, 1): more is smoother and slower (default: 0.5)")
    parser.add_argument("--overview", metavar="PNG", help="also write an axial/coronal/sagittal montage")
    parser.add_argument("--events", action="store_true", help="JSON lines on stdout instead of a progress bar (for programs)")
    parser.add_argument("--models-dir", metavar="DIR", help="model registry folder (default: $SCDL_MODELS_DIR or the user data folder)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bundle import ModelRegistry
    from ..events import Progress
    from ..infer import Predictor, check_organs, organ_volumes_ml
    from ..io import read_image, write_label
    from ..train import resolve_device

    start = time.monotonic()
    progress = None
    try:
        device = resolve_device(args.device)
        bundle = ModelRegistry(args.models_dir).resolve(args.model)
        check_organs(bundle.labels, args.organs)
        predictor = Predictor(bundle, device, overlap=args.overlap)
        image = read_image(args.input)
        progress = Progress(total=100, stage="segment", json_lines=args.events)
        labels = predictor.predict_volume(image, organs=args.organs, progress=progress)
        write_label(args.output, labels, bundle.labels)
        if args.overview:
            from ..overview import save_overview

            save_overview(args.overview, image, labels, bundle.labels)
    except Exception as err:
        if args.events:  # the human form is printed by scdl's main
            (progress or Progress(total=0, stage="segment", json_lines=True)).emit(
                "error", message=str(err), error=type(err).__name__
            )
        raise
    finally:
        if progress is not None:
            progress.close()
    volumes = organ_volumes_ml(labels, bundle.labels)
    kept = args.organs or bundle.labels.names
    seconds = time.monotonic() - start
    if args.events:
        progress.emit("result", output=str(args.output), overview=args.overview, model=bundle.ref, device=str(device),
                      seconds=seconds, volumes_ml={name: volumes[name] for name in kept})
        return 0
    print(f"Segmented {args.input} with {bundle.ref} on {device} in {seconds:.1f} s -> {args.output}")
    if args.overview:
        print(f"Overview: {args.overview}")
    width = max(len(bundle.labels[name].display_name) for name in kept)
    print(f"{'organ':<{width}}  volume (mL)")
    for name in kept:
        print(f"{bundle.labels[name].display_name:<{width}}  {volumes[name]:11.1f}")
    return 0

