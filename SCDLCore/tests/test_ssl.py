"""Tests of scdlcore.training.ssl: CPS, Mean Teacher and Supervised bases, with and without SCDL.

The bases are specified in SCDLCore/docs/METHOD.md section 2.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scdlcore.nets import VNet
from scdlcore.nets.scdl import SCDLModule
from scdlcore.training.config import Config
from scdlcore.training.losses import GACELoss, GADiceLoss
from scdlcore.training.ssl import CPS, Batch, MeanTeacher, SSLBase, Supervised, build_base, sigmoid_rampup

NUM_CLASSES, WIDTH = 4, 2
PATCH = (16, 32, 16)  # (D, H, W): non-cubic; the bottleneck keeps 2 voxels, enough for InstanceNorm
SCDL_KEYS = {"scdl_proxy", "scdl_sac", "scdl_kl"}
BASE_KEYS = {
    "cps": {"total", "supervised", "cps"},
    "mean_teacher": {"total", "supervised", "consistency"},
    "supervised": {"total", "supervised"},
}


def _batch(seed: int = 0, valid: bool = False) -> Batch:
    """2 labeled + 2 unlabeled patches: images (4, 1, D, H, W), labels (2, D, H, W) with every class present."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (2, *PATCH), generator=generator)
    mask = torch.rand(2, *PATCH, generator=generator) < 0.7 if valid else None
    return Batch(images=torch.rand(4, 1, *PATCH, generator=generator), labels=labels, valid=mask)


def _scdl(count: int) -> list[SCDLModule]:
    return [SCDLModule(WIDTH, NUM_CLASSES, grid=2, hidden=(16,), embed_dim=16, num_samples=4) for _ in range(count)]


def _base(kind: str, with_scdl: bool) -> SSLBase:
    torch.manual_seed(0)
    if kind == "cps":
        return CPS(
            VNet(num_classes=NUM_CLASSES, width=WIDTH),
            VNet(num_classes=NUM_CLASSES, width=WIDTH),
            scdl=_scdl(2) if with_scdl else None,
        )
    if kind == "mean_teacher":
        return MeanTeacher(
            VNet(num_classes=NUM_CLASSES, width=WIDTH, norm="instance"), scdl=_scdl(1) if with_scdl else None
        )
    return Supervised(VNet(num_classes=NUM_CLASSES, width=WIDTH), scdl=_scdl(1) if with_scdl else None)


@pytest.mark.parametrize("with_scdl", [False, True], ids=["plain", "scdl"])
@pytest.mark.parametrize("kind", ["cps", "mean_teacher", "supervised"])
def test_training_losses_are_finite_with_the_expected_keys_and_composition(kind, with_scdl):
    base = _base(kind, with_scdl)
    progress = 0.5
    losses = base.training_losses(_batch(), progress)

    assert set(losses) == BASE_KEYS[kind] | (SCDL_KEYS if with_scdl else set())
    assert all(value.shape == () and torch.isfinite(value) for value in losses.values())
    assert losses["total"].requires_grad
    ramp = math.exp(-5 * (1 - progress) ** 2)
    unlabeled_term = {"cps": "cps", "mean_teacher": "consistency"}.get(kind)  # both ramped to a final weight 0.1
    expected = losses["supervised"] + (0.1 * ramp * losses[unlabeled_term] if unlabeled_term else 0.0)
    if with_scdl:
        # The logged parts are averaged over the SCDL modules; each adds lambda (0.1) * its weighted total.
        modules = len(base.scdl)
        expected = expected + 0.1 * modules * (
            0.3 * losses["scdl_proxy"] + 0.1 * losses["scdl_sac"] + 0.02 * losses["scdl_kl"]
        )
    assert losses["total"].item() == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("kind", [pytest.param("cps", marks=pytest.mark.slow), "mean_teacher", "supervised"])
def test_training_losses_accept_a_valid_mask(kind):
    losses = _base(kind, with_scdl=True).training_losses(_batch(valid=True), progress=1.0)
    assert torch.isfinite(losses["total"])


@pytest.mark.slow
def test_forward_is_training_losses_for_distributed_wrappers():
    base = _base("supervised", with_scdl=False)
    batch = _batch()
    torch.testing.assert_close(base(batch, 0.3)["total"], base.training_losses(batch, 0.3)["total"])


