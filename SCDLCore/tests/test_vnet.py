"""Tests of scdlcore.nets: the VNet backbone (SCDLCore/docs/METHOD.md section 1) and its JSON description."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from scdlcore.nets import VNet, build_network, network_description

# (patch (D, H, W), num_classes, width, norm, batch): non-cubic grids; every axis a multiple of 16.
# The width-4 instance-norm cases take a second or two on a CPU: slow.
SHAPE_CASES = [
    ((32, 48, 64), 2, 2, "batch", 2),
    pytest.param((16, 32, 16), 5, 4, "instance", 1, marks=pytest.mark.slow),
    ((16, 32, 16), 14, 2, "batch", 3),
    pytest.param((32, 16, 48), 14, 4, "instance", 2, marks=pytest.mark.slow),
    ((16, 16, 32), 5, 2, "batch", 1),  # bottleneck (1, 1, 2): still two values per BatchNorm channel
]


@pytest.mark.parametrize(("patch", "num_classes", "width", "norm", "batch"), SHAPE_CASES)
def test_vnet_returns_logits_and_feat_at_full_resolution(patch, num_classes, width, norm, batch):
    torch.manual_seed(0)
    net = VNet(in_channels=1, num_classes=num_classes, width=width, norm=norm)
    with torch.no_grad():
        logits, feat = net(torch.rand(batch, 1, *patch))  # image (B, 1, D, H, W)

    assert logits.shape == (batch, num_classes, *patch)  # (B, C, D, H, W)
    assert feat.shape == (batch, width, *patch)  # (B, w, D, H, W)
    assert torch.isfinite(logits).all() and torch.isfinite(feat).all()
    # The logits are a 1x1x1 convolution of the embedding, nothing else.
    with torch.no_grad():
        torch.testing.assert_close(net.head(feat), logits)


def test_vnet_accepts_several_input_channels():
    net = VNet(in_channels=2, num_classes=3, width=2)
    with torch.no_grad():
        logits, feat = net(torch.rand(2, 2, 16, 32, 16))
    assert logits.shape == (2, 3, 16, 32, 16)
    assert feat.shape == (2, 2, 16, 32, 16)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_vnet_uses_the_requested_normalisation_everywhere(norm):
    expected, other = (nn.BatchNorm3d, nn.InstanceNorm3d) if norm == "batch" else (nn.InstanceNorm3d, nn.BatchNorm3d)
    modules = list(VNet(num_classes=3, width=2, norm=norm).modules())
    # 12 encoder + 9 decoder conv blocks, 4 down and 4 up samplings: one norm each.
    assert sum(isinstance(m, expected) for m in modules) == 12 + 9 + 4 + 4
    assert not any(isinstance(m, other) for m in modules)


def test_vnet_skips_carry_the_image_past_a_silenced_bottleneck():
    # With the deepest stage's weights at zero its output is 0 for any input (eval BatchNorm with fresh
    # statistics is the identity), so only the additive skips can make feat depend on the image.
    torch.manual_seed(0)
    net = VNet(num_classes=3, width=2, norm="batch").eval()
    with torch.no_grad():
        for parameter in net.encoders[4].parameters():
            parameter.zero_()
        first, second = (net(torch.rand(1, 1, 16, 32, 16))[1] for _ in range(2))
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_vnet_has_9_45_million_parameters_for_width_16_and_14_classes(norm):
    count = sum(p.numel() for p in VNet(in_channels=1, num_classes=14, width=16, norm=norm).parameters())
    assert count == _expected_parameter_count(in_channels=1, num_classes=14, width=16) == 9_449_070


@pytest.mark.parametrize(("in_channels", "num_classes", "width"), [(1, 2, 2), (2, 5, 4), (1, 14, 3)])
def test_vnet_parameter_count_follows_the_stage_layout(in_channels, num_classes, width):
    net = VNet(in_channels=in_channels, num_classes=num_classes, width=width)
    assert sum(p.numel() for p in net.parameters()) == _expected_parameter_count(in_channels, num_classes, width)


@pytest.mark.parametrize(
    ("kwargs", "name", "others"),
    [
        ({"width": 0}, "width", ("num_classes", "in_channels")),
        ({"num_classes": 1}, "num_classes", ("width", "in_channels")),
        ({"in_channels": 0}, "in_channels", ("width", "num_classes")),
        ({"norm": "group"}, "norm", ("width", "num_classes", "in_channels")),
    ],
    ids=["width", "num_classes", "in_channels", "norm"],
)
def test_vnet_refuses_bad_arguments_naming_only_the_bad_parameter(kwargs, name, others):
    with pytest.raises(ValueError, match=name) as info:
        VNet(**kwargs)
    message = str(info.value)
    assert str(next(iter(kwargs.values()))) in message  # the value that was given
    # A user must see which argument is wrong: the valid ones are not blamed.
    assert not any(other in message for other in others), message


def test_build_network_and_network_description_round_trip():
    torch.manual_seed(0)
    net = build_network("vnet", in_channels=1, num_classes=5, width=2, norm="instance")
    description = network_description(net)

    assert dict(description) == {"arch": "vnet", "in_channels": 1, "num_classes": 5, "width": 2, "norm": "instance"}
    rebuilt = build_network(**json.loads(json.dumps(description)))  # as read back from model.json
    assert isinstance(rebuilt, VNet)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    image = torch.rand(1, 1, 16, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(image)[0], net.eval()(image)[0])


def test_build_network_refuses_an_unknown_architecture_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown network architecture 'unet'.*vnet"):
        build_network("unet", num_classes=3)


def test_build_network_turns_a_misspelt_argument_into_a_value_error():
    with pytest.raises(ValueError, match=r"Bad arguments for network 'vnet'.*widht"):
        build_network("vnet", num_classes=3, widht=4)


def test_network_description_refuses_an_unregistered_module():
    with pytest.raises(ValueError, match="Conv3d"):
        network_description(nn.Conv3d(1, 1, 1))


def _expected_parameter_count(in_channels: int, num_classes: int, width: int) -> int:
    """Weights of the layout in SCDLCore/docs/METHOD.md section 1, counted by hand.

    3x3x3 conv: i*o*27 + o; 2x2x2 (transposed) conv: i*o*8 + o; norm (affine): 2*o; head: w*C + C.
    """
    widths = [width * 2**stage for stage in range(5)]
    total = 0
    previous = in_channels
    for stage, blocks in enumerate((1, 2, 3, 3, 3)):
        channels = widths[stage]
        for block in range(blocks):
            total += (previous if block == 0 else channels) * channels * 27 + channels + 2 * channels
        if stage < 4:
            total += channels * widths[stage + 1] * 8 + widths[stage + 1] + 2 * widths[stage + 1]
            previous = widths[stage + 1]
    for stage, blocks in zip((3, 2, 1, 0), (3, 3, 2, 1)):
        channels = widths[stage]
        total += widths[stage + 1] * channels * 8 + channels + 2 * channels
        total += blocks * (channels * channels * 27 + channels + 2 * channels)
    return total + width * num_classes + num_classes
