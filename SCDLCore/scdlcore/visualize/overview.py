"""A PNG montage of a segmentation: axial, coronal and sagittal slices with the organs overlaid.

Views follow the radiological convention: the volume is first turned so that its array axes run
(inferior->superior, anterior->posterior, right->left) along the closest LPS axes (an oblique scan
is shown along its nearest axes, not resliced), then the axial view has anterior at the top and the
patient's right on the image's left, and coronal/sagittal views have superior at the top. Pixels
keep their physical aspect ratio. The slices pass through the centre of the segmented organs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from scdlcore._atomic import atomic_write
from scdlcore.io.volume import Volume
from scdlcore.labels import Label, LabelTable

__all__ = ["DISPLAY_WINDOW", "save_overview"]

#: Abdominal display window (HU): soft tissue contrast with fat still grey.
DISPLAY_WINDOW = (-160.0, 240.0)
_ALPHA = 0.45


def save_overview(
    path: str | os.PathLike,
    image: Volume,
    labels: Volume,
    table: LabelTable,
    *,
    window: tuple[float, float] = DISPLAY_WINDOW,
) -> Path:
    """Write the montage (PNG, written atomically).

    Args:
        path: output ``.png`` file.
        image: CT in HU, (D, H, W).
        labels: label map with ``table``'s values on ``image``'s grid.
        table: names and colors of the organs; the legend lists the organs present.
        window: display window (low, high) in HU.

    Returns:
        ``path``.

    Raises:
        ValueError: not a ``.png`` path, or labels not on the image grid.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: the overview is a PNG image; give a path ending in .png.")
    if not labels.same_grid(image):
        raise ValueError(f"{path}: the label map is not on the image's grid; cannot overlay it.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ct, spacing = _to_lps_axes(image.array, image)
    organs, _ = _to_lps_axes(labels.array, labels)
    centre = _centre(organs)
    from scdlcore.inference.predictor import organ_volumes_ml

    volumes = organ_volumes_ml(labels, table)
    present = [label for label in table.labels if volumes[label.name] > 0]
    colors = _color_lut(present, max(max(table.values), int(labels.array.max(initial=0))))
    s_si, s_ap, s_rl = spacing
    views = (  # (title, CT slice, label slice, pixel height / width in mm)
        ("Axial", ct[centre[0]], organs[centre[0]], s_ap / s_rl),
        ("Coronal", ct[::-1, centre[1], :], organs[::-1, centre[1], :], s_si / s_rl),
        ("Sagittal", ct[::-1, :, centre[2]], organs[::-1, :, centre[2]], s_si / s_ap),
    )
    figure = Figure(figsize=(15, 6), facecolor="black")
    FigureCanvasAgg(figure)
    for index, (title, ct_slice, label_slice, aspect) in enumerate(views):
        axes = figure.add_subplot(1, 3, index + 1)
        axes.imshow(ct_slice, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        axes.imshow(colors[label_slice], aspect=aspect, interpolation="nearest")
        axes.set_title(title, color="white")
        axes.set_axis_off()
    if present:
        handles = [Patch(color=np.array(label.color) / 255, label=label.display_name) for label in present]
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), frameon=False, labelcolor="white")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.12, wspace=0.03)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, facecolor="black"))


def _to_lps_axes(array: np.ndarray, volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``array`` (a view) with axes turned to (S, P, L) order, each increasing toward S, P, L; spacing likewise (mm)."""
    direction = np.array(volume.direction).reshape(3, 3)  # column n: LPS direction of index axis n (x, y, z)
    lps_axis_of = [-1, -1, -1]
    for index_axis in np.argsort(-np.abs(direction).max(0)):  # the most clearly aligned axes choose first
        free = [a for a in range(3) if a not in lps_axis_of]
        lps_axis_of[index_axis] = max(free, key=lambda a: abs(direction[a, index_axis]))
    # numpy axis m holds index axis 2 - m; LPS axis a goes to numpy position 2 - a.
    order = [0, 0, 0]
    for index_axis, lps_axis in enumerate(lps_axis_of):
        order[2 - lps_axis] = 2 - index_axis
    turned = np.transpose(array, order)
    flips = tuple(slice(None, None, -1) if direction[lps_axis_of[2 - m], 2 - m] < 0 else slice(None) for m in order)
    spacing = tuple(volume.spacing[2 - m] for m in order)
    return turned[flips], spacing  # type: ignore[return-value]


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Index of the centroid of the labeled voxels (the volume centre when there are none)."""
    counts = [np.count_nonzero(labels, axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
    total = counts[0].sum()
    if total == 0:
        return tuple(n // 2 for n in labels.shape)  # type: ignore[return-value]
    return tuple(int(round(float(np.dot(np.arange(len(c)), c)) / total)) for c in counts)  # type: ignore[return-value]


def _color_lut(present: list[Label], max_value: int) -> np.ndarray:
    """RGBA per label value, (max_value + 1, 4); transparent for background and organs not present."""
    lut = np.zeros((max_value + 1, 4))
    for label in present:
        lut[label.value] = (*(np.array(label.color) / 255), _ALPHA)
    return lut
