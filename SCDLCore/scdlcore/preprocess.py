"""Preprocessing: every CT becomes the network's input through one path, and results come back through its inverse.

:meth:`Preprocessing.prepare` is that path, shared by training, ``scdl segment``, the case suggestions and
validation:

1. **canonical orientation** (:class:`Reorientation`): the array is transposed and flipped, exactly (no
   interpolation), so that its voxel axes x, y, z (array axes 2, 1, 0) point toward the patient's Right,
   Anterior and Superior: ``"RAS"``, the axis codes of NIfTI/nibabel and MONAI's ``Orientation``. The same
   anatomy stored in any axis order (flipped, permuted, oblique: the nearest axis order) reaches the network
   in one layout;
2. **body crop** (:func:`body_bbox`), in that orientation;
3. **resampling** to the model spacing (:func:`resample_to_spacing`, in voxel-index space);
4. **HU window** to [0, 1] (:func:`hu_window`).

Arrays are (D, H, W) = (z, y, x); ``spacing`` is (x, y, z) mm (see :mod:`scdlcore.io`).

Example::

    plan = Preprocessing(spacing=(1.5, 1.5, 2.0), hu_window=(-125, 275))
    prepared = plan.prepare(read_image("case01.nii.gz"))   # any direction
    x = prepared.image()                                   # (D', H', W') float32 in [0, 1], canonical
    classes = prepared.labels(read_label("case01_label.nii.gz"))  # the label map on the same model grid
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from scdlcore.io.volume import Volume

__all__ = [
    "BODY_SEARCH_MM",
    "CANONICAL_ORIENTATION",
    "NetworkInput",
    "Preprocessing",
    "Reorientation",
    "body_bbox",
    "crop",
    "hu_window",
    "resample_to_spacing",
]

#: body_bbox looks for the body on voxels about this far apart (mm).
BODY_SEARCH_MM = 4.0

#: The orientation the network sees: voxel axes x, y, z toward the patient's Right, Anterior, Superior.
CANONICAL_ORIENTATION = "RAS"
#: LPS direction of an axis pointing toward each patient side (LPS: +x left, +y posterior, +z superior).
_SIDE_LPS = {"R": (-1, 0, 0), "L": (1, 0, 0), "A": (0, -1, 0), "P": (0, 1, 0), "I": (0, 0, -1), "S": (0, 0, 1)}


def orientation_directions(code: str) -> np.ndarray:
    """3x3 matrix whose column n is the LPS direction of voxel axis n in orientation ``code`` (e.g. "RAS").

    Raises:
        ValueError: not three letters naming one side of each of the three body axes.
    """
    code = str(code).upper()
    columns = np.array([_SIDE_LPS.get(c, (0, 0, 0)) for c in code], dtype=float).T
    if len(code) != 3 or not np.array_equal(np.abs(columns).sum(axis=1), [1, 1, 1]):
        raise ValueError(
            f"Orientation {code!r} is not three letters naming each body axis once: one of R/L, "
            "one of A/P, one of S/I (e.g. 'RAS')."
        )
    return columns


@dataclass(frozen=True)
class Reorientation:
    """The exact array operation that puts a volume into an orientation: transpose, then flip.

    ``canonical = np.flip(array.transpose(axes), flips)``, so canonical array axis ``a`` is input array
    axis ``axes[a]``, reversed where ``flips[a]``. Both are array order (z, y, x).
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @classmethod
    def to(cls, code: str, direction: Sequence[float]) -> Reorientation:
        """The reorientation of a volume with ``direction`` (9 floats, row-major, LPS) into orientation ``code``.

        For an oblique direction the nearest axis order is taken: the permutation whose axes are most
        parallel to the target's (largest sum of |cosines|); the physical geometry stays exact, the
        result is only approximately aligned.
        """
        target = orientation_directions(code)
        cosines = target.T @ np.array(direction, dtype=float).reshape(3, 3)  # [target axis, input axis]
        best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(cosines[a, p[a]]) for a in range(3)))
        # xyz order -> array order: canonical array axis 2 - a is target axis a, from input array axis 2 - best[a].
        axes = tuple(2 - best[2 - a] for a in range(3))
        flips = tuple(bool(cosines[2 - a, best[2 - a]] < 0) for a in range(3))
        return cls(axes, flips)  # type: ignore[arg-type]

    @property
    def is_identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The input-layout array (D, H, W) in the target layout (a view)."""
        flipped = [axis for axis, flip in enumerate(self.flips) if flip]
        return np.flip(array.transpose(self.axes), flipped) if flipped else array.transpose(self.axes)

    def undo(self, array: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`apply`: a target-layout array back in the input's layout (a view)."""
        flipped = [axis for axis, flip in enumerate(self.flips) if flip]
        return (np.flip(array, flipped) if flipped else array).transpose(np.argsort(self.axes))

    def volume(self, volume: Volume) -> Volume:
        """The same physical image with its array in the target layout; voxels are not interpolated."""
        if self.is_identity:
            return volume
        shape = np.array(volume.shape)
        # The new first voxel is the input voxel at the far end of every flipped axis (index in array order).
        first_zyx = [shape[axis] - 1 if flip else 0 for axis, flip in zip(self.axes, self.flips)]
        start_zyx = np.zeros(3)
        start_zyx[list(self.axes)] = first_zyx
        origin = volume.ijk_to_lps @ np.array([*start_zyx[::-1], 1.0])
        columns = np.array(volume.direction).reshape(3, 3)
        new_columns = np.empty((3, 3))
        spacing = []
        for a in range(3):  # xyz order: target axis a is array axis 2 - a
            axis, flip = self.axes[2 - a], self.flips[2 - a]
            new_columns[:, a] = columns[:, 2 - axis] * (-1 if flip else 1) + 0.0  # no -0.0 in the direction
            spacing.append(volume.spacing[2 - axis])
        return Volume(self.apply(volume.array), tuple(spacing), tuple(origin[:3]), tuple(new_columns.ravel()))


