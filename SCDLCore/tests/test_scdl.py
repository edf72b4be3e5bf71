"""Tests of scdlcore.nets.scdl: tokens, proxies, CDBA, proxy loss and semantic anchors.

The module and the properties pinned here are SCDLCore/docs/METHOD.md sections 3 and 4.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scdlcore.nets.scdl import SCDLLosses, SCDLModule, token_targets

WIDTH, NUM_CLASSES = 4, 3


def _module(**overrides) -> SCDLModule:
    """A small, seeded SCDL module (w=4, C=3) with the paper's structure; ``overrides`` go to the constructor."""
    torch.manual_seed(0)
    kwargs = {"grid": 2, "hidden": (32, 32), "embed_dim": 16, "num_samples": 8, **overrides}
    return SCDLModule(WIDTH, NUM_CLASSES, **kwargs)


def _octant_labels(classes: list[int]) -> torch.Tensor:
    """(1, 4, 4, 4) labels whose 2x2x2 octants (token order z, y, x) hold ``classes[token]``."""
    return (
        torch.tensor(classes)
        .reshape(1, 2, 2, 2)
        .repeat_interleave(2, 1)
        .repeat_interleave(2, 2)
        .repeat_interleave(2, 3)
    )


# --- tokens and targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feat_shape", "grid"),
    [((2, 4, 16, 24, 32), 2), ((1, 3, 8, 8, 8), 4), ((3, 2, 12, 6, 18), 3), ((2, 4, 16, 24, 32), 1)],
)
def test_tokens_are_a_g_cubed_grid_of_width_channels(feat_shape, grid):
    module = SCDLModule(feat_shape[1], NUM_CLASSES, grid=grid, hidden=(8,), embed_dim=8)
    tokens = module.tokens(torch.randn(*feat_shape))
    assert tokens.shape == (feat_shape[0], grid**3, feat_shape[1])  # (B, L=G^3, w)


def test_tokens_average_each_cell_in_z_y_x_order():
    feat = torch.zeros(1, WIDTH, 4, 4, 4)
    feat[:, :, 2:, :2, 2:] = 1.0  # cell (z=1, y=0, x=1) -> token 1*4 + 0*2 + 1 = 5
    feat[:, 0, 0, 0, 0] = 8.0  # one voxel of cell 0: mean 8 / 8 = 1
    tokens = _module().tokens(feat)
    expected = torch.zeros(1, 8, WIDTH)
    expected[0, 5] = 1.0
    expected[0, 0, 0] = 1.0
    torch.testing.assert_close(tokens, expected)


def test_token_targets_pool_the_one_hot_target_and_rows_sum_to_one():
    labels = _octant_labels([0, 1, 2, 2, 1, 0, 0, 1])
    labels[0, 2:, 2:, :2] = torch.tensor([[1, 2], [1, 2]]).reshape(1, 2, 2)  # token 6: half class 1, half class 2
    y_dist, known = token_targets(labels, NUM_CLASSES, grid=2)

    assert y_dist.shape == (1, 8, NUM_CLASSES) and known.shape == (1, 8)  # (B, L, C), (B, L)
    torch.testing.assert_close(y_dist.sum(dim=2), torch.ones(1, 8))
    torch.testing.assert_close(y_dist[0, :6], F.one_hot(torch.tensor([0, 1, 2, 2, 1, 0]), NUM_CLASSES).float())
    torch.testing.assert_close(y_dist[0, 6], torch.tensor([0.0, 0.5, 0.5]))
    torch.testing.assert_close(known, torch.ones(1, 8))


