"""What every benchmark table names: the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["machine_name"]


def machine_name(device: torch.device | str) -> str:
    """The GPU's name (and CUDA version), or the CPU's model, core count and torch thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