def hu_window(array: np.ndarray, window: tuple[float, float] = (-125.0, 275.0)) -> np.ndarray:
    """Clip Hounsfield units to a window and scale it linearly to [0, 1].

    Args:
        array: CT intensities in HU, any shape.
        window: (low, high) HU; ``low`` maps to 0 and ``high`` to 1. The default (-125, 275) is the
            abdominal soft-tissue window: fat at -100 HU gives 0.0625, liver at 60 HU 0.4625.

    Returns:
        float32 array of the input's shape, values in [0, 1].

    Raises:
        ValueError: ``low >= high``.
    """
    low, high = (float(v) for v in window)
    if not low < high:
        raise ValueError(f"hu_window needs low < high HU, got window={window}.")
    scaled = (np.asarray(array, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def resample_to_spacing(volume: Volume, spacing: Sequence[float], *, is_label: bool) -> Volume:
    """Resample to a new voxel size, covering the same physical extent.

    The output grid keeps the direction and the outer corner of the first voxel; each axis gets
    ``round(size * old_spacing / new_spacing)`` voxels (at least 1). Because ``origin`` is the centre
    of the first voxel, it moves by half the spacing change along each axis.

    The interpolation runs in voxel-index space (output voxel ``o`` samples input index
    ``(o + 0.5) * new / old - 0.5`` per axis, clamped to the volume), so its result depends only on
    the array and the two spacings, never on rounding in the origin: the same CT stored in another
    axis order, once in the canonical orientation, gives a bit-identical network input.

    Args:
        volume: the input volume.
        spacing: output voxel size (x, y, z) mm.
        is_label: nearest neighbour for label maps (dtype kept), linear for images (float32).

    Returns:
        The resampled volume, or ``volume`` itself if it already has this spacing.

    Raises:
        ValueError: a spacing that is not three positive numbers.
    """
    new_spacing = tuple(float(s) for s in spacing)
    if len(new_spacing) != 3 or min(new_spacing) <= 0 or not all(map(math.isfinite, new_spacing)):
        raise ValueError(f"spacing must be three positive (x, y, z) mm values, got {tuple(spacing)}.")
    if new_spacing == volume.spacing:
        return volume
    old = np.array(volume.spacing)
    new = np.array(new_spacing)
    ratio_zyx = (new / old)[::-1]
    shape_zyx = [max(1, round(n / r)) for n, r in zip(volume.shape, ratio_zyx)]
    direction = np.array(volume.direction).reshape(3, 3)
    origin = np.array(volume.origin) + direction @ ((new - old) / 2)
    array = volume.array
    for axis, (size, ratio) in enumerate(zip(shape_zyx, ratio_zyx)):
        array = _resample_axis(array, axis, size, ratio, is_label=is_label)
    if not is_label:
        array = array.astype(np.float32, copy=False)
    return Volume(np.ascontiguousarray(array), new_spacing, tuple(origin), volume.direction)


def model_index(size: int, ratio: float) -> np.ndarray:
    """Input indices sampled by the ``size`` output voxels of an axis whose voxels grow by ``ratio`` (new / old).

    Output voxel ``o`` covers the input from ``o * ratio - 0.5`` to ``(o + 1) * ratio - 0.5``: its centre,
    ``(o + 0.5) * ratio - 0.5``. The inverse, input index ``i`` -> output index ``(i + 0.5) / ratio - 0.5``,
    is what :class:`NetworkInput` uses to bring results back.
    """
    return (np.arange(size) + 0.5) * ratio - 0.5


def _resample_axis(array: np.ndarray, axis: int, size: int, ratio: float, *, is_label: bool) -> np.ndarray:
    """``array`` resampled along one axis to ``size`` voxels (linear, or nearest for labels), edges clamped."""
    n = array.shape[axis]
    coords = np.clip(model_index(size, ratio), 0, n - 1)
    if is_label:
        return np.take(array, np.floor(coords + 0.5).astype(np.intp), axis=axis)
    lower = np.floor(coords).astype(np.intp)
    upper = np.minimum(lower + 1, n - 1)
    weight = (coords - lower).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    low = np.take(array, lower, axis=axis).astype(np.float32, copy=False)
    return low + weight * (np.take(array, upper, axis=axis) - low)


def crop(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    """The sub-volume ``volume.array[box]`` (a view), its origin moved to the centre of its first voxel.

    Args:
        volume: any volume. box: slices in array order (z, y, x), as :func:`body_bbox` returns.
    """
    start_xyz = [axis.start or 0 for axis in reversed(box)]
    origin = volume.ijk_to_lps @ np.array([*start_xyz, 1.0])
    return Volume(volume.array[box], volume.spacing, tuple(origin[:3]), volume.direction)


def body_bbox(image: Volume, threshold_hu: float = -500.0, margin_mm: float = 10.0) -> tuple[slice, slice, slice]:
    """Bounding box of the body: the largest connected region above ``threshold_hu``, plus a margin.

    The largest component leaves out the scanner table, clothes and noise when they do not touch the
    body. It is searched on blocks of about ``BODY_SEARCH_MM`` (a block counts when all its voxels are
    above the threshold, so gaps between body and table stay open; the full grid when no block counts):
    labelling a 512x512x300 CT voxel by voxel takes seconds, and the box needs only the margin's accuracy.
    The box may therefore reach up to ``BODY_SEARCH_MM`` further than the margin, and may leave out body
    parts thinner than a block (beyond the margin).

    Args:
        image: CT in HU, (D, H, W).
        threshold_hu: voxels above it are body (air is about -1000 HU, fat -100 HU).
        margin_mm: added on each side, clipped to the image.

    Returns:
        Slices in array order (z, y, x), usable as ``image.array[bbox]``.

    Raises:
        ValueError: no voxel above the threshold.
    """
    steps = [max(1, int(BODY_SEARCH_MM // s)) for s in image.spacing_zyx]
    box = _largest_component_box(_all_above(image.array, steps, threshold_hu))
    if box is None:
        steps = [1, 1, 1]
        box = _largest_component_box(image.array > threshold_hu)
    if box is None:
        raise ValueError(
            f"No voxel above {threshold_hu:g} HU: the image holds no body. Is it a CT in Hounsfield units?"
        )
    margins = [math.ceil(margin_mm / s) for s in image.spacing_zyx]
    # The body can reach into the partly-body block beside the outermost whole-body block (none when step = 1).
    return tuple(  # type: ignore[return-value]
        slice(max(0, (axis.start - (step > 1)) * step - m), min(n, (axis.stop + (step > 1)) * step + m))
        for axis, step, m, n in zip(box, steps, margins, image.shape)
    )


def _all_above(array: np.ndarray, steps: list[int], threshold: float) -> np.ndarray:
    """Per block of ``steps`` voxels (z, y, x): are all its voxels above ``threshold``? (Partial edge blocks dropped.)

    One block axis at a time, slices first: each pass then takes the minimum of whole rows at once, which is
    faster than one reduction over the three scattered block axes.
    """
    counts = [n // step for n, step in zip(array.shape, steps)]
    blocks = array[: counts[0] * steps[0], : counts[1] * steps[1], : counts[2] * steps[2]]
    blocks = blocks.reshape(counts[0], steps[0], counts[1], steps[1], counts[2], steps[2])
    lowest = np.minimum.reduce(blocks, axis=1)  # over a block's slices -> (z, y, step y, x, step x)
    lowest = np.minimum.reduce(lowest, axis=2)  # over its rows -> (z, y, x, step x)
    return (lowest > threshold).all(axis=3)


def _largest_component_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Bounding box (in ``mask``'s indices) of its largest connected component; None for an empty mask."""
    components, count = ndimage.label(mask)
    if count == 0:
        return None
    largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    return ndimage.find_objects(components)[largest - 1]


@dataclass(frozen=True)
class Preprocessing:
    """The plan that turns any CT into the network's input; a bundle and a training config each hold one.

    Attributes:
        spacing: model voxel size (x, y, z) mm.
        hu_window: (low, high) HU mapped to [0, 1].
        orientation: the axis codes the network expects (:data:`CANONICAL_ORIENTATION`).
        body_crop: keep only the body's bounding box (:func:`body_bbox`); outside it is background.
    """

    spacing: tuple[float, float, float]
    hu_window: tuple[float, float]
    orientation: str = CANONICAL_ORIENTATION
    body_crop: bool = True

    def prepare(self, volume: Volume) -> NetworkInput:
        """The CT ``volume`` (HU, any direction) on the model grid, with the way back to its own grid.

        Raises:
            ValueError: an image with no body (nothing above -500 HU) when ``body_crop`` is on.
        """
        reorientation = Reorientation.to(self.orientation, volume.direction)
        oriented = reorientation.volume(volume)
        box = body_bbox(oriented) if self.body_crop else tuple(slice(0, n) for n in oriented.shape)
        cropped = crop(oriented, box)  # type: ignore[arg-type]
        if not cropped.array.flags.c_contiguous:  # a flipped or transposed view: resample a compact copy
            cropped = cropped.with_array(np.ascontiguousarray(cropped.array))
        work = resample_to_spacing(cropped, self.spacing, is_label=False)
        return NetworkInput(work, self, reorientation, box, oriented.shape, oriented.spacing)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NetworkInput:
    """One CT through :meth:`Preprocessing.prepare`.

    Attributes:
        grid: the model-grid volume in HU (D', H', W'), canonical orientation.
        plan: the preprocessing that made it.
        reorientation: input array -> canonical array.
        box: the body crop, in the canonical array (z, y, x).
        oriented_shape: the canonical array's shape (the input's shape, permuted).
        oriented_spacing: the input's voxel size (x, y, z) mm in canonical axis order.
    """

    grid: Volume
    plan: Preprocessing
    reorientation: Reorientation
    box: tuple[slice, slice, slice]
    oriented_shape: tuple[int, int, int]
    oriented_spacing: tuple[float, float, float]

    def image(self) -> np.ndarray:
        """The network input: (D', H', W') float32, HU-windowed to [0, 1]."""
        return hu_window(self.grid.array, self.plan.hu_window)

    def labels(self, label: Volume) -> np.ndarray:
        """A label map on the input CT's grid, brought to the model grid (nearest neighbour) by the same path."""
        array = self.reorientation.apply(label.array)
        if array.shape != self.oriented_shape:
            raise ValueError(f"The label map's shape {label.shape} is not its CT's.")
        array = array[self.box]
        for axis, (size, ratio) in enumerate(zip(self.grid.shape, self._ratio_zyx)):
            array = _resample_axis(array, axis, size, ratio, is_label=True)
        return np.ascontiguousarray(array)

    def index_map(self) -> tuple[np.ndarray, np.ndarray]:
        """Per axis (z, y, x) of the cropped canonical input: model index = offset + scale * input index.

        The inverse of the resampling's :func:`model_index`, from shapes and spacings alone.
        """
        scale = 1.0 / self._ratio_zyx
        return scale, 0.5 * scale - 0.5

    def to_input(self, oriented: np.ndarray) -> np.ndarray:
        """An array on the canonical input grid (``oriented_shape``) back in the input's own layout, exactly."""
        return np.ascontiguousarray(self.reorientation.undo(oriented))

    @property
    def _ratio_zyx(self) -> np.ndarray:
        """Model voxel size over input voxel size, per axis (z, y, x)."""
        return np.array(self.grid.spacing_zyx) / np.array(self.oriented_spacing[::-1])
