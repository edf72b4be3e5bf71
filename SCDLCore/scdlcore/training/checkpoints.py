"""A training run's folder: its checkpoint files and whether it holds a run, finished or not.

Checkpoints are single safetensors files (no pickle); :class:`scdlcore.training.trainer.Trainer` writes
and resumes them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scdlcore.bundle.format import META_FILE

__all__ = ["checkpoint_path", "finished_run", "holds_run", "load_checkpoint_weights"]


CHECKPOINT_FORMAT = "scdl-checkpoint-1"
# The run folder's layout (see scdlcore.training.trainer): checkpoints/, the history and the exported bundle.
HISTORY_FILE = "history.jsonl"
BUNDLE_DIR = "model"


def checkpoint_path(folder: Path, name: str = "last") -> Path:
    """A run folder's checkpoint ``last`` or ``best``."""
    return folder / "checkpoints" / f"{name}.safetensors"


def resume_checkpoint(folder: Path) -> Path | None:
    """The checkpoint ``resume`` continues the run in ``folder`` from: ``last``, or ``best`` when the run was killed
    after a validation and before its first regular checkpoint; None when it has neither."""
    return next((path for path in (checkpoint_path(folder), checkpoint_path(folder, "best")) if path.is_file()), None)


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run that ``resume`` can continue. A run killed before its first checkpoint leaves
    at most a history, which a new run replaces."""
    return resume_checkpoint(folder) is not None


def finished_run(folder: Path) -> bool:
    """Whether the run in ``folder`` completed (it exported its bundle)."""
    return (folder / BUNDLE_DIR / META_FILE).is_file()


def load_checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The base's state dict stored in a checkpoint (safetensors, no pickle)."""
    from safetensors.torch import load_file

    return {k[6:]: v for k, v in load_file(str(path)).items() if k.startswith("model.")}
