"""Inference: a model bundle, loaded once, segments CT volumes onto their own voxel grid.

:meth:`Predictor.predict_volume` runs the pipeline of SCDL_METHOD.md section 5:

1. preprocessing, the one path training uses too (:meth:`scdlcore.preprocess.Preprocessing.prepare`): the
   CT is put into the canonical orientation the bundle records (an exact transpose and flip), cropped to
   the body (the largest region above -500 HU plus 10 mm), resampled (linear) to the bundle's spacing,
   the *model grid*, and HU-windowed to [0, 1];
2. sliding window on ``device``: ``bundle.patch_size`` patches with ``overlap``, softmax
   probabilities weighted by a Gaussian and accumulated on the device (CPS bundles average both
   networks' logits first); bf16 autocast and channels-last-3d on CUDA;
3. one region per organ (``largest_component``): each organ keeps only its largest 26-connected region on the
   model grid and its other voxels become background. Every Synapse organ is one connected structure, and
   a model trained on few patients scatters small false islands far from the organ (a stray "spleen" in
   the pelvis), which cost little Dice but dominate HD95 (nnU-Net's postprocessing, applied always here);
4. back to the input grid, label-aware: the class probabilities are interpolated trilinearly at
   every input voxel and the argmax is taken there. Nearest neighbour on the model-grid label map
   would draw organ borders as staircases of model-voxel steps (1.5-2 mm on a 0.7 mm CT); this keeps
   them smooth and still lands exactly on the input geometry. It runs a few input slices at a time,
   only for the classes the model found and only inside the box holding them, so float
   probabilities never exist at input resolution beyond one slab; and where the eight model voxels
   around an input voxel agree, their class is the answer (exactly), so only borders are interpolated.
   The result is computed on the canonically oriented input grid and transposed back into the file's
   own axis order, exactly.

Memory: the input CT (float32), the C-class probability map on the model grid (14 classes x
266x266x150 voxels = 0.6 GB for a 512x512x300 CT resampled to 1.5x1.5x2 mm), during step 4 a
voxel-major copy of it for the classes found (when organ borders need it), and the uint8 output.

Example::

    predictor = Predictor(ModelRegistry().resolve("starter"), torch.device("cuda"))
    labels = predictor.predict_file("ct.nii.gz", "ct.seg.nrrd")
    print(organ_volumes_ml(labels, predictor.bundle.labels))
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import threading
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from .bundle import ModelBundle
from .classes import class_argmax
from .events import Progress
from .io import Volume, read_image, write_label
from .labels import LabelTable, value_counts

__all__ = ["POSTPROCESSING", "InferenceCancelled", "Predictor", "check_organs", "keep_largest_components", "organ_volumes_ml"]

_SLAB_ELEMENTS = 1 << 24  # floats per interpolation slab (64 MB): bounds memory at input resolution
#: What ``largest_component`` does, in words: benchmarks and model.json record it beside the scores it produced.
POSTPROCESSING = "largest connected region per organ"
_NEIGHBOURS_26 = np.ones((3, 3, 3), dtype=bool)
_GAUSSIAN_SIGMA = 0.125  # of the patch size, as in nnU-Net and MONAI
# Linear interpolation along one axis at many points: lower index, upper index, weight of the upper one.
_Corners = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Progress fractions at which each phase ends.
_PREPROCESS_END, _WINDOWS_END = 0.05, 0.9


class InferenceCancelled(Exception):
    """The ``cancel`` event was set while a volume was being segmented."""


class Predictor:
    """Segments CT volumes with one bundle; the networks are built once, in eval mode on ``device``.

    Args:
        bundle: the model (see :func:`scdlcore.bundle.load_bundle` / ``ModelRegistry.resolve``).
        device: where the networks and the sliding-window accumulation run.
        overlap: fraction of a patch shared by neighbouring windows, in [0, 1); 0.5 or more gives
            every voxel several Gaussian-weighted predictions.
        sw_batch_size: windows per forward pass; None = 4 on CUDA, 1 on CPU.
        ensemble: ``"mean"`` of all networks' logits or ``"first"`` network only (faster);
            None = the bundle's choice.
        body_crop: segment only the body's bounding box (voxels outside it are background).
        amp: bf16 autocast on CUDA (ignored on CPU).
        networks: the networks to segment with, in place of the bundle's weights (training validates its
            current networks through this predictor; the bundle then needs no weights file).
        largest_component: keep each organ's largest connected region only (step 3 above).

    Raises:
        ValueError: a bad option.
        BundleError: a bundle that records no input orientation (see ``ModelBundle.preprocessing``).
    """

    def __init__(
        self,
        bundle: ModelBundle,
        device: torch.device | str,
        *,
        overlap: float = 0.5,
        sw_batch_size: int | None = None,
        ensemble: str | None = None,
        body_crop: bool = True,
        amp: bool = True,
        networks: Sequence[torch.nn.Module] | None = None,
        largest_component: bool = True,
    ) -> None:
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be >= 0 and < 1, got {overlap}.")
        ensemble = ensemble or bundle.ensemble
        if ensemble not in ("mean", "first"):
            raise ValueError(f"ensemble must be 'mean' or 'first', got {ensemble!r}.")
        self.bundle, self.device = bundle, torch.device(device)
        self.overlap, self.ensemble, self.largest_component = overlap, ensemble, largest_component
        self.preprocessing = dataclasses.replace(bundle.preprocessing, body_crop=body_crop)
        cuda = self.device.type == "cuda"
        self.sw_batch_size = sw_batch_size or (4 if cuda else 1)
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}.")
        self.amp = amp and cuda
        count = 1 if ensemble == "first" else None
        self.networks = list(networks)[:count] if networks is not None else bundle.build_networks(self.device, count=count)
        # Channels-last-3d unlocks the fast 3D convolution kernels: cuDNN's (PERFORMANCE.md) and oneDNN's on the CPU.
        self.networks = [net.to(memory_format=torch.channels_last_3d) for net in self.networks]
        if cuda:
            torch.backends.cudnn.benchmark = True  # one patch shape: the tuned kernel is reused
        self._gaussian = _gaussian_map(bundle.patch_size, self.device)

    def predict_file(
        self,
        input: str | os.PathLike,
        output: str | os.PathLike,
        *,
        organs: Sequence[str] | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Volume:
        """Read a CT (file or DICOM folder), segment it, write the label map (``.seg.nrrd`` or plain map).

        Returns:
            The label map on the input grid (see :meth:`predict_volume`).
        """
        labels = self.predict_volume(read_image(input), organs=organs, progress=progress, cancel=cancel)
        write_label(output, labels, self.bundle.labels)
        return labels

    def predict_volume(
        self,
        volume: Volume,
        organs: Sequence[str] | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Volume:
        """Segment a CT volume.

        Args:
            volume: CT in HU, array (D, H, W), any spacing and direction.
            organs: machine names of the organs to keep (``["liver", "spleen"]``); None = all. Other
                organs still compete for voxels and then become background.
            progress: advanced from 0 to ``progress.total`` units, with a ``phase`` field.
            cancel: checked between window batches.

        Returns:
            The label map (D, H, W) holding label-table *values* (uint8; uint16 if a value exceeds 255),
            on exactly the input grid.

        Raises:
            ValueError: an unknown organ name, or an image with no body (nothing above -500 HU).
            InferenceCancelled: ``cancel`` was set.
        """
        lut = self._value_lut(organs)
        _report(progress, 0.0, "preprocess")
        prepared = self.preprocessing.prepare(volume)
        image = torch.from_numpy(prepared.image())
        _report(progress, _PREPROCESS_END, "infer")
        probs = self.sliding_window(image, progress=progress, cancel=cancel)
        del image
        _report(progress, _WINDOWS_END, "postprocess")
        if self.largest_component:
            keep_largest_components(probs)
        dtype = np.uint8 if max(self.bundle.labels.values) < 256 else np.uint16
        output = np.zeros(prepared.oriented_shape, dtype=dtype)
        with torch.inference_mode():
            _probs_to_grid(probs, prepared.index_map(), lut, output[prepared.box])
        _report(progress, 1.0, "write")
        return volume.with_array(prepared.to_input(output))

    def sliding_window(
        self,
        image: torch.Tensor,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        networks: Sequence[torch.nn.Module] | None = None,
    ) -> torch.Tensor:
        """Class probabilities of a preprocessed image on the model grid.

        Args:
            image: HU-windowed image (D, H, W) in [0, 1], on any device; smaller than a patch is fine.
            progress: advanced over the sliding-window phase (5% to 90% of ``progress.total``).
            cancel: checked between window batches.
            networks: the networks whose logits are averaged; default the predictor's ensemble (one network of a
                CPS pair gives that network's own opinion, as the case suggestions need).

        Returns:
            probs (C, D, H, W), float32 on ``self.device``.
        """
        patch = self.bundle.patch_size
        shape = tuple(image.shape)
        padded = tuple(max(n, p) for n, p in zip(shape, patch))
        # Padding at the far end with 0 (air and fat after the window) lets a patch fit anywhere.
        pad = [amount for n, p in zip(reversed(shape), reversed(padded)) for amount in (0, p - n)]
        x = F.pad(image.to(self.device, torch.float32), pad)
        probs = torch.zeros((self.bundle.num_classes, *padded), device=self.device)
        weight = torch.zeros(padded, device=self.device)
        starts = list(itertools.product(*(_window_starts(n, p, self.overlap) for n, p in zip(padded, patch))))
        with torch.inference_mode():
            for first in range(0, len(starts), self.sw_batch_size):
                if cancel is not None and cancel.is_set():
                    raise InferenceCancelled("Segmentation cancelled.")
                batch = starts[first : first + self.sw_batch_size]
                windows = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in batch]
                weighted = self._forward(torch.stack([x[window] for window in windows])[:, None], networks or self.networks)
                for window, patch_probs in zip(windows, weighted):
                    probs[(slice(None), *window)] += patch_probs
                    weight[window] += self._gaussian
                done = (first + len(batch)) / len(starts)
                fraction = _PREPROCESS_END + done * (_WINDOWS_END - _PREPROCESS_END)
                _report(progress, fraction, "infer", only_if_advanced=True)
            probs /= weight
        return probs[:, : shape[0], : shape[1], : shape[2]]

    def _forward(self, patches: torch.Tensor, networks: Sequence[torch.nn.Module]) -> torch.Tensor:
        """Gaussian-weighted softmax of the averaged ``networks``: (B, 1, d, h, w) -> (B, C, d, h, w) float32."""
        patches = patches.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = sum(net(patches)[0].float() for net in networks) / len(networks)
        return torch.softmax(logits, dim=1) * self._gaussian

    def _value_lut(self, organs: Sequence[str] | None) -> torch.Tensor:
        """Class index -> output label value (0 for organs left out), on the device."""
        table = self.bundle.labels
        keep = set(check_organs(table, organs))
        values = [0] + [label.value if label.name in keep else 0 for label in table.labels]
        return torch.tensor(values, dtype=torch.int32, device=self.device)


def keep_largest_components(probs: torch.Tensor) -> None:
    """Make every voxel outside its winning class's largest 26-connected region background, in place.

    Args:
        probs: class probabilities (C, D, H, W) on the model grid, class 0 background. Voxels of a class's smaller
            regions get probability 1 for background and 0 for the rest, so the interpolation to the input grid
            treats them as background throughout.
    """
    classes = class_argmax(probs).cpu().numpy()
    stray = np.zeros(classes.shape, dtype=bool)
    for c in np.unique(classes[classes > 0]):
        regions, count = scipy.ndimage.label(classes == c, structure=_NEIGHBOURS_26)
        if count > 1:
            sizes = np.bincount(regions.ravel())
            sizes[0] = 0
            stray |= (regions > 0) & (regions != sizes.argmax())
    if stray.any():
        mask = torch.from_numpy(stray).to(probs.device)
        probs[:, mask] = 0.0
        probs[0, mask] = 1.0


def check_organs(table: LabelTable, organs: Sequence[str] | None) -> list[str]:
    """The organ names to keep (all for None), checked against ``table``.

    Raises:
        ValueError: a name not in the table (the message suggests the closest one).
    """
    if organs is None:
        return list(table.names)
    for name in organs:
        if name not in table.names:
            close = difflib.get_close_matches(name, table.names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"Unknown organ {name!r} in label table {table.name!r}; {hint}Organs: {', '.join(table.names)}.")
    return list(organs)


def organ_volumes_ml(labels: Volume, table: LabelTable) -> dict[str, float]:
    """Volume of every organ of ``table`` in mL (0.0 when absent).

    Args:
        labels: label map with ``table``'s values, (D, H, W).
        table: the label table.
    """
    counts = value_counts(labels.array)
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    return {label.name: counts.get(label.value, 0) * voxel_ml for label in table.labels}


def _report(progress: Progress | None, fraction: float, stage: str, *, only_if_advanced: bool = False) -> None:
    """Advance ``progress`` to ``fraction`` of its total in ``stage`` (preprocess, infer, postprocess, write);
    inside a loop only when the unit count changes."""
    if progress is None:
        return
    done = round(fraction * progress.total)
    if not (only_if_advanced and done == progress.done):
        progress.stage = stage
        progress.update(done)


def _probs_to_grid(
    probs: torch.Tensor, index_map: tuple[np.ndarray, np.ndarray], lut: torch.Tensor, out: np.ndarray
) -> None:
    """Fill ``out`` (the input-grid crop, (D, H, W)) with ``lut[argmax]`` of trilinearly interpolated ``probs``.

    Only the classes that win somewhere on the model grid take part, and only input voxels inside the
    box of the model grid's foreground (plus one voxel) are computed; the rest stays background.
    An input voxel whose eight surrounding model voxels share one winning class takes that class
    directly: a convex mix of probability vectors that all peak at class c peaks at c too, so this is
    exact, and only voxels near organ borders pay for the interpolation.
    """
    classes = class_argmax(probs)
    present = torch.unique(classes)
    if bool((lut[present] == 0).all()):
        return  # nothing (kept) was found
    axes = _foreground_axes(lut[classes] > 0, index_map, out.shape)
    if axes is None:
        return
    (z_out, z), (y_out, y), (x_out, x) = axes
    cell_values = _uniform_cell_values(classes, lut)
    values = lut[present]
    table = None  # voxel-major (D*H*W, C') copy, made when scattered border voxels first need it
    rows, cols = y_out.stop - y_out.start, x_out.stop - x_out.start
    step = max(1, _SLAB_ELEMENTS // (len(present) * rows * cols))
    dtype = torch.uint8 if out.dtype == np.uint8 else torch.int32
    for first in range(0, len(z[0]), step):
        z_slab = tuple(t[first : first + step] for t in z)
        labels = cell_values[z_slab[0]][:, y[0]][:, :, x[0]]  # (n, H', W'), -1 where the corners disagree
        mixed = labels < 0
        count = int(mixed.sum())
        if 3 * count > mixed.numel():  # mostly borders (a noisy model): interpolating all of it is cheaper
            labels = values[class_argmax(_interpolate_slab(probs, present, z_slab, y, x))]
        elif count:
            if table is None:  # gathering whole probability vectors per voxel needs them contiguous
                table = probs.flatten(1).T.index_select(1, present)
            at = torch.nonzero(mixed, as_tuple=True)
            points = [tuple(t[i] for t in axis) for axis, i in zip((z_slab, y, x), at)]
            labels[at] = values[_interpolate_points(table, probs.shape[1:], *points).argmax(1)]
        z_start = z_out.start + first
        out[z_start : z_start + labels.shape[0], y_out, x_out] = labels.to(dtype).cpu().numpy()


def _foreground_axes(
    foreground: torch.Tensor, index_map: tuple[np.ndarray, np.ndarray], out_shape: Sequence[int]
) -> list[tuple[slice, _Corners]] | None:
    """Per axis (z, y, x): the input indices whose model-grid coordinate lies within one model voxel of the
    ``foreground`` (D, H, W) box, and their interpolation corners; None when no input voxel does.

    Beyond the model grid's ends the coordinates clamp to its edge voxels, so foreground on an edge
    reaches the input's end.
    """
    scale, offset = index_map
    axes = []
    for axis, size in enumerate(foreground.shape):
        hits = torch.nonzero(_any_except(foreground, axis))[:, 0]
        low, high = int(hits.min()) - 1, int(hits.max()) + 1
        start = 0 if low < 0 else max(0, math.ceil((low - offset[axis]) / scale[axis]))
        stop = out_shape[axis] if high >= size else min(out_shape[axis], math.floor((high - offset[axis]) / scale[axis]) + 1)
        if start >= stop:
            return None
        coords = offset[axis] + scale[axis] * np.arange(start, stop)
        axes.append((slice(start, stop), _linear_weights(coords, size, foreground.device)))
    return axes


def _uniform_cell_values(classes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per model voxel (i, j, k): ``lut`` of the class shared by the corners (i..i+1, j..j+1, k..k+1), clamped
    at the far edges, or -1 where they differ. (D, H, W) int32."""
    low, high = classes.clone(), classes.clone()
    for axis, size in enumerate(classes.shape):
        after = torch.arange(1, size + 1, device=classes.device).clamp_max(size - 1)
        low = torch.minimum(low, low.index_select(axis, after))
        high = torch.maximum(high, high.index_select(axis, after))
    return torch.where(low == high, lut[low], -1)


