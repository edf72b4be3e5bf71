"""Segmentation metrics: Dice, HD95 and ASD per organ, in millimetres on the native grid.

Definitions (the same as MONAI's ``compute_hausdorff_distance(percentile=95)`` and
``compute_average_surface_distance(symmetric=True)``, which the tests check):

- The surface of a mask is its voxels that a binary erosion (6-connected cross) removes; voxels on
  the array border count as surface.
- Surface distances are Euclidean, in mm, from each surface voxel of one mask to the nearest surface
  voxel of the other, computed with a distance transform that uses the voxel spacing.
- HD95 is the larger of the two directed 95th percentiles (pred -> ref and ref -> pred), with linear
  interpolation between distances, as MONAI computes it. It is not the 95th percentile of the
  pooled distances (MedPy's ``hd95``); the two differ slightly when the directions disagree.
- ASD is the mean of the pooled distances of both directions (the average symmetric surface distance).

An organ absent from both maps is scored NaN and left out of every mean. An organ predicted but
absent from the reference gets Dice 0 and NaN distances. An organ present in the reference but not
predicted (missed) gets Dice 0 and NaN distances on the native grid: its Dice carries the miss.

The paper-compatible mode reproduces how published SCDL numbers were computed: both maps are
resized (nearest neighbour) to 160x160x80 voxels (x, y, z), distances are in voxels, and a missed
organ is given HD95 = ASD = 128 voxels.

Minority organs are the organs present in the reference with under 1% of its foreground voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from os import PathLike
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from scdlcore.labels import LabelTable

if TYPE_CHECKING:
    pass

__all__ = [
    "MINORITY_FRACTION",
    "PAPER_GRID_SHAPE",
    "PAPER_MISSED_PENALTY",
    "EvaluationResult",
    "OrganScores",
    "dice",
    "evaluate_files",
    "evaluate_labels",
    "format_case_table",
    "mean_case_results",
    "surface_distances",
]

#: Paper-compatible grid in array order (D, H, W): 160x160x80 voxels as (x, y, z).
PAPER_GRID_SHAPE = (80, 160, 160)
#: HD95 and ASD (voxels) given to a missed organ in paper-compatible mode.
PAPER_MISSED_PENALTY = 128.0
#: An organ is a minority organ below this fraction of the reference foreground voxels.
MINORITY_FRACTION = 0.01


@dataclass(frozen=True)
class OrganScores:
    """Scores of one organ in one case (or their means over cases, see :func:`mean_case_results`).

    Attributes:
        dice: Dice coefficient in [0, 1]; NaN when the organ is absent from both maps.
        hd95_mm: 95th-percentile Hausdorff distance in mm (in voxels in paper-compatible mode);
            NaN when undefined (see the module docstring).
        asd_mm: average symmetric surface distance in mm (voxels in paper-compatible mode), or NaN.
        reference_voxels: voxels of the organ in the reference, on the grid the scores were computed on
            (a total over cases in a summary).
        predicted_voxels: voxels of the organ in the prediction, likewise.
    """

    dice: float
    hd95_mm: float
    asd_mm: float
    reference_voxels: int
    predicted_voxels: int


@dataclass(frozen=True)
class EvaluationResult:
    """Per-organ scores of a case (or of a set of cases) and their means.

    Means skip NaN scores. Build it with :meth:`from_organs` so the means and the minority organs
    always follow from ``organs``.

    Attributes:
        organs: scores by organ name, in label-table order.
        mean_dice: mean Dice over the organs with a defined Dice.
        mean_hd95: mean HD95 (mm, or voxels in paper mode) over the organs with a defined HD95.
        mean_asd: mean ASD, likewise.
        minority_organs: organs present in the reference with under ``MINORITY_FRACTION`` of its
            foreground voxels.
        minority_mean_dice: mean Dice over the minority organs (NaN when there are none).
        paper_mode: whether the scores were computed in paper-compatible mode (distances in voxels).
        num_cases: how many cases the scores summarise.
    """

    organs: dict[str, OrganScores]
    mean_dice: float
    mean_hd95: float
    mean_asd: float
    minority_organs: list[str] = field(default_factory=list)
    minority_mean_dice: float = math.nan
    paper_mode: bool = False
    num_cases: int = 1

    @classmethod
    def from_organs(cls, organs: dict[str, OrganScores], *, paper_mode: bool, num_cases: int = 1) -> EvaluationResult:
        """Compute the means and the minority organs from per-organ scores."""
        foreground = sum(scores.reference_voxels for scores in organs.values())
        minority = [
            name for name, scores in organs.items() if 0 < scores.reference_voxels < MINORITY_FRACTION * foreground
        ]
        return cls(
            organs=dict(organs),
            mean_dice=_nanmean(scores.dice for scores in organs.values()),
            mean_hd95=_nanmean(scores.hd95_mm for scores in organs.values()),
            mean_asd=_nanmean(scores.asd_mm for scores in organs.values()),
            minority_organs=minority,
            minority_mean_dice=_nanmean(organs[name].dice for name in minority),
            paper_mode=paper_mode,
            num_cases=num_cases,
        )

    @property
    def distance_unit(self) -> str:
        """``"mm"``, or ``"voxel"`` in paper-compatible mode."""
        return "voxel" if self.paper_mode else "mm"

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values; undefined scores stay NaN (``scdlcore.events.to_jsonable`` makes them null)."""
        return {
            "paper_mode": self.paper_mode,
            "distance_unit": self.distance_unit,
            "num_cases": self.num_cases,
            "mean_dice": self.mean_dice,
            "mean_hd95": self.mean_hd95,
            "mean_asd": self.mean_asd,
            "minority_organs": list(self.minority_organs),
            "minority_mean_dice": self.minority_mean_dice,
            "organs": {name: asdict(scores) for name, scores in self.organs.items()},
        }

    def to_csv_rows(self) -> list[dict[str, Any]]:
        """One row per organ, then a ``mean`` and a ``minority_mean`` row (for ``csv.DictWriter``)."""
        rows = [
            {
                "organ": name,
                "dice": scores.dice,
                "hd95": scores.hd95_mm,
                "asd": scores.asd_mm,
                "distance_unit": self.distance_unit,
                "reference_voxels": scores.reference_voxels,
                "predicted_voxels": scores.predicted_voxels,
                "minority": name in self.minority_organs,
            }
            for name, scores in self.organs.items()
        ]
        for organ, dice_, hd95, asd, minority in (
            ("mean", self.mean_dice, self.mean_hd95, self.mean_asd, None),
            ("minority_mean", self.minority_mean_dice, None, None, True),
        ):
            rows.append(
                {
                    "organ": organ,
                    "dice": dice_,
                    "hd95": hd95,
                    "asd": asd,
                    "distance_unit": self.distance_unit,
                    "reference_voxels": None,
                    "predicted_voxels": None,
                    "minority": minority,
                }
            )
        return rows

    def format_table(self) -> str:
        """An aligned text table for a terminal; minority organs are marked with ``*``, NaN shows as ``-``."""
        unit = "vox" if self.paper_mode else "mm"
        header = ("Organ", "Dice", f"HD95 ({unit})", f"ASD ({unit})", "Ref voxels", "Pred voxels")
        body = [
            (
                name + (" *" if name in self.minority_organs else ""),
                _fmt(scores.dice, 4),
                _fmt(scores.hd95_mm, 2),
                _fmt(scores.asd_mm, 2),
                str(scores.reference_voxels),
                str(scores.predicted_voxels),
            )
            for name, scores in self.organs.items()
        ]
        footer = [
            ("mean", _fmt(self.mean_dice, 4), _fmt(self.mean_hd95, 2), _fmt(self.mean_asd, 2), "", ""),
            (f"minority mean ({len(self.minority_organs)})", _fmt(self.minority_mean_dice, 4), "", "", "", ""),
        ]
        lines = _aligned([header, *body, *footer])
        rule = "-" * len(lines[0])
        cases = f"mean of {self.num_cases} cases, " if self.num_cases > 1 else ""
        mode = "paper-compatible mode (160x160x80 grid, voxels)" if self.paper_mode else "native grid (mm)"
        notes = [f"{cases}{mode}; * minority organ (< {MINORITY_FRACTION:.0%} of reference foreground)"]
        return "\n".join([lines[0], rule, *lines[1 : 1 + len(body)], rule, *lines[1 + len(body) :], *notes])


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of two binary masks of the same shape.

    Args:
        pred: predicted mask, any shape (non-zero is foreground).
        ref: reference mask, same shape.

    Returns:
        ``2 |pred & ref| / (|pred| + |ref|)``; NaN when both are empty (the organ is absent).
    """
    pred, ref = _binary_pair(pred, ref)
    total = np.count_nonzero(pred) + np.count_nonzero(ref)
    if total == 0:
        return math.nan
    return 2.0 * np.count_nonzero(pred & ref) / total


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Surface distances between two non-empty binary masks, in mm, both directions.

    Both masks are cropped to the bounding box of their union first, so the distance transforms
    only cover the organ, not the whole CT.

    Args:
        pred: predicted mask (D, H, W) (any number of dimensions; non-zero is foreground).
        ref: reference mask, same shape.
        spacing_zyx: voxel size in mm in array order (z, y, x), i.e. SimpleITK's ``spacing`` reversed.

    Returns:
        ``(pred_to_ref, ref_to_pred)``: 1D float arrays with, for each surface voxel of one mask, the
        distance in mm to the nearest surface voxel of the other. HD95 is
        ``max(percentile(pred_to_ref, 95), percentile(ref_to_pred, 95))``; ASD is the mean of both.

    Raises:
        ValueError: a mask is empty (distances are undefined), the shapes differ, or the spacing is
            not one positive number per axis.
    """
    pred, ref = _binary_pair(pred, ref)
    spacing = _parse_spacing(spacing_zyx, pred.ndim)
    if not pred.any() or not ref.any():
        empty = "pred" if not pred.any() else "ref"
        raise ValueError(
            f"surface_distances needs two non-empty masks, but {empty} is empty; "
            "score an absent organ without distances (see evaluate_labels)."
        )
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    pred_surface = _surface(pred[box])
    ref_surface = _surface(ref[box])
    pred_to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    ref_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return pred_to_ref, ref_to_pred