@pytest.mark.slow
def test_cps_backward_reaches_both_networks_and_both_scdl_modules():
    base = _base("cps", with_scdl=True)
    base.training_losses(_batch(), progress=1.0)["total"].backward()
    for network in base.networks:
        assert network.head.weight.grad.abs().sum() > 0
        assert network.encoders[0][0].weight.grad.abs().sum() > 0  # the first convolution
    for module in base.scdl:
        assert module.proxy_mean.grad.abs().sum() > 0
        assert module.projection[0].weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_cps_supervises_each_network_with_the_other_ones_argmax():
    base = _base("cps", with_scdl=False)
    batch = _batch()
    early, late = base.training_losses(batch, 0.0), base.training_losses(batch, 1.0)

    # Train-mode BatchNorm uses batch statistics, so the networks give the same logits again.
    with torch.no_grad():
        logits_a, logits_b = (network(batch.images)[0] for network in base.networks)
    top_10, top_all, dice = GACELoss(top_k=0.1), GACELoss(top_k=1.0), GADiceLoss()
    labeled = batch.num_labeled
    supervised = sum(
        top_10(lg[:labeled], batch.labels) + dice(lg[:labeled], batch.labels) for lg in (logits_a, logits_b)
    )
    cross = top_all(logits_a, logits_b.argmax(dim=1)) + top_all(logits_b, logits_a.argmax(dim=1))
    assert early["supervised"].item() == pytest.approx(supervised.item(), rel=1e-5)
    assert early["cps"].item() == pytest.approx(cross.item(), rel=1e-5)

    # Only the ramp differs between the start (exp(-5)) and the end (1) of the run.
    torch.testing.assert_close(early["cps"], late["cps"])
    assert early["total"].item() == pytest.approx(
        (early["supervised"] + 0.1 * math.exp(-5) * early["cps"]).item(), rel=1e-5
    )
    assert late["total"].item() == pytest.approx((late["supervised"] + 0.1 * late["cps"]).item(), rel=1e-5)


def test_bases_refuse_the_wrong_number_of_scdl_modules():
    with pytest.raises(ValueError, match=r"CPS needs one SCDL module per network \(2\), got 1"):
        CPS(VNet(num_classes=3, width=2), VNet(num_classes=3, width=2), scdl=_scdl(1))
    with pytest.raises(ValueError, match="one SCDL module.*got 2"):
        MeanTeacher(VNet(num_classes=3, width=2), scdl=_scdl(2))


@pytest.mark.slow
def test_mean_teacher_teacher_gets_no_gradient():
    base = _base("mean_teacher", with_scdl=True)
    base.training_losses(_batch(), progress=1.0)["total"].backward()
    assert all(not p.requires_grad and p.grad is None for p in base.teacher.parameters())
    assert all(p.grad is not None for p in base.networks[0].parameters())
    assert base.inference_networks() == [base.teacher]


@pytest.mark.parametrize(("step", "alpha"), [(0, 0.0), (1, 0.5), (3, 0.75), (10_000, 0.99)])
def test_mean_teacher_ema_moves_the_teacher_toward_the_student(step, alpha):
    torch.manual_seed(0)
    base = MeanTeacher(VNet(num_classes=3, width=2, norm="batch"), ema_decay=0.99)  # batch norm: buffers too
    student = base.networks[0]
    teacher_before = [p.clone() for p in base.teacher.parameters()]
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter))
        for buffer in student.buffers():
            buffer.add_(1)

    base.after_optimizer_step(step)

    # alpha = min(1 - 1/(step + 1), ema_decay); teacher <- alpha * teacher + (1 - alpha) * student
    for old, new, current in zip(teacher_before, base.teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, alpha * old + (1 - alpha) * current)
    for new, current in zip(base.teacher.buffers(), student.buffers()):
        torch.testing.assert_close(new, current)


def test_inference_networks_are_what_a_bundle_exports():
    cps = _base("cps", with_scdl=False)
    assert cps.inference_networks() == list(cps.networks)
    supervised = _base("supervised", with_scdl=False)
    assert supervised.inference_networks() == [supervised.networks[0]]