def test_token_targets_use_only_known_voxels_and_report_the_known_fraction():
    labels = _octant_labels([1, 1, 2, 0, 0, 0, 0, 0])
    labels[0, :2, :2, :1] = 2  # half of token 0 is class 2 ...
    valid = torch.ones_like(labels, dtype=torch.bool)
    valid[0, :2, :2, :1] = False  # ... but those voxels are unknown
    valid[0, :2, 2:, :2] = False  # token 2 wholly unknown
    valid[0, :1, :2, 2:] = False  # token 1: half known

    y_dist, known = token_targets(labels, NUM_CLASSES, grid=2, valid=valid)

    torch.testing.assert_close(known[0, :3], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(known[0, 3:], torch.ones(5))
    torch.testing.assert_close(y_dist[0, 0], torch.tensor([0.0, 1.0, 0.0]))  # the unknown class-2 voxels do not count
    torch.testing.assert_close(y_dist[0, 1], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(y_dist[0, 2], torch.full((NUM_CLASSES,), 1 / NUM_CLASSES))  # no known voxel: uniform
    torch.testing.assert_close(y_dist.sum(dim=2), torch.ones(1, 8))


def test_token_targets_rows_sum_to_one_on_a_non_divisible_grid():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (2, 7, 10, 13), generator=generator)
    valid = torch.rand(2, 7, 10, 13, generator=generator) < 0.3
    y_dist, known = token_targets(labels, 5, grid=3, valid=valid)
    assert y_dist.shape == (2, 27, 5)
    assert (y_dist >= 0).all()
    torch.testing.assert_close(y_dist.sum(dim=2), torch.ones(2, 27))
    assert ((known >= 0) & (known <= 1)).all()


# --- proxies and assignment -----------------------------------------------------------------------------


def test_proxy_samples_are_unit_vectors_per_class_and_sample():
    samples = _module(num_samples=6).proxy_samples()
    assert samples.shape == (NUM_CLASSES, 6, 16)  # (C, S, E)
    torch.testing.assert_close(samples.norm(dim=-1), torch.ones(NUM_CLASSES, 6))


def test_proxy_samples_are_reparameterised_around_the_normalised_mean():
    module = _module()
    with torch.no_grad():
        module.proxy_raw_std.fill_(-30.0)  # softplus -> ~1e-13: every sample is the mean's direction
    expected = F.normalize(module.proxy_mean, dim=-1).unsqueeze(1).expand(-1, module.num_samples, -1)
    torch.testing.assert_close(module.proxy_samples(), expected)
    with torch.no_grad():
        module.proxy_raw_std.fill_(2.0)  # wide proxies: samples spread out
    assert module.proxy_samples().std(dim=1).mean() > 0.1


@pytest.mark.parametrize("p2e", ["tokens", "classes"])
def test_assignment_returns_distributions_over_classes(p2e):
    module = _module(p2e=p2e)
    z = F.normalize(torch.randn(2, 8, 16), dim=-1)
    e2p, p2e_renorm, agreement = module.assignment(z)

    for part in (e2p, p2e_renorm, agreement):
        assert part.shape == (2, 8, NUM_CLASSES)  # (B, L, C)
        torch.testing.assert_close(part.sum(dim=2), torch.ones(2, 8))
    product = e2p * p2e_renorm
    torch.testing.assert_close(agreement, product / product.sum(dim=2, keepdim=True))


def test_assignment_e2p_is_a_softmax_of_cosines_over_classes():
    module = _module(tau_e2p=0.5)
    z = F.normalize(torch.randn(1, 8, 16), dim=-1)
    cosine = z @ F.normalize(module.proxy_mean, dim=-1).t()  # (B, L, C)
    torch.testing.assert_close(module.assignment(z)[0], torch.softmax(cosine / 0.5, dim=2))


def test_assignment_in_tokens_mode_normalises_p2e_over_each_samples_tokens():
    module = _module(p2e="tokens", tau_p2e=0.3)
    z = F.normalize(torch.randn(2, 8, 16), dim=-1)
    cosine = z @ F.normalize(module.proxy_mean, dim=-1).t()
    over_tokens = torch.softmax(cosine / 0.3, dim=1)  # Q: for each class, a distribution over the L tokens
    torch.testing.assert_close(module.assignment(z)[1], over_tokens / over_tokens.sum(dim=2, keepdim=True))

    # Each sample is its own token set: changing sample 1 leaves sample 0's assignment alone.
    moved = z.clone()
    moved[1] = F.normalize(torch.randn(8, 16), dim=-1)
    torch.testing.assert_close(module.assignment(moved)[1][0], module.assignment(z)[1][0])


def test_p2e_over_classes_equals_e2p_and_the_kl_vanishes():
    module = _module(p2e="classes")
    z = F.normalize(torch.randn(2, 8, 16), dim=-1)
    e2p, p2e, agreement = module.assignment(z)
    torch.testing.assert_close(p2e, e2p)
    assert module.symmetric_kl(e2p, p2e).item() == pytest.approx(0.0, abs=1e-6)
    losses = module(torch.randn(2, WIDTH, 4, 4, 4), _octant_labels([0, 1, 2, 0, 1, 2, 0, 1]))
    assert losses.kl.item() == pytest.approx(0.0, abs=1e-6)


def test_p2e_over_tokens_differs_from_e2p_so_the_kl_is_positive():
    module = _module(p2e="tokens")
    e2p, p2e, _ = module.assignment(F.normalize(torch.randn(2, 8, 16), dim=-1))
    assert module.symmetric_kl(e2p, p2e).item() > 1e-3
    losses = module(torch.randn(2, WIDTH, 4, 4, 4), _octant_labels([0, 1, 2, 0, 1, 2, 0, 1]))
    assert losses.kl.item() > 1e-3


def test_symmetric_kl_matches_hand_computed_value():
    p, q = torch.tensor([[[0.5, 0.5]]]), torch.tensor([[[0.9, 0.1]]])
    # KL(p||q) = .5 ln(.5/.9) + .5 ln(.5/.1) = 0.5108256; KL(q||p) = .9 ln(1.8) + .1 ln(.2) = 0.3680642
    # symmetric = (0.5108256 + 0.3680642) / 2 = 0.4394449
    assert SCDLModule.symmetric_kl(p, q).item() == pytest.approx(0.4394449, rel=1e-6)


# --- proxy loss -----------------------------------------------------------------------------------------


def test_proxy_loss_matches_hand_computed_value_and_weights_tokens():
    module = _module(distance_weight=0.1)
    similarity = torch.tensor([[[0.5, -0.2, 0.1], [0.9, 0.9, 0.9]]])  # (B=1, L=2, C=3)
    weights = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    # token 0: pull/push (e^-0.5 + e^-0.2 + e^0.1) / 3 = 0.8434774; distance 0.1 * 1 * (1 - 0.5) = 0.05 -> 0.8934774
    # token 1 has weight 0 and must not count.
    loss = module.proxy_loss(similarity, weights, token_weight=torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.8934774, rel=1e-6)
    expected_token_1 = (math.exp(0.9) + math.exp(-0.9) + math.exp(0.9)) / 3 + 0.1 * 0.1
    both = module.proxy_loss(similarity, weights, token_weight=torch.tensor([[1.0, 3.0]]))
    assert both.item() == pytest.approx((0.8934774 + 3 * expected_token_1) / 4, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proxy_loss_falls_toward_the_own_class_proxy_and_rises_toward_another(seed):
    torch.manual_seed(seed)
    module = SCDLModule(WIDTH, 4, grid=2)  # E = 256: random proxy means are nearly orthogonal
    means = F.normalize(module.proxy_mean.detach(), dim=-1)  # (C, E)
    own, other = 1, 3
    weights = F.one_hot(torch.tensor([[own]]), 4).float()  # one labeled token of class 1: (B=1, L=1, C)
    z = F.normalize(torch.randn(1, 1, 256), dim=-1)

    def loss_at(point: torch.Tensor) -> float:
        return module.proxy_loss(point @ means.t(), weights, torch.ones(1, 1)).item()

    start = loss_at(z)
    toward_own = [loss_at(F.normalize(z + t * means[own], dim=-1)) for t in (0.25, 0.5, 1.0, 2.0)]
    toward_other = [loss_at(F.normalize(z + t * means[other], dim=-1)) for t in (0.25, 0.5, 1.0, 2.0)]
    assert all(a > b for a, b in zip([start, *toward_own], toward_own)), toward_own
    assert all(a < b for a, b in zip([start, *toward_other], toward_other)), toward_other


# --- semantic anchors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("anchor", ["batch", "ema"])
def test_sac_gradient_reaches_only_the_proxy_means(anchor):
    module = _module(anchor=anchor)
    tokens = torch.randn(2, 8, WIDTH, requires_grad=True)  # (B_l, L, w), as the backbone would give them
    y_dist, _ = token_targets(torch.cat([_octant_labels([0, 1, 2, 0, 1, 2, 0, 1])] * 2), NUM_CLASSES, grid=2)

    module.sac_loss(tokens, y_dist).backward()

    assert module.proxy_mean.grad is not None and module.proxy_mean.grad.abs().sum() > 0
    assert module.proxy_raw_std.grad is None or not module.proxy_raw_std.grad.any()
    for name, parameter in module.projection.named_parameters():
        assert parameter.grad is None or not parameter.grad.any(), name
    assert tokens.grad is None or not tokens.grad.any()


def test_sac_is_one_minus_cosine_between_batch_centres_and_proxy_means():
    # Tokens are constant per class region, so each class token is exactly that class's vector v_c.
    torch.manual_seed(0)
    module = SCDLModule(WIDTH, 4, grid=2, hidden=(32,), embed_dim=16).eval()
    vectors = torch.randn(4, WIDTH)  # v_c
    classes = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])  # class 3 is absent from the batch
    tokens = vectors[classes].unsqueeze(0).repeat(2, 1, 1)  # (B_l=2, L=8, w)
    y_dist, _ = token_targets(_octant_labels(classes.tolist()).repeat(2, 1, 1, 1), 4, grid=2)
    with torch.no_grad():
        centres = module.project(vectors)  # unit centres of classes 0..3
        module.proxy_mean.copy_(3.0 * centres)  # same directions: cos = 1
    assert module.sac_loss(tokens, y_dist).item() == pytest.approx(0.0, abs=1e-6)

    with torch.no_grad():
        module.proxy_mean[1] = -centres[1]  # opposite: 1 - cos = 2 for class 1 only
        module.proxy_mean[3] = torch.randn(16)  # absent class: no part in the mean
    assert module.sac_loss(tokens, y_dist).item() == pytest.approx(2.0 / 3.0, abs=1e-6)


