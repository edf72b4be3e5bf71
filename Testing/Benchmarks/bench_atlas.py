"""Registration as a baseline: the labeled CT of a fold carried onto the other patient's CT by registration alone.

Issue 15 asks whether labels propagated by registration, added as extra pseudo-labels on the unlabeled CTs,
would help the networks. Their quality can be measured on the one pair where both CTs have reference labels:
each fold of ``bench_accuracy.py`` registers its training CT (the atlas) onto its held-out CT with SimpleITK,
warps the atlas labels with each stage's transform (nearest neighbour) onto the held-out CT's native grid and
scores them exactly as the accuracy benchmark scores a network (:func:`bench_accuracy.summarise`, same organs,
same minority organs). Stages, each starting from the previous one:

1. ``translation``: the body centroids aligned, then an exhaustive search along z in 6 mm steps over the
   larger of the two scans' z extents (the two patients' LPS origins differ by a metre, and B covers 40 mm of
   A's 330 mm, so no centring finds the right level);
2. ``affine``: 12 parameters, Mattes mutual information;
3. ``affine + B-spline``: a free-form deformation on a 4 x 4 x 2 control grid, L-BFGS-B.

Both CTs are resampled to 3 mm and clipped to [-300, 50] HU for the metric, which is sampled inside the fixed
CT's body (above -250 HU), on one thread (reproducible to the digit). The clip leaves air, fat and soft tissue
and removes what the contrast phase changes (enhanced vessels and organs above 50 HU), since A and B are in
different phases. The seconds are the registration's wall time up to that stage, on this machine.

Usage::

    PYTHONPATH=SCDLCore python Testing/Benchmarks/bench_atlas.py --data .bench-data \
        --out Testing/Benchmarks/results/atlas_cpu.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from bench_accuracy import FOLDS, SAMPLE_NAMES, OrganSummary, prepare_data, summarise
from bench_common import machine_line, write_table

from scdlcore.evaluation.metrics import evaluate_labels
from scdlcore.io.volume import Volume, resample_volume, to_sitk
from scdlcore.labels import SYNAPSE13

METRIC_SPACING_MM = 3.0
CLIP_HU = (-300.0, 50.0)
BODY_HU = -250.0
Z_STEP_MM = 6.0
BSPLINE_MESH = (4, 4, 2)  # control-point cells along x, y, z


def metric_image(ct: Volume) -> sitk.Image:
    """The CT as the metric sees it: 3 mm isotropic (linear, same origin and direction), clipped to ``CLIP_HU``."""
    shape_zyx = [max(1, round(n * s / METRIC_SPACING_MM)) for n, s in zip(ct.shape, ct.spacing[::-1])]
    spacing = (METRIC_SPACING_MM,) * 3
    resampled = resample_volume(
        ct, shape=shape_zyx, spacing=spacing, origin=ct.origin, direction=ct.direction, is_label=False
    )
    return sitk.Clamp(to_sitk(resampled), lowerBound=CLIP_HU[0], upperBound=CLIP_HU[1])


def body_centroid(image: sitk.Image) -> np.ndarray:
    """LPS position (mm) of the mean voxel above ``BODY_HU``."""
    index = np.argwhere(sitk.GetArrayViewFromImage(image) > BODY_HU).mean(axis=0)[::-1]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))


def z_extent_mm(image: sitk.Image) -> float:
    return image.GetSize()[2] * image.GetSpacing()[2]


def _method(fixed: sitk.Image) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.3, seed=1)
    method.SetMetricFixedMask(sitk.Cast(fixed > BODY_HU, sitk.sitkUInt8))
    method.SetInterpolator(sitk.sitkLinear)
    return method


def register(
    fixed: sitk.Image, moving: sitk.Image, *, deformable: bool = True
) -> dict[str, tuple[sitk.Transform, float]]:
    """Each stage's transform (fixed physical point -> moving physical point) and the seconds taken to reach it.

    Args:
        fixed, moving: :func:`metric_image` of the target CT and of the atlas CT.
        deformable: run the B-spline stage after the affine one.
    """
    start = time.perf_counter()
    results: dict[str, tuple[sitk.Transform, float]] = {}

    translation = sitk.TranslationTransform(3, (body_centroid(moving) - body_centroid(fixed)).tolist())
    method = _method(fixed)
    half_range = round(max(z_extent_mm(fixed), z_extent_mm(moving)) / 2 / Z_STEP_MM)
    method.SetOptimizerAsExhaustive([0, 0, half_range], stepLength=Z_STEP_MM)
    method.SetInitialTransform(translation, inPlace=True)
    method.Execute(fixed, moving)
    results["translation"] = (sitk.TranslationTransform(translation), time.perf_counter() - start)

    affine = sitk.AffineTransform(3)
    affine.SetCenter(body_centroid(fixed).tolist())
    affine.SetTranslation(translation.GetOffset())
    method = _method(fixed)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetInitialTransform(affine, inPlace=True)
    method.Execute(fixed, moving)
    results["affine"] = (sitk.AffineTransform(affine), time.perf_counter() - start)
    if not deformable:
        return results

    bspline = sitk.BSplineTransformInitializer(fixed, list(BSPLINE_MESH))
    method = _method(fixed)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100)
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(bspline, inPlace=True)
    method.Execute(fixed, moving)
    results["affine + B-spline"] = (sitk.CompositeTransform([affine, bspline]), time.perf_counter() - start)
    return results


def propagate(labels: Volume, transform: sitk.Transform, onto: Volume) -> np.ndarray:
    """The atlas ``labels`` warped by ``transform`` onto ``onto``'s grid (nearest neighbour), (D, H, W) uint8.

    Target voxels that map outside the atlas are background.
    """
    reference = to_sitk(onto.with_array(np.zeros(onto.shape, np.uint8)))
    warped = sitk.Resample(to_sitk(labels), reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(warped)


def score_fold(atlas: tuple[Volume, Volume], target: tuple[Volume, Volume]) -> dict[str, tuple[OrganSummary, float]]:
    """Each stage's scores of the atlas labels on the target CT, and the seconds the registration took to reach it.

    Args:
        atlas: the labeled CT registered (its CT and its labels on its grid).
        target: the other patient's CT and its reference labels, on which the scores are computed.
    """
    (atlas_ct, atlas_labels), (target_ct, target_labels) = atlas, target
    transforms = register(metric_image(target_ct), metric_image(atlas_ct))
    scored = {}
    for stage, (transform, seconds) in transforms.items():
        predicted = propagate(atlas_labels, transform, target_ct)
        result = evaluate_labels(predicted, target_labels.array, target_labels.spacing_zyx, SYNAPSE13)
        scored[stage] = (summarise(result), seconds)
    return scored


def fold_rows(fold: int, scored: dict[str, tuple[OrganSummary, float]]) -> list[str]:
    """The table rows of one fold's stages."""
    atlas, target = FOLDS[fold]
    rows = []
    for stage, (summary, seconds) in scored.items():
        organs = ", ".join(f"{name} {dice:.2f}" for name, dice in summary.dice.items())
        rows.append(
            f"| {fold}: {SAMPLE_NAMES[atlas]} onto {SAMPLE_NAMES[target]} | {stage} | {summary.mean_dice:.3f} | "
            f"{summary.minority_mean_dice:.3f} | {summary.mean_hd95:.1f} | {len(summary.missed)} | {organs} | "
            f"{seconds:.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(".bench-data"), help="bench_accuracy.py's data folder")
    parser.add_argument("--folds", type=int, nargs="+", choices=sorted(FOLDS), default=sorted(FOLDS))
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()

    # One thread: the metric's sums then come in one order, and a rerun reproduces the table to the digit.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    data = prepare_data(args.data)
    lines = [
        "# Registration alone: a fold's labeled CT registered onto the other patient's CT, its labels scored there",
        "",
        "**Reference labels of both labeled CTs are TotalSegmentator model outputs, not manual ground truth.**",
        "",
        f"- Command: `python Testing/Benchmarks/bench_atlas.py --folds {' '.join(map(str, args.folds))}`",
        f"- {machine_line('cpu')}; SimpleITK {sitk.Version.VersionString()}, "
        f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()} threads",
        "- Scores as in `bench_accuracy.py` (native grid, organs present in the reference); Dice per organ in "
        "the reference's organ order.",
        "",
        "| fold | registration | mean Dice | minority Dice | mean HD95 (mm) | missed | Dice per organ | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fold in args.folds:
        atlas, target = (data.test_case(name) for name in FOLDS[fold])
        scored = score_fold(atlas, target)
        lines += fold_rows(fold, scored)
    table = "\n".join(lines)
    print(table)
    write_table(table, args.out)


if __name__ == "__main__":
    main()
