"""Training curves as a PNG: the losses and the validation Dice over the steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scdlcore._atomic import atomic_write


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss curves (left) and validation Dice (right) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h for h in history if h["event"] == "train"]
    validation = [h for h in history if h["event"] == "validation"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({k for h in train for k in h if k not in ("event", "step", "lr")})
    for name in names:
        left.plot([h["step"] for h in train], [h.get(name) for h in train], label=name, linewidth=1)
    left.set(xlabel="step", ylabel="loss", title="Training losses", yscale="log")
    left.legend(fontsize=7)
    if validation:
        right.plot(
            [h["step"] for h in validation], [h["mean_dice"] for h in validation], "k-o", label="mean", markersize=3
        )
        organs = sorted({k for h in validation for k in h["dice"]})
        for organ in organs:
            right.plot(
                [h["step"] for h in validation], [h["dice"].get(organ) for h in validation], linewidth=0.8, label=organ
            )
        right.legend(fontsize=6, ncol=2)
    else:
        right.text(
            0.5,
            0.5,
            "no validation in this run\n(train.val_every = 0 or no held-out case)",
            ha="center",
            va="center",
            transform=right.transAxes,
            color="0.4",
        )
    right.set(xlabel="step", ylabel="Dice", title="Validation Dice (model grid)", ylim=(0, 1))
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