def test_ema_anchors_remember_classes_absent_from_the_batch():
    module = _module(anchor="ema", anchor_momentum=0.9).eval()
    all_classes = _octant_labels([0, 1, 2, 0, 1, 2, 0, 1])
    y_first, _ = token_targets(all_classes, NUM_CLASSES, grid=2)
    module.sac_loss(torch.randn(1, 8, WIDTH), y_first)
    assert module.anchor_seen.all()
    first_memory = module.anchor_memory.clone()
    torch.testing.assert_close(first_memory.norm(dim=1), torch.ones(NUM_CLASSES))

    y_second, _ = token_targets(_octant_labels([0, 1, 0, 1, 0, 1, 0, 1]), NUM_CLASSES, grid=2)  # class 2 absent
    loss = module.sac_loss(torch.randn(1, 8, WIDTH), y_second)

    torch.testing.assert_close(module.anchor_memory[2], first_memory[2])  # kept, not zeroed or decayed
    assert not torch.allclose(module.anchor_memory[:2], first_memory[:2])  # blended with the new centres
    cosine = (module.anchor_memory * F.normalize(module.proxy_mean, dim=-1)).sum(dim=1)
    assert loss.item() == pytest.approx((1.0 - cosine).mean().item(), rel=1e-5)  # all 3 classes take part

    batch_module = _module(anchor="batch").eval()
    batch_module.sac_loss(torch.randn(1, 8, WIDTH), y_second)
    assert not batch_module.anchor_seen.any()  # the batch mode keeps no memory