def _interpolate_slab(probs: torch.Tensor, classes: torch.Tensor, z: _Corners, y: _Corners, x: _Corners) -> torch.Tensor:
    """``probs`` (C, D, H, W) of ``classes`` (C',) interpolated on the grid of points z x y x x -> (C', n, H', W').

    Along z, then y, then x, like :func:`_interpolate_points`: the two give bit-identical probabilities.
    """
    rows = classes[:, None]
    slab = torch.lerp(probs[rows, z[0]], probs[rows, z[1]], z[2][:, None, None])  # (C', n, H, W)
    slab = torch.lerp(slab[:, :, y[0]], slab[:, :, y[1]], y[2][:, None])  # (C', n, H', W)
    return torch.lerp(slab[..., x[0]], slab[..., x[1]], x[2])


def _interpolate_points(table: torch.Tensor, grid: Sequence[int], z: _Corners, y: _Corners, x: _Corners) -> torch.Tensor:
    """Probability vectors interpolated at M scattered points (each of ``z``, ``y``, ``x`` holds (M,) tensors) -> (M, C).

    Args:
        table: (D*H*W, C) vectors of the model grid ``grid`` = (D, H, W), in its raveled order.
    """
    plane, row = grid[1] * grid[2], grid[2]
    below, above = z[0] * plane, z[1] * plane

    def along_z(y_index: torch.Tensor, x_index: torch.Tensor) -> torch.Tensor:
        offset = y_index * row + x_index
        return torch.lerp(table[below + offset], table[above + offset], z[2][:, None])

    along_y_low = torch.lerp(along_z(y[0], x[0]), along_z(y[1], x[0]), y[2][:, None])
    along_y_high = torch.lerp(along_z(y[0], x[1]), along_z(y[1], x[1]), y[2][:, None])
    return torch.lerp(along_y_low, along_y_high, x[2][:, None])


