"""Tests of scdlcore.training.losses: GADice and GACE against hand-computed values.

The losses are specified in SCDLCore/docs/METHOD.md section 2.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scdlcore.training.losses import GACELoss, GADiceLoss

LN2 = math.log(2.0)


def _logits_from_probs(probs_per_voxel: list[tuple[float, ...]]) -> torch.Tensor:
    """(B=1, C, 2, 2, 1) logits whose softmax is exactly ``probs_per_voxel`` (4 voxels, row-major D, H, W)."""
    probs = torch.tensor(probs_per_voxel, dtype=torch.float64).t()  # (C, 4)
    return probs.log().reshape(1, -1, 2, 2, 1).float()


def _labels(values: list[int]) -> torch.Tensor:
    return torch.tensor(values).reshape(1, 2, 2, 1)  # (B=1, D=2, H=2, W=1)


# --- GADice ---------------------------------------------------------------------------------------------


def test_gadice_matches_hand_computed_value_with_an_absent_class():
    # Voxels v0..v3, classes (0, 1, 2); labels 0, 1, 0, 1: class 2 is absent (N = 4 voxels).
    logits = _logits_from_probs([(0.5, 0.25, 0.25), (0.25, 0.5, 0.25), (0.6, 0.2, 0.2), (0.1, 0.7, 0.2)])
    labels = _labels([0, 1, 0, 1])
    # class 0: p = (.5, .25, .6, .1), t = (1, 0, 1, 0): sum pt = 1.1, sum p^2 = .6825, sum t^2 = 2
    #          dice = 1 - 2.2 / 2.6825 = 0.1798695
    # class 1: p = (.25, .5, .2, .7), t = (0, 1, 0, 1): sum pt = 1.2, sum p^2 = .8425
    #          dice = 1 - 2.4 / 2.8425 = 0.1556728
    # class 2 (absent): sum p^2 / N = (.0625 + .0625 + .04 + .04) / 4 = 0.05125
    # mean over the 3 classes = (0.1798695 + 0.1556728 + 0.05125) / 3 = 0.1289308
    loss = GADiceLoss(eps=0.0)(logits, labels)
    assert loss.item() == pytest.approx(0.1289308, abs=1e-6)
    # The default eps only smooths: same value to 1e-5.
    assert GADiceLoss()(logits, labels).item() == pytest.approx(0.1289308, abs=1e-5)


def test_gadice_absent_class_penalty_has_half_the_gradient_of_its_value():
    # Labels all class 0, so class 1 is absent: loss = (dice_0 + sum_v p1^2 / N) / 2 in value, but the
    # detached factor makes its gradient that of (dice_0 + 0.5 * sum_v p1^2 / N) / 2.
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 2, 3, 4, requires_grad=True)
    labels = torch.zeros(1, 2, 3, 4, dtype=torch.long)
    voxels = labels.numel()

    loss = GADiceLoss(eps=0.0)(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)

    probs = torch.softmax(logits, dim=1)
    dice_0 = 1 - 2 * probs[:, 0].sum() / ((probs[:, 0] ** 2).sum() + voxels)
    penalty = (probs[:, 1] ** 2).sum() / voxels
    assert loss.item() == pytest.approx(((dice_0 + penalty) / 2).item(), rel=1e-6)
    (expected_grad,) = torch.autograd.grad((dice_0 + 0.5 * penalty) / 2, logits)
    torch.testing.assert_close(grad, expected_grad)


def test_gadice_is_near_zero_for_a_confident_correct_prediction():
    labels = torch.tensor([[[[0, 1], [2, 2]], [[1, 1], [0, 2]]]])  # (B=1, D=2, H=2, W=2); class 3 absent
    logits = 30.0 * F.one_hot(labels, 4).permute(0, 4, 1, 2, 3).float()
    assert GADiceLoss()(logits, labels).item() < 1e-6


def test_gadice_averages_over_samples():
    torch.manual_seed(1)
    logits, labels = torch.randn(3, 4, 2, 4, 3), torch.randint(0, 4, (3, 2, 4, 3))
    loss = GADiceLoss()
    per_sample = [loss(logits[i : i + 1], labels[i : i + 1]) for i in range(3)]
    assert loss(logits, labels).item() == pytest.approx(sum(per_sample).item() / 3, rel=1e-6)


def test_gadice_with_valid_mask_equals_the_loss_on_the_valid_voxels_alone():
    logits, labels, valid = _masked_case()
    loss = GADiceLoss()
    # GADice is per sample: the masked batch loss is the mean of each sample's loss on its valid voxels.
    alone = [loss(*_valid_voxels_only(logits[i : i + 1], labels[i : i + 1], valid[i : i + 1])) for i in range(2)]
    assert loss(logits, labels, valid).item() == pytest.approx((alone[0] + alone[1]).item() / 2, rel=1e-5)


# --- GACE -----------------------------------------------------------------------------------------------

# Voxels v0..v3 with labels 0, 1, 0, 2 and probability of the true class 1/2, 1/4, 1/8, 1/16:
# CE = ln2, 2 ln2, 3 ln2, 4 ln2. Loss = sum_i CE_i / (n_i^(1-gamma) K^gamma) over the K kept voxels.
GACE_PROBS = [(0.5, 0.25, 0.25), (0.5, 0.25, 0.25), (0.125, 0.5, 0.375), (0.5, 0.4375, 0.0625)]
GACE_LABELS = [0, 1, 0, 2]
GACE_CASES = [
    # (top_k, gamma, expected, arithmetic)
    (1.0, 0.5, 4 * LN2 / (2**0.5 * 2) + 2 * LN2 / 2 + 4 * LN2 / 2, "K=4: (ln2+3ln2)/(sqrt2*2) + 2ln2/2 + 4ln2/2"),
    (0.5, 0.5, 3 * LN2 / 2**0.5 + 4 * LN2 / 2**0.5, "K=2 keeps v2, v3: 3ln2/(1*sqrt2) + 4ln2/(1*sqrt2)"),
    (0.1, 0.5, 4 * LN2, "K=max(1, round(0.4))=1 keeps v3: 4ln2/(1*1)"),
    (0.5, 1.0, (3 * LN2 + 4 * LN2) / 2, "gamma=1: mean CE of the 2 kept voxels"),
    (1.0, 1.0, (1 + 2 + 3 + 4) * LN2 / 4, "gamma=1, K=4: plain mean CE"),
    (1.0, 0.0, (LN2 + 3 * LN2) / 2 + 2 * LN2 + 4 * LN2, "gamma=0: per-class mean CE, summed = 8 ln2"),
]


@pytest.mark.parametrize(("top_k", "gamma", "expected", "arithmetic"), GACE_CASES)
def test_gace_matches_hand_computed_values(top_k, gamma, expected, arithmetic):
    loss = GACELoss(top_k=top_k, gamma=gamma)(_logits_from_probs(GACE_PROBS), _labels(GACE_LABELS))
    assert loss.item() == pytest.approx(expected, rel=1e-6), arithmetic


@pytest.mark.parametrize("top_k", [1.0, 0.3, 0.1])
def test_gace_with_gamma_1_is_the_top_k_mean_cross_entropy(top_k):
    torch.manual_seed(2)
    logits, labels = torch.randn(2, 5, 4, 6, 3), torch.randint(0, 5, (2, 4, 6, 3))
    ce = F.cross_entropy(logits, labels, reduction="none").flatten()
    k = max(1, round(top_k * ce.numel()))
    expected = ce.topk(k).values.mean()
    assert GACELoss(top_k=top_k, gamma=1.0)(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_gace_with_gamma_0_sums_the_per_class_mean_cross_entropy():
    torch.manual_seed(3)
    logits, labels = torch.randn(2, 4, 4, 6, 3), torch.randint(0, 3, (2, 4, 6, 3))  # class 3 absent: adds 0
    ce = F.cross_entropy(logits, labels, reduction="none")
    expected = sum(ce[labels == c].mean() for c in range(3))
    assert GACELoss(top_k=1.0, gamma=0.0)(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_gace_ignores_voxels_outside_the_top_k():
    logits = _logits_from_probs(GACE_PROBS)
    loss = GACELoss(top_k=0.5)
    before = loss(logits, _labels(GACE_LABELS))
    easier = logits.clone()
    easier[0, 0, 0, 0, 0] += 1.0  # v0 (CE ln2, not among the 2 hardest) becomes easier still
    assert loss(easier, _labels(GACE_LABELS)).item() == pytest.approx(before.item(), rel=1e-6)
    harder = logits.clone()
    harder[0, 2, 1, 0, 0] += 2.0  # v2 (kept) becomes harder: the loss rises
    assert loss(harder, _labels(GACE_LABELS)).item() > before.item() + 0.1


@pytest.mark.parametrize("top_k", [1.0, 0.3])
def test_gace_with_valid_mask_equals_the_loss_on_the_valid_voxels_alone(top_k):
    logits, labels, valid = _masked_case()
    loss = GACELoss(top_k=top_k)
    # GACE pools the batch's voxels, so the reference stacks the valid voxels of both samples.
    alone = loss(*_valid_voxels_only(logits, labels, valid))
    assert loss(logits, labels, valid).item() == pytest.approx(alone.item(), rel=1e-5)


def test_gace_with_no_valid_voxel_is_zero_and_differentiable():
    logits = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    loss = GACELoss()(logits, torch.zeros(1, 2, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"top_k": 0.0}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": -0.1}, "top_k"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": 1.01}, "gamma"),
    ],
)
def test_gace_refuses_bad_top_k_or_gamma(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name} must be in .*got {next(iter(kwargs.values()))}"):
        GACELoss(**kwargs)


# --- both -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss", [GADiceLoss(), GACELoss(top_k=0.1), GACELoss(top_k=1.0)], ids=["gadice", "gace10", "gace100"]
)
def test_losses_are_finite_float32_and_differentiable_under_bf16_autocast(loss):
    torch.manual_seed(4)
    conv = torch.nn.Conv3d(2, 4, kernel_size=1)
    image, labels = torch.randn(2, 2, 4, 6, 8), torch.randint(0, 3, (2, 4, 6, 8))  # class 3 absent
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(image)
        assert logits.dtype == torch.bfloat16
        value = loss(logits, labels)
    value.backward()
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def _masked_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two samples (B=2, C=4, 3x4x5) with ~60% valid voxels; class 3 only in sample 0's invalid voxels."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 3, 4, 5, generator=generator)
    labels = torch.randint(0, 3, (2, 3, 4, 5), generator=generator)
    valid = torch.rand(2, 3, 4, 5, generator=generator) < 0.6
    labels[0][~valid[0]] = 3  # present in the labels, absent from the known voxels of sample 0
    labels[1, 0, 0, :] = 3
    valid[1, 0, 0, :] = True
    return logits, labels, valid


def _valid_voxels_only(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, D, H, W), (B, D, H, W), mask -> the n valid voxels as one volume and its labels.

    The volume is (1, C, n, 1, 1), the labels (1, n, 1, 1).
    """
    flat = logits.permute(0, 2, 3, 4, 1)[valid]  # (n, C)
    return flat.t().reshape(1, -1, flat.shape[0], 1, 1), labels[valid].reshape(1, -1, 1, 1)