def evaluate_labels(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_zyx: Sequence[float],
    table: LabelTable,
    *,
    paper_mode: bool = False,
) -> EvaluationResult:
    """Score every organ of a label table: Dice, HD95 and ASD.

    Args:
        pred: predicted label map (D, H, W) of label values (``table.values``; others are ignored).
        ref: reference label map (D, H, W) on the same grid.
        spacing_zyx: voxel size in mm in array order (z, y, x).
        table: the organs to score, e.g. ``scdlcore.labels.SYNAPSE13``.
        paper_mode: resize both maps (nearest neighbour) to ``PAPER_GRID_SHAPE``, report distances
            in voxels and give a missed organ ``PAPER_MISSED_PENALTY`` for HD95 and ASD, as the
            published SCDL numbers were computed. Off: native grid, mm.

    Returns:
        The per-organ scores, their NaN-skipping means and the minority organs.

    Raises:
        ValueError: the maps differ in shape, are not integer label maps, or the spacing is invalid.
    """
    pred = _as_label_map(pred, "pred")
    ref = _as_label_map(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must be on the same grid, got shapes {pred.shape} and {ref.shape}.")
    spacing = _parse_spacing(spacing_zyx, ref.ndim)
    missed_penalty = math.nan
    if paper_mode:
        if ref.ndim != 3:
            raise ValueError(f"Paper-compatible mode needs 3D label maps (D, H, W), got shape {ref.shape}.")
        pred = _resize_nearest(pred, PAPER_GRID_SHAPE)
        ref = _resize_nearest(ref, PAPER_GRID_SHAPE)
        spacing = (1.0, 1.0, 1.0)
        missed_penalty = PAPER_MISSED_PENALTY

    max_value = max(table.values)
    pred_boxes = ndimage.find_objects(pred, max_label=max_value)
    ref_boxes = ndimage.find_objects(ref, max_label=max_value)
    organs = {
        label.name: _score_organ(
            pred, ref, label.value, pred_boxes[label.value - 1], ref_boxes[label.value - 1], spacing, missed_penalty
        )
        for label in table.labels
    }
    return EvaluationResult.from_organs(organs, paper_mode=paper_mode)


def evaluate_files(
    pred_path: str | PathLike[str],
    ref_path: str | PathLike[str],
    table: LabelTable,
    *,
    paper_mode: bool = False,
) -> EvaluationResult:
    """Score a predicted label file against a reference label file (any format ``scdlcore.io`` reads).

    Args:
        pred_path: predicted label map (e.g. ``case0001_seg.nii.gz``) or 3D Slicer segmentation
            (``.seg.nrrd``: organs matched by name, see :func:`scdlcore.io.segnrrd.read_label_map`).
        ref_path: reference label map or segmentation on the same grid (shape, spacing, origin and direction).
        table: the organs to score, and the values of the plain label maps.
        paper_mode: see :func:`evaluate_labels`.

    Raises:
        ValueError: the two files are not on the same grid, or a plain map holds values not in ``table``.
        FileNotFoundError, scdlcore.io.volume.ImageError: a file is missing or unreadable.
    """
    from scdlcore.io.segnrrd import read_label_map

    pred = read_label_map(pred_path, table)
    ref = read_label_map(ref_path, table)
    for path, labels in ((pred_path, pred), (ref_path, ref)):
        unknown = table.unknown_values(labels.array)
        if unknown:  # another label table's map would be scored as if it were this one
            raise ValueError(
                f"{path} holds label values {unknown} that are not in label table {table.name!r} "
                f"(values {table.values}); convert them with scdlcore.labels.map_label_values, or choose its table."
            )
    if not pred.same_grid(ref):
        raise ValueError(
            f"Prediction {pred_path} and reference {ref_path} are not on the same grid: "
            f"{pred.describe_grid()} vs {ref.describe_grid()}. Resample the prediction onto the reference "
            "(nearest neighbour, e.g. scdlcore.io.volume.resample_label_to) before evaluating."
        )
    return evaluate_labels(pred.array, ref.array, ref.spacing_zyx, table, paper_mode=paper_mode)


def mean_case_results(results: Sequence[EvaluationResult]) -> EvaluationResult:
    """Summarise several cases: per-organ means over the cases where a score is defined.

    The summary's means are over organs of these per-organ means (the usual way benchmark tables
    are computed); its voxel counts are totals over the cases, and its minority organs are those
    with under ``MINORITY_FRACTION`` of the total reference foreground.

    Raises:
        ValueError: no results, or results mixing native and paper-compatible mode.
    """
    if not results:
        raise ValueError("mean_case_results needs at least one case result, got none.")
    modes = {result.paper_mode for result in results}
    if len(modes) > 1:
        raise ValueError("Cannot average native-grid (mm) and paper-compatible (voxel) results together.")
    names = list(dict.fromkeys(name for result in results for name in result.organs))
    organs = {}
    for name in names:
        cases = [result.organs[name] for result in results if name in result.organs]
        organs[name] = OrganScores(
            dice=_nanmean(case.dice for case in cases),
            hd95_mm=_nanmean(case.hd95_mm for case in cases),
            asd_mm=_nanmean(case.asd_mm for case in cases),
            reference_voxels=sum(case.reference_voxels for case in cases),
            predicted_voxels=sum(case.predicted_voxels for case in cases),
        )
    num_cases = sum(result.num_cases for result in results)
    return EvaluationResult.from_organs(organs, paper_mode=modes.pop(), num_cases=num_cases)


def _score_organ(
    pred: np.ndarray,
    ref: np.ndarray,
    value: int,
    pred_box: tuple[slice, ...] | None,
    ref_box: tuple[slice, ...] | None,
    spacing: tuple[float, ...],
    missed_penalty: float,
) -> OrganScores:
    """Scores of one label value, computed inside the union of its bounding boxes in pred and ref."""
    if pred_box is None and ref_box is None:
        return OrganScores(math.nan, math.nan, math.nan, 0, 0)
    box = _union_box(pred_box, ref_box)
    pred_mask = pred[box] == value
    ref_mask = ref[box] == value
    num_pred = int(np.count_nonzero(pred_mask))
    num_ref = int(np.count_nonzero(ref_mask))
    if num_pred and num_ref:
        pred_to_ref, ref_to_pred = surface_distances(pred_mask, ref_mask, spacing)
        hd95 = float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))
        asd = float(np.concatenate([pred_to_ref, ref_to_pred]).mean())
    elif num_ref:  # missed organ
        hd95 = asd = missed_penalty
    else:  # predicted but absent from the reference
        hd95 = asd = math.nan
    return OrganScores(dice(pred_mask, ref_mask), hd95, asd, num_ref, num_pred)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-connected background neighbour (outside the array counts as background)."""
    return mask & ~ndimage.binary_erosion(mask)


def _union_box(*boxes: tuple[slice, ...] | None) -> tuple[slice, ...]:
    present = [box for box in boxes if box is not None]
    return tuple(
        slice(min(box[axis].start for box in present), max(box[axis].stop for box in present))
        for axis in range(len(present[0]))
    )


def _resize_nearest(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize; output voxel i takes input voxel floor(i * n_in / n_out) on each axis."""
    index = [(np.arange(n_out) * n_in) // n_out for n_in, n_out in zip(labels.shape, shape)]
    return labels[np.ix_(*index)]


def _binary_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref masks must have the same shape, got {pred.shape} and {ref.shape}.")
    return pred, ref


def _as_label_map(labels: np.ndarray, name: str) -> np.ndarray:
    """An integer label map; floating maps with whole values are converted (some tools save labels as float)."""
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        return labels
    if np.issubdtype(labels.dtype, np.floating) and np.array_equal(labels, np.round(labels)):
        return labels.astype(np.int32)
    raise ValueError(f"{name} must be an integer label map, got dtype {labels.dtype} with non-integer values.")


def _parse_spacing(spacing_zyx: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing_zyx, dtype=float)))
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(
            f"spacing_zyx must be {ndim} positive voxel sizes in mm in array order (z, y, x), got {spacing_zyx}."
        )
    return spacing


def _nanmean(values: Any) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    defined = [float(v) for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def format_case_table(cases: Sequence[tuple[str, EvaluationResult]]) -> str:
    """An aligned text table with one line per named case: mean Dice, mean HD95 and minority mean Dice."""
    unit = "vox" if any(result.paper_mode for _, result in cases) else "mm"
    header = ("Case", "mean Dice", f"mean HD95 ({unit})", "minority mean Dice")
    body = [(name, _fmt(r.mean_dice, 4), _fmt(r.mean_hd95, 2), _fmt(r.minority_mean_dice, 4)) for name, r in cases]
    lines = _aligned([header, *body])
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as text columns: the first left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))]).rstrip()
        for row in rows
    ]


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"
