"""What every benchmark table names: the machine it ran on."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["machine_line", "machine_name", "median_cell", "table_head", "write_table"]


def write_table(table: str, out: Path | None) -> None:
    """Write a benchmark's Markdown table to ``out`` (its folder created), when one is given."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")


def table_head(title: str, device: torch.device | str, columns: list[str], repeat: int = 1) -> list[str]:
    """The first lines of a benchmark table: its title, the machine line, and the header of ``columns``,
    where ``{runs}`` in a column name becomes ", median (range) of N runs" when runs are repeated."""
    runs = f", median (range) of {repeat} runs" if repeat > 1 else ""
    header = [column.format(runs=runs) for column in columns]
    return [title, machine_line(device), "", f"| {' | '.join(header)} |", "|" + "---|" * len(header)]


def median_cell(values: list[float], digits: int = 1) -> str:
    """The table cell under a ``{runs}`` column of :func:`table_head`: the median, and the range of several runs."""
    spread = f" ({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.{digits}f}{spread}"


def machine_line(device: torch.device | str) -> str:
    """The table line naming the machine, the torch version and the date."""
    import torch

    return f"Machine: {machine_name(device)}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


def machine_name(device: torch.device | str) -> str:
    """The GPU's name (and CUDA version), or the CPU's model, core count and torch thread count."""
    import torch  # here, so that a benchmark's parent process can import this module without torch

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
