"""Inference: a model bundle, loaded once, segments CT volumes onto their own voxel grid.

:meth:`Predictor.predict_volume` runs the pipeline of SCDLCore/docs/METHOD.md section 5:

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
import itertools
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scdlcore.bundle.format import ModelBundle
from scdlcore.choices import ENSEMBLES
from scdlcore.events import Progress
from scdlcore.inference.postprocess import keep_largest_components
from scdlcore.inference.sliding_window import gaussian_map, window_starts
from scdlcore.inference.to_grid import probs_to_grid
from scdlcore.io.read import read_image
from scdlcore.io.volume import Volume
from scdlcore.io.write import write_label
from scdlcore.labels import LabelTable, value_counts

__all__ = ["InferenceCancelled", "Predictor", "check_organs", "organ_volumes_ml"]


# Progress fractions at which each phase ends.
_PREPROCESS_END, _WINDOWS_END = 0.05, 0.9


class InferenceCancelled(Exception):
    """The ``cancel`` event was set while a volume was being segmented."""


class Predictor:
    """Segments CT volumes with one bundle; the networks are built once, in eval mode on ``device``.

    Args:
        bundle: the model (see :func:`scdlcore.bundle.format.load_bundle` / ``ModelRegistry.resolve``).
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
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {', '.join(ENSEMBLES)}, got {ensemble!r}.")
        self.bundle, self.device = bundle, torch.device(device)
        self.overlap, self.ensemble, self.largest_component = overlap, ensemble, largest_component
        self.preprocessing = dataclasses.replace(bundle.preprocessing, body_crop=body_crop)
        cuda = self.device.type == "cuda"
        self.sw_batch_size = sw_batch_size or (4 if cuda else 1)
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}.")
        self.amp = amp and cuda
        count = 1 if ensemble == "first" else None
        self.networks = (
            list(networks)[:count] if networks is not None else bundle.build_networks(self.device, count=count)
        )
        # Channels-last-3d unlocks the fast 3D convolution kernels: cuDNN's (SCDLCore/docs/PERFORMANCE.md section 1)
        # and oneDNN's on the CPU.
        self.networks = [net.to(memory_format=torch.channels_last_3d) for net in self.networks]
        if cuda:
            torch.backends.cudnn.benchmark = True  # one patch shape: the tuned kernel is reused
        self._gaussian = gaussian_map(bundle.patch_size, self.device)

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
            probs_to_grid(probs, prepared.index_map(), lut, output[prepared.box])
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
        starts = list(itertools.product(*(window_starts(n, p, self.overlap) for n, p in zip(padded, patch))))
        with torch.inference_mode():
            for first in range(0, len(starts), self.sw_batch_size):
                if cancel is not None and cancel.is_set():
                    raise InferenceCancelled("Segmentation cancelled.")
                batch = starts[first : first + self.sw_batch_size]
                windows = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in batch]
                weighted = self._forward(
                    torch.stack([x[window] for window in windows])[:, None], networks or self.networks
                )
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


def check_organs(table: LabelTable, organs: Sequence[str] | None) -> list[str]:
    """The organ names to keep (all for None), checked against ``table``.

    Raises:
        ValueError: a name not in the table (the message suggests the closest one).
    """
    return list(table.names) if organs is None else table.check_organs(organs)


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
