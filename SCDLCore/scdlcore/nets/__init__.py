"""Segmentation networks, built from a JSON-able description ``{"arch": ..., **kwargs}``.

The same :func:`build_network` runs in training, in bundles and in inference, so a model's
``model.json`` (architecture name + constructor arguments) always rebuilds the exact network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from scdlcore.nets.scdl_prior import SCDLPriorVNet
from scdlcore.nets.vnet import VNet

__all__ = ["NETWORKS", "SCDLPriorVNet", "VNet", "build_network", "network_description"]

NETWORKS: dict[str, type[nn.Module]] = {"vnet": VNet, "vnet_scdl_prior": SCDLPriorVNet}


def build_network(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered architecture, e.g. ``build_network("vnet", num_classes=14, width=16)``."""
    try:
        cls = NETWORKS[arch]
    except KeyError:
        raise ValueError(f"Unknown network architecture {arch!r}; known: {', '.join(NETWORKS)}.") from None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"Bad arguments for network {arch!r}: {err}") from err


def network_description(net: nn.Module) -> Mapping[str, Any]:
    """The ``{"arch", **kwargs}`` description that :func:`build_network` turns back into ``net``."""
    for arch, cls in NETWORKS.items():
        if type(net) is cls:
            return {"arch": arch, **net.description()}
    raise ValueError(f"No description for network type {type(net).__name__}.")
