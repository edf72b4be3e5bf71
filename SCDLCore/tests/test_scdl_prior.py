"""SCDL's optional prior path: shapes, where its gradient goes, and that bundles carry it."""

from __future__ import annotations

import pytest
import torch

from scdlcore.bundle.format import load_bundle, save_bundle
from scdlcore.labels import SYNAPSE13
from scdlcore.nets import SCDLPriorVNet, build_network, network_description
from scdlcore.nets.scdl import SCDLModule
from scdlcore.training.config import Config
from scdlcore.training.ssl import Batch, build_base


@pytest.mark.parametrize(("shape", "grid"), [((16, 32, 16), 2), ((32, 32, 48), 4)])
def test_prior_keeps_the_feature_shape_and_changes_the_features(shape, grid):
    torch.manual_seed(0)
    module = SCDLModule(4, 5, grid=grid, hidden=(16,), embed_dim=8, num_samples=3, prior=True)
    feat = torch.randn(2, 4, *shape)  # (B, w, D, H, W)
    out = module.prior(feat)
    assert out.shape == feat.shape
    assert not torch.allclose(out, feat)


def test_prior_needs_the_module_built_with_it():
    with pytest.raises(RuntimeError, match="without the prior path"):
        SCDLModule(4, 5, grid=2).prior(torch.randn(1, 4, 16, 16, 16))


@pytest.mark.slow
def test_prior_network_returns_logits_and_the_pre_prior_embedding():
    torch.manual_seed(0)
    net = SCDLPriorVNet(num_classes=5, width=2, scdl={"grid": 2, "hidden": (8,), "embed_dim": 8, "num_samples": 2})
    image = torch.randn(1, 1, 16, 32, 16)
    logits, feat = net(image)
    assert logits.shape == (1, 5, 16, 32, 16) and feat.shape == (1, 2, 16, 32, 16)
    torch.testing.assert_close(feat, net.backbone.features(image))
    description = network_description(net)
    assert description["arch"] == "vnet_scdl_prior" and description["scdl"]["grid"] == 2
    rebuilt = build_network(**description)
    rebuilt.load_state_dict(net.state_dict())
    torch.testing.assert_close(rebuilt.eval()(image)[0], net.eval()(image)[0])


@pytest.mark.slow  # trains
def test_training_with_the_prior_trains_it_and_bundles_carry_it(tmp_path):
    torch.manual_seed(0)
    config = Config().with_overrides({"network.width": 2, "scdl.grid": 2, "scdl.prior": True})
    base = build_base(config, SYNAPSE13.num_classes)
    assert base.scdl[0] is base.networks[0].scdl, "the losses and the prior share one SCDL module"
    images, labels = torch.rand(4, 1, 32, 32, 32), torch.randint(0, SYNAPSE13.num_classes, (2, 32, 32, 32))
    base.training_losses(Batch(images, labels), 0.5)["total"].backward()
    assert base.networks[0].scdl.prior_projection.weight.grad.abs().sum() > 0

    path = save_bundle(
        tmp_path / "prior",
        base.inference_networks(),
        name="prior",
        labels=SYNAPSE13,
        spacing=(3, 3, 3),
        hu_window=(-125, 275),
        patch_size=(32, 32, 32),
        base="cps",
        scdl=config.to_dict()["scdl"],
    )
    networks = load_bundle(path).build_networks("cpu")
    assert [type(n) for n in networks] == [SCDLPriorVNet, SCDLPriorVNet]
    with torch.no_grad():
        torch.testing.assert_close(networks[1](images)[0], base.networks[1].eval()(images)[0])
