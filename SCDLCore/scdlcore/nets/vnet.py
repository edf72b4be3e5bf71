"""VNet backbone of SCDL (SCDLCore/docs/METHOD.md section 1), returning ``(logits, feat)``."""

from __future__ import annotations

import torch
from torch import nn

from scdlcore.choices import NORMS

__all__ = ["VNet"]

_ENCODER_BLOCKS = (1, 2, 3, 3, 3)
_DECODER_BLOCKS = (3, 3, 2, 1)


class VNet(nn.Module):
    """Five-stage 3D VNet with additive skips.

    Stage widths are ``width * (1, 2, 4, 8, 16)``; the last decoder map (``width`` channels, full
    resolution) is the embedding ``feat`` that SCDL works on, and a 1x1x1 convolution maps it to logits.

    Args:
        in_channels: image channels (1 for CT).
        num_classes: C, background included.
        width: channels of the first stage (w; 16 in the paper, 4 in tests).
        norm: ``"batch"`` (CPS) or ``"instance"`` (teacher-student).

    Shapes:
        input ``(B, in_channels, D, H, W)`` with D, H, W divisible by 16;
        returns ``logits (B, C, D, H, W)`` and ``feat (B, width, D, H, W)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 14, width: int = 16, norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}.")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        self.in_channels, self.num_classes, self.width, self.norm = in_channels, num_classes, width, norm
        widths = [width * 2**i for i in range(5)]

        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        previous = in_channels
        for stage, (channels, blocks) in enumerate(zip(widths, _ENCODER_BLOCKS)):
            self.encoders.append(_conv_stack(previous, channels, blocks, norm))
            if stage < 4:
                self.downs.append(_sampling(channels, widths[stage + 1], norm, up=False))
            previous = widths[stage + 1] if stage < 4 else channels

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for stage, blocks in zip(range(3, -1, -1), _DECODER_BLOCKS):
            self.ups.append(_sampling(widths[stage + 1], widths[stage], norm, up=True))
            self.decoders.append(_conv_stack(widths[stage], widths[stage], blocks, norm))
        self.head = nn.Conv3d(width, num_classes, kernel_size=1)

    def description(self) -> dict:
        """Constructor arguments, for :func:`scdlcore.nets.network_description`."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "width": self.width,
            "norm": self.norm,
        }

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Embedding ``feat (B, width, D, H, W)`` of ``image (B, in_channels, D, H, W)``."""
        skips = []
        x = image
        for stage, encoder in enumerate(self.encoders):
            x = encoder(x)
            if stage < 4:
                skips.append(x)
                x = self.downs[stage](x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(up(x) + skip)
        return x

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.features(image)
        return self.head(feat), feat


def _norm(channels: int, norm: str) -> nn.Module:
    return nn.BatchNorm3d(channels) if norm == "batch" else nn.InstanceNorm3d(channels, affine=True)


def _conv_stack(in_channels: int, out_channels: int, blocks: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(blocks):
        layers += [
            nn.Conv3d(in_channels if index == 0 else out_channels, out_channels, kernel_size=3, padding=1),
            _norm(out_channels, norm),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _sampling(in_channels: int, out_channels: int, norm: str, *, up: bool) -> nn.Sequential:
    conv = nn.ConvTranspose3d if up else nn.Conv3d
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size=2, stride=2), _norm(out_channels, norm), nn.ReLU(inplace=True)
    )