@pytest.mark.slow  # a training step
def test_a_cps_ga_scdl_step_on_32_cubed_patches_updates_every_part():
    # SCDLCore/docs/METHOD.md section 4: a CPS+GA+SCDL step on CPU with w=4 and 32^3 patches, paper-size MLP.
    torch.manual_seed(0)
    base = CPS(
        VNet(num_classes=NUM_CLASSES, width=4),
        VNet(num_classes=NUM_CLASSES, width=4),
        scdl=[SCDLModule(4, NUM_CLASSES, grid=4) for _ in range(2)],
    )
    batch = Batch(images=torch.rand(4, 1, 32, 32, 32), labels=torch.randint(0, NUM_CLASSES, (2, 32, 32, 32)))
    optimizer = torch.optim.SGD(base.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}

    losses = base.training_losses(batch, progress=0.5)
    optimizer.zero_grad()
    losses["total"].backward()
    optimizer.step()

    assert all(torch.isfinite(value) for value in losses.values())
    for name in ("networks.0.head.weight", "networks.1.head.weight", "scdl.0.proxy_mean", "scdl.1.projection.0.weight"):
        assert not torch.equal(before[name], dict(base.named_parameters())[name]), name


@pytest.mark.parametrize(
    ("base_name", "cls", "norm", "networks"),
    [
        ("cps", CPS, nn.BatchNorm3d, 2),
        ("mean_teacher", MeanTeacher, nn.InstanceNorm3d, 1),
        ("supervised", Supervised, nn.BatchNorm3d, 1),
    ],
)
@pytest.mark.parametrize("scdl_enabled", [True, False])
def test_build_base_follows_the_config(base_name, cls, norm, networks, scdl_enabled):
    config = Config().with_overrides(
        {
            "ssl.base": base_name,
            "network.width": 2,
            "ssl.top_k": 0.2,
            "scdl.enabled": scdl_enabled,
            "scdl.weight": 0.05,
            "scdl.grid": 3,
            "scdl.p2e": "classes",
            "scdl.anchor": "ema",
            "scdl.hidden": [8],
        }
    )
    base = build_base(config, num_classes=5)

    assert type(base) is cls
    assert len(base.networks) == networks
    for network in base.networks:
        assert isinstance(network, VNet) and (network.width, network.num_classes, network.in_channels) == (2, 5, 1)
        assert any(isinstance(m, norm) for m in network.modules())
    assert base.ce_loss.top_k == 0.2 and base.scdl_weight == 0.05
    if scdl_enabled:
        assert len(base.scdl) == networks
        for module in base.scdl:
            assert (module.grid, module.p2e, module.anchor, module.num_classes) == (3, "classes", "ema", 5)
            assert module.projection[0].in_features == 2 and module.projection[0].out_features == 8
    else:
        assert base.scdl is None


def test_build_base_passes_the_base_specific_weights_and_an_explicit_norm():
    cps = build_base(
        Config().with_overrides({"ssl.cps_weight": 0.3, "network.width": 2, "network.norm": "instance"}), 3
    )
    assert cps.cps_weight == 0.3
    assert all(network.norm == "instance" for network in cps.networks)
    teacher = build_base(
        Config().with_overrides(
            {
                "ssl.base": "mean_teacher",
                "ssl.ema_decay": 0.9,
                "ssl.noise_std": 0.2,
                "ssl.consistency_weight": 0.4,
                "network.width": 2,
            }
        ),
        3,
    )
    assert (teacher.ema_decay, teacher.noise_std, teacher.consistency_weight) == (0.9, 0.2, 0.4)


@pytest.mark.parametrize(
    ("progress", "expected"),
    [(0.0, math.exp(-5)), (0.5, math.exp(-1.25)), (1.0, 1.0), (-1.0, math.exp(-5)), (2.0, 1.0)],
)
def test_sigmoid_rampup_rises_from_exp_minus_5_to_1_and_clamps(progress, expected):
    # exp(-5 (1 - t)^2): t=0 -> 0.0067379, t=0.5 -> exp(-1.25) = 0.2865048, t=1 -> 1.
    assert sigmoid_rampup(progress) == pytest.approx(expected, rel=1e-12)
