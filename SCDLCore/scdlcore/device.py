"""Where the networks run: the ``--device`` values (auto, cpu, cuda, cuda:N) and the torch device they name.

torch is imported only to resolve a device, so that the command line parses ``--device`` without it.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICES", "check_device_name", "resolve_device"]

#: What ``--device`` takes, besides ``cuda:N`` for one GPU of several:
#: auto = the GPU when PyTorch sees one, else the CPU.
DEVICES = ("auto", "cpu", "cuda")


def check_device_name(value: str) -> str:
    """``value`` when it names a device (:data:`DEVICES` or ``cuda:N``).

    Raises:
        ValueError: any other value.
    """
    if value in DEVICES or re.fullmatch(r"cuda:\d+", value):
        return value
    raise ValueError(f"{value!r} is not a device: choose auto, cpu, cuda or cuda:N")


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` names; auto = the local CUDA device when one exists (its LOCAL_RANK under
    torchrun), else the CPU.

    Raises:
        ValueError: CUDA requested on a machine where torch sees no GPU.
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was requested (device 'cuda') but torch sees no GPU; use --device cpu.")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device
