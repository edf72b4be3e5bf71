"""Engine events turned into progress states and short texts for the panel.

Segmentation runs through named stages; each owns a slice of the progress bar so the bar only
moves forward: the panel's own states (starting the engine, exporting, importing) and the
worker's (``load``, ``preprocess``, ``infer``, ``postprocess``, ``write``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scdlcore.labels import LabelTable

__all__ = [
    "finetune_estimate",
    "SEGMENT_STAGES",
    "dice_rows",
    "format_train_progress",
    "format_validation",
    "format_volumes",
    "segment_progress",
]

#: stage -> (label, bar start, bar end); bar positions in 0..1.
SEGMENT_STAGES: dict[str, tuple[str, float, float]] = {
    "export": ("Exporting the volume", 0.00, 0.03),
    "start": ("Starting the engine", 0.03, 0.10),
    "load": ("Loading", 0.10, 0.15),
    "preprocess": ("Preparing the image", 0.15, 0.25),
    "infer": ("Segmenting", 0.25, 0.85),
    "postprocess": ("Cleaning up the result", 0.85, 0.92),
    "write": ("Writing the result", 0.92, 0.95),
    "collect": ("Keeping the CT in the dataset", 0.95, 0.95),
    "import": ("Creating segments", 0.95, 1.00),
    "cancel": ("Cancelling", 0.00, 0.00),
}


def segment_progress(stage: str, progress: float = 0.0) -> tuple[int, str]:
    """Progress-bar percent and state text of a segmentation stage.

    Args:
        stage: a key of :data:`SEGMENT_STAGES` (an unknown stage keeps its name as the text).
        progress: how far the stage is, 0..1 (clipped).

    Returns:
        ``(percent 0..100, text)``; for ``cancel`` the percent is -1 (leave the bar where it is).
    """
    if stage == "cancel":
        return -1, SEGMENT_STAGES["cancel"][0]
    label, start, end = SEGMENT_STAGES.get(stage, (stage.capitalize(), 0.25, 0.85))
    fraction = start + (end - start) * min(max(float(progress), 0.0), 1.0)
    return round(100 * fraction), label


def format_train_progress(event: Mapping[str, Any]) -> tuple[int | None, str]:
    """Percent and one line for a fine-tuning ``progress`` event.

    Example: ``(24, "Step 120/500 · loss 0.432 (dice 0.310, ce 0.122) · lr 1.0e-04 · 3 min left")``.
    """
    step, total = event.get("step"), event.get("total")
    percent = round(100 * step / total) if isinstance(step, int) and isinstance(total, int) and total > 0 else None
    parts = [f"Step {step}/{total}" if percent is not None else str(event.get("stage", "training")).capitalize()]
    losses = event.get("losses") or {}
    if isinstance(losses, Mapping) and losses:
        items = list(losses.items())
        main_name, main_value = next(((k, v) for k, v in items if k in ("total", "loss")), items[0])
        others = ", ".join(f"{key} {value:.3f}" for key, value in items if key != main_name)
        parts.append(f"loss {main_value:.3f}" + (f" ({others})" if others else ""))
    if isinstance(event.get("lr"), (int, float)):
        parts.append(f"lr {event['lr']:.1e}")
    if isinstance(event.get("eta_s"), (int, float)):
        parts.append(f"{_duration(event['eta_s'])} left")
    return percent, " · ".join(parts)


def format_validation(event: Mapping[str, Any], table: LabelTable) -> str:
    """One line for a fine-tuning ``validation`` event: mean Dice, then per organ."""
    dice = event.get("dice") or {}
    order = [name for name in table.names if name in dice] + [name for name in dice if name not in table.names]
    organs = ", ".join(f"{_display(table, organ)} {dice[organ]:.2f}" for organ in order if dice[organ] is not None)
    mean = event.get("mean_dice")
    head = f"Validation at step {event.get('step')}: mean Dice {mean:.3f}" if mean is not None else "Validation"
    return f"{head} ({organs})" if organs else head


def dice_rows(
    before: Mapping[str, float], after: Mapping[str, float], table: LabelTable
) -> list[tuple[str, str, str, str]]:
    """Rows (organ, before, after, change) of the before/after Dice table, in label-table order;
    organs the engine did not evaluate are left out, a missing value shows as "–"."""
    rows = []
    for label in table.labels:
        old, new = before.get(label.name), after.get(label.name)
        if old is None and new is None:
            continue
        change = f"{new - old:+.3f}" if old is not None and new is not None else "–"
        rows.append((label.display_name, _dice(old), _dice(new), change))
    return rows


def format_volumes(volumes_ml: Mapping[str, float], table: LabelTable) -> str:
    """``"Liver 1520 mL, Spleen 210 mL, ..."`` for the organs that were found (volume > 0)."""
    return ", ".join(
        f"{label.display_name} {volumes_ml[label.name]:.0f} mL"
        for label in table.labels
        if volumes_ml.get(label.name, 0) > 0
    )


def _display(table: LabelTable, organ: str) -> str:
    return table[organ].display_name if organ in table.names else organ


def _dice(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def finetune_estimate(steps: int | None, device: str) -> str:
    """What the panel says before a fine-tune starts: the steps and, on the CPU, about how long it takes.

    Args:
        steps: the steps asked for; None = the engine's default of the device.
        device: "auto", "cpu" or "cuda" (``Device.value``).
    """
    from scdlcore.training.config import default_finetune_steps, expected_cpu_finetune_seconds

    def cpu() -> str:
        minutes = expected_cpu_finetune_seconds(steps) / 60
        count = default_finetune_steps("cpu") if steps is None else steps
        return f"{count} steps, about {max(1, round(minutes))} min on a 2-core CPU (measured; less on a faster one)"

    def gpu() -> str:
        return f"{default_finetune_steps('cuda') if steps is None else steps} steps on the GPU"

    if device == "cpu":
        return f"Expected: {cpu()}."
    if device == "cuda":
        return f"Expected: {gpu()}."
    return f"Expected: {gpu()}, or without a GPU {cpu()}."