# --- the whole module -----------------------------------------------------------------------------------


def test_forward_returns_the_weighted_total_and_trains_projection_and_proxies():
    module = _module(proxy_weight=0.3, sac_weight=0.1, kl_weight=0.02)
    feat = torch.randn(3, WIDTH, 4, 4, 4, requires_grad=True)  # 2 labeled + 1 unlabeled
    labels = torch.cat([_octant_labels([0, 1, 2, 0, 1, 2, 0, 1]), _octant_labels([2, 2, 1, 1, 0, 0, 2, 2])])

    losses = module(feat, labels)
    assert isinstance(losses, SCDLLosses)
    for part in (losses.total, losses.proxy, losses.sac, losses.kl):
        assert part.shape == () and torch.isfinite(part)
    assert losses.total.item() == pytest.approx(
        (0.3 * losses.proxy + 0.1 * losses.sac + 0.02 * losses.kl).item(), rel=1e-5
    )
    assert losses.proxy > 0 and losses.sac > 0

    losses.total.backward()
    for tensor in (feat, module.proxy_mean, module.proxy_raw_std, module.projection[0].weight):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_forward_without_labels_treats_every_sample_as_unlabeled():
    module = _module()
    losses = module(torch.randn(2, WIDTH, 6, 4, 8), labels=None, unlabeled_weight=0.5)
    assert torch.isfinite(losses.total) and losses.proxy > 0
    assert losses.sac.item() == 0.0

    silent = _module(unlabeled=False)(torch.randn(2, WIDTH, 6, 4, 8), labels=None)
    assert silent.proxy.item() == 0.0  # unlabeled tokens switched off: nothing left


