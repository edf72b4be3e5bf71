"""Speed and peak memory of one CPS + GA + SCDL training step: our defaults vs a plain fp32 eager step.

Both configurations run the trainer's own ``optimisation_step`` on the same random batch (labeled +
unlabeled patches, C classes) in the same process, so the ratio is what the defaults buy:

- ``baseline``: fp32, deterministic cuDNN, eager, contiguous (NCDHW) memory - the reference's setting;
- ``eager``: bf16 autocast, channels_last_3d, cudnn.benchmark, no compile (``train.compile: false``);
- ``defaults``: the trainer's defaults - the same plus torch.compile (CUDA only).

On the CPU the trainer's defaults are fp32 with channels_last_3d (bf16 and compile apply to CUDA only), so the
CPU table has two rows: the baseline and channels_last_3d.

Rows are printed as they are measured; the compile row's warm-up includes the compilation.

Usage::

    python Testing/Benchmarks/bench_train_step.py --device cpu  --patch 32 --width 8     # CPU smoke sizes
    python Testing/Benchmarks/bench_train_step.py --device cuda                          # 96^3, width 16 (issue sizes)

Prints a Markdown table (and writes it with --out); absolute times are only meaningful on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from bench_common import table_head, write_table

from scdlcore.training.config import Config
from scdlcore.training.ssl import Batch, build_base
from scdlcore.training.trainer import optimisation_step

#: (row name, fast settings, torch.compile)
VARIANTS = (
    ("baseline (fp32, deterministic, eager)", False, False),
    ("bf16, channels_last_3d, eager", True, False),
    ("defaults (bf16, channels_last_3d, compile)", True, True),
)


def measure(device: torch.device, fast: bool, compile: bool, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    config = Config().with_overrides({"network.width": args.width, "scdl.grid": max(args.patch // 8, 1)})
    base = build_base(config, args.classes).to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = fast
        torch.backends.cudnn.deterministic = not fast
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    images = torch.rand(args.labeled + args.unlabeled, 1, args.patch, args.patch, args.patch, device=device)
    labels = torch.randint(0, args.classes, (args.labeled, args.patch, args.patch, args.patch), device=device)
    if fast:  # oneDNN's channels-last kernels on the CPU, cuDNN's on CUDA
        base.to(memory_format=torch.channels_last_3d)
        images = images.contiguous(memory_format=torch.channels_last_3d)
    if compile and on_cuda:
        for network in base.networks:
            network.compile()
    optimizer = torch.optim.SGD([p for p in base.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    batch = Batch(images, labels)
    amp = fast and on_cuda

    def step() -> None:
        optimisation_step(base, optimizer, batch, 0.5, amp=amp)

    warmup_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if on_cuda:
        torch.cuda.synchronize()
    warmup_seconds = time.perf_counter() - warmup_start
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if on_cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if on_cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {"ms_per_step": seconds * 1000, "steps_per_s": 1 / seconds, "peak_gib": peak, "warmup_s": warmup_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--labeled", type=int, default=2)
    parser.add_argument("--unlabeled", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    device = torch.device(args.device)
    lines = table_head(
        f"CPS + GA + SCDL training step: {args.labeled}+{args.unlabeled} patches of {args.patch}^3, {args.classes} "
        f"classes, width {args.width}; {args.steps} timed steps after {args.warmup} warm-up",
        device,
        ["configuration", "ms/step", "steps/s", "speed-up", "peak memory (GiB)", "warm-up (s)"],
    )
    print("\n".join(lines), flush=True)
    results: dict[str, dict[str, float]] = {}
    variants = (
        VARIANTS
        if device.type == "cuda"
        else [("baseline (fp32, eager)", False, False), ("defaults on the CPU (fp32, channels_last_3d)", True, False)]
    )
    for name, fast, compile in variants:
        r = results[name] = measure(device, fast, compile, args)
        ratio = f"{results[variants[0][0]]['ms_per_step'] / r['ms_per_step']:.2f}x"
        lines.append(
            f"| {name} | {r['ms_per_step']:.1f} | {r['steps_per_s']:.2f} | {ratio} | "
            f"{r['peak_gib']:.2f} | {r['warmup_s']:.1f} |"
        )
        print(lines[-1], flush=True)
    if device.type != "cuda":
        lines.append(
            "\nOn the CPU the memory column is the process's peak RSS (both rows in one process), not per row."
        )
    table = "\n".join(lines)
    write_table(table, args.out)
    if args.out:
        args.out.with_suffix(".json").write_text(
            json.dumps({"args": vars(args) | {"out": args.out.name}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