def _any_except(mask: torch.Tensor, axis: int) -> torch.Tensor:
    """``mask.any()`` over every axis but ``axis`` -> 1D."""
    return mask.movedim(axis, 0).flatten(1).any(1)


def _linear_weights(coords: np.ndarray, size: int, device: torch.device) -> _Corners:
    """Lower/upper source indices and upper weights of linear interpolation at ``coords`` (clamped)."""
    coords = np.clip(coords, 0, size - 1)
    lower = np.floor(coords).astype(np.int64)
    upper = np.minimum(lower + 1, size - 1)
    return (
        torch.from_numpy(lower).to(device),
        torch.from_numpy(upper).to(device),
        torch.from_numpy((coords - lower).astype(np.float32)).to(device),
    )


def _window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread window starts covering ``size`` (>= ``patch``) with at least ``overlap`` shared."""
    if size <= patch:
        return [0]
    stride = max(1, int(patch * (1 - overlap)))
    count = math.ceil((size - patch) / stride) + 1
    return [round(index * (size - patch) / (count - 1)) for index in range(count)]


def _gaussian_map(patch_size: Sequence[int], device: torch.device) -> torch.Tensor:
    """Gaussian importance (d, h, w): 1 at the centre, sigma = patch / 8, floored at 1e-4 (no zero weight)."""
    axes = []
    for size in patch_size:
        position = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        axes.append(torch.exp(-0.5 * (position / (_GAUSSIAN_SIGMA * size)) ** 2))
    gaussian = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (gaussian / gaussian.max()).clamp_min(1e-4).to(device)