def test_forward_ignores_labeled_voxels_marked_unknown():
    module = _module(unlabeled=False)
    labels = _octant_labels([0, 1, 2, 0, 1, 2, 0, 1])
    losses = module(torch.randn(1, WIDTH, 4, 4, 4), labels, valid=torch.zeros_like(labels, dtype=torch.bool))
    assert losses.proxy.item() == 0.0 and losses.sac.item() == 0.0


@pytest.mark.parametrize("p2e", ["tokens", "classes"])
@pytest.mark.parametrize("anchor", ["batch", "ema"])
def test_all_losses_are_finite_under_bf16_autocast(p2e, anchor):
    module = _module(p2e=p2e, anchor=anchor)
    conv = torch.nn.Conv3d(1, WIDTH, kernel_size=1)
    labels = _octant_labels([0, 1, 2, 0, 1, 2, 0, 1]).repeat_interleave(2, 1)  # (1, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feat = conv(torch.randn(2, 1, 8, 4, 4))
        assert feat.dtype == torch.bfloat16
        losses = module(feat, labels)
    losses.total.backward()
    for part in (losses.total, losses.proxy, losses.sac, losses.kl):
        assert torch.isfinite(part) and part.dtype == torch.float32
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    assert torch.isfinite(module.proxy_mean.grad).all()


@pytest.mark.parametrize(("kwargs", "name"), [({"p2e": "token"}, "p2e"), ({"anchor": "emma"}, "anchor")])
def test_scdl_module_refuses_unknown_modes_naming_the_option(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name} must be one of .*got '{next(iter(kwargs.values()))}'"):
        SCDLModule(WIDTH, NUM_CLASSES, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"grid": 0}, "grid"),
        ({"num_samples": 0}, "num_samples"),
        ({"tau_e2p": 0.0}, "tau_e2p must be > 0, got 0.0"),
        ({"tau_p2e": -1.0}, "tau_p2e must be > 0, got -1.0"),
    ],
)
def test_scdl_module_refuses_bad_sizes_and_temperatures(kwargs, named):
    with pytest.raises(ValueError, match=named):
        SCDLModule(WIDTH, NUM_CLASSES, **kwargs)
