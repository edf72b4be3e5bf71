r"""Time and peak memory of ``scdl segment`` vs a plain MONAI sliding-window pipeline on a 512x512x300 CT.

The CT is the real ``ct_abdomen`` sample (3 mm) resampled to 512x512x300 voxels over the same body
(about 0.71 x 0.59 x 1.12 mm). Both pipelines use the same bundle, the same volume and the same device.
The bundle is a CPS pair of VNets with random weights (timing only, not a model), or with ``--model`` a
trained one: its organs have real borders, which is what the return to the input grid costs.

- ``scdl segment``: the command itself, in-process (``scdlcore.cli.main``): read, body crop,
  resample, sliding window with on-device Gaussian accumulation (bf16 + channels-last-3d on CUDA),
  label-aware return to the input grid in slabs, write ``.seg.nrrd``;
- ``MONAI baseline``: read, resample, ``monai.inferers.sliding_window_inference`` (Gaussian, same
  overlap and batch, fp32), softmax, trilinear upsampling of all class probabilities to the full
  input resolution (C x 300 x 512 x 512 floats), argmax, write ``.seg.nrrd``.

Each runs in its own child process, so the peak resident memory (and peak CUDA memory) is its own;
time is the wall time of the pipeline inside the child, after imports. The random head is scaled
so that many classes win somewhere, as with a real model (the return to the input grid costs more
with more classes present).

Usage (with SCDLCore importable, e.g. ``PYTHONPATH=SCDLCore``)::

    python Testing/Benchmarks/bench_segment.py --out Testing/Benchmarks/results/segment_cpu.md   # CPU: width 4, 3 mm
    python Testing/Benchmarks/bench_segment.py --device cuda   # VNet-16 CPS, 1.5x1.5x2 mm
    python Testing/Benchmarks/bench_segment.py --model starter --repeat 3 \
        --out Testing/Benchmarks/results/segment_starter_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import median_cell, table_head, write_table

SHAPE = (300, 512, 512)  # (D, H, W)


def main() -> None:
    args = _parse()
    if args.child:
        print(json.dumps(_child(args)))
        return
    with tempfile.TemporaryDirectory(prefix="scdl-bench-") as tmp:
        ct = _make_ct(Path(tmp))
        bundle = _trained_bundle(args) if args.model else _make_bundle(Path(tmp), args)
        runs: dict[str, list[dict]] = {"scdl segment": [], "MONAI baseline": []}
        for _ in range(args.repeat):  # the pipelines take turns, so a slow spell of the machine hits both
            for name, done in runs.items():
                done.append(_run_child(name, ct, bundle, Path(tmp) / f"{name.split()[0].lower()}.seg.nrrd", args))
        results = {name: _summary(done) for name, done in runs.items()}
        agreement = _agreement(ct, *(Path(tmp) / f"{n}.seg.nrrd" for n in ("scdl", "monai")))
    table = _table(results, agreement, args)
    print(table)
    write_table(table, args.out)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--width", type=int, help="VNet width (default: 4 on CPU, 16 on CUDA)")
    parser.add_argument(
        "--spacing", type=float, nargs=3, help="model spacing x y z mm (default: 3 3 3 on CPU, 1.5 1.5 2 on CUDA)"
    )
    parser.add_argument("--patch", type=int, default=96, help="patch edge in voxels (default: 96)")
    parser.add_argument(
        "--model",
        help="a trained model (installed name or bundle path) instead of random weights; "
        "its spacing, patch and networks replace --width, --spacing and --patch",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each pipeline; the table gives the median time")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--child", choices=("scdl", "monai"), help=argparse.SUPPRESS)
    parser.add_argument("--ct", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.width = args.width or (16 if cuda else 4)
    args.spacing = tuple(args.spacing or ((1.5, 1.5, 2.0) if cuda else (3.0, 3.0, 3.0)))
    return args


def _make_ct(folder: Path) -> Path:
    """The ct_abdomen sample resampled to 512x512x300 over the same extent, as int16 HU in NRRD."""
    from scdlcore.io.read import read_image
    from scdlcore.io.volume import resample_volume
    from scdlcore.io.write import write_image
    from scdlcore.sample_data import fetch_sample

    source = read_image(fetch_sample("ct_abdomen").image)
    old = np.array(source.spacing)
    new = old * np.array(source.shape[::-1]) / np.array(SHAPE[::-1])
    origin = np.array(source.origin) + np.array(source.direction).reshape(3, 3) @ ((new - old) / 2)
    ct = resample_volume(source, shape=SHAPE, spacing=new, origin=origin, direction=source.direction, is_label=False)
    path = folder / "ct512.nrrd"
    write_image(path, ct.with_array(np.round(ct.array).astype(np.int16)))
    return path


def _make_bundle(folder: Path, args: argparse.Namespace) -> Path:
    import torch

    from scdlcore.bundle.format import save_bundle
    from scdlcore.labels import SYNAPSE13
    from scdlcore.nets import VNet

    args.description = f"a CPS pair of VNet-{args.width} with random weights (a timing stand-in, not a model)"
    torch.manual_seed(0)
    networks = [VNet(num_classes=SYNAPSE13.num_classes, width=args.width) for _ in range(2)]
    with torch.no_grad():
        for net in networks:
            net.head.weight.mul_(20.0)  # random features then pick many different classes
    return save_bundle(
        folder / "bundle",
        networks,
        name="bench",
        labels=SYNAPSE13,
        spacing=args.spacing,
        hu_window=(-125, 275),
        patch_size=(args.patch,) * 3,
        base="cps",
        description="benchmark stand-in: random weights, not a model",
    )


def _trained_bundle(args: argparse.Namespace) -> Path:
    """The folder of ``args.model``; its settings go into ``args`` for the table."""
    from scdlcore.bundle.registry import ModelRegistry

    bundle = ModelRegistry().resolve(args.model)
    args.spacing, args.patch = bundle.spacing, tuple(bundle.patch_size)
    args.width = bundle.networks[0].get("width", args.width)
    args.description = f"the trained model {bundle.name}@{bundle.version} ({len(bundle.networks)} x VNet-{args.width})"
    return bundle.path


def _run_child(name: str, ct: Path, bundle: Path, output: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        name.split()[0].lower(),
        "--ct",
        str(ct),
        "--bundle",
        str(bundle),
        "--output",
        str(output),
        "--device",
        args.device,
        "--width",
        str(args.width),
    ]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    """The median time (and every run's) and the largest memory peaks of a pipeline's runs."""
    seconds = [run["seconds"] for run in runs]
    gpu = [run["peak_gpu_mib"] for run in runs if run["peak_gpu_mib"] is not None]
    return {
        "seconds": float(np.median(seconds)),
        "every_seconds": seconds,
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "start_rss_mib": max(run["start_rss_mib"] for run in runs),
        "peak_gpu_mib": max(gpu) if gpu else None,
    }


def _child(args: argparse.Namespace) -> dict:
    import torch

    if args.child == "scdl":
        import scdlcore.cli.segment  # noqa: F401  (imports are not timed)
    else:
        import monai.inferers  # noqa: F401
    start_rss = _peak_rss_mib()
    start = time.perf_counter()
    if args.child == "scdl":
        from scdlcore.cli import main as scdl

        code = scdl(
            ["segment", str(args.ct), "-o", str(args.output), "--model", str(args.bundle), "--device", args.device]
        )
        if code:
            raise SystemExit(code)
    else:
        _monai_pipeline(args)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "start_rss_mib": start_rss, "peak_gpu_mib": gpu}


def _monai_pipeline(args: argparse.Namespace) -> None:
    """The plain pipeline: everything at full resolution in float, as commonly written."""
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from scdlcore.bundle.format import load_bundle
    from scdlcore.io.read import read_image
    from scdlcore.io.write import write_label
    from scdlcore.preprocess import hu_window, resample_to_spacing

    device = torch.device(args.device)
    bundle = load_bundle(args.bundle)
    networks = bundle.build_networks(device)
    ct = read_image(args.ct)
    work = resample_to_spacing(ct, bundle.spacing, is_label=False)
    image = torch.from_numpy(hu_window(work.array, bundle.hu_window))[None, None].to(device)

    def mean_logits(patches: torch.Tensor) -> torch.Tensor:
        return sum(net(patches)[0] for net in networks) / len(networks)

    with torch.inference_mode():
        logits = sliding_window_inference(
            image, bundle.patch_size, 4 if device.type == "cuda" else 1, mean_logits, overlap=0.5, mode="gaussian"
        )
        probs = torch.softmax(logits, dim=1)
        full = F.interpolate(probs, size=ct.shape, mode="trilinear", align_corners=False)  # (1, C, D, H, W)
        classes = full.argmax(1)[0].to(torch.uint8).cpu().numpy()
    write_label(args.output, ct.with_array(bundle.labels.classes_to_values(classes)), bundle.labels)


def _agreement(ct: Path, ours: Path, baseline: Path) -> dict:
    """Voxels with equal labels inside the body box (outside it, ours is background by design)."""
    from scdlcore.io.read import read_image, read_label
    from scdlcore.preprocess import body_bbox

    box = body_bbox(read_image(ct))
    a, b = read_label(ours).array[box], read_label(baseline).array[box]
    return {"equal": float(np.mean(a == b)), "organs": len(set(np.unique(a).tolist()) - {0})}


def _peak_rss_mib() -> float:
    """This process's peak resident memory. Linux: VmHWM, which (unlike ru_maxrss) is not inherited
    from the parent across fork + exec."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def _table(results: dict, agreement: dict, args: argparse.Namespace) -> str:
    baseline = results["MONAI baseline"]["seconds"]
    spacing = " x ".join(f"{s:g}" for s in args.spacing)
    patch = " x ".join(map(str, args.patch)) if isinstance(args.patch, tuple) else f"{args.patch}^3"
    title = (
        f"`scdl segment` vs a plain MONAI pipeline: 512x512x300 CT (ct_abdomen resampled), {args.description}, "
        f"model spacing {spacing} mm, patch {patch}, overlap 0.5, device {args.device}"
    )
    columns = [
        "pipeline",
        "time (s){runs}",
        "speed-up",
        "peak RSS (MiB)",
        "RSS after imports (MiB)",
        "peak GPU memory (MiB)",
    ]
    lines = table_head(title, args.device, columns, args.repeat)
    for name, r in results.items():
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        lines.append(
            f"| {name} | {median_cell(r['every_seconds'])} | {baseline / r['seconds']:.2f}x | "
            f"{r['peak_rss_mib']:.0f} | {r['start_rss_mib']:.0f} | {gpu} |"
        )
    lines += [
        "",
        f"Inside the body box the two label maps agree on {100 * agreement['equal']:.2f}% of the voxels "
        f"({agreement['organs']} organs present); they differ only at borders, "
        "where trilinear upsampling of probabilities "
        "and ours interpolate slightly differently. Peak RSS "
        "includes the Python, torch and MONAI imports (the 'after imports' column).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
