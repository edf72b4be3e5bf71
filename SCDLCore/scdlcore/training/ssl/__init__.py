"""Semi-supervised bases, each taking a batch of labeled + unlabeled patches to a dict of losses.

SCDL is a plug-in: every base takes an optional SCDL module per trained network. :func:`build_base`
turns a :class:`scdlcore.training.config.Config` into the right base with fresh networks.
"""

from __future__ import annotations

from scdlcore.nets import build_network
from scdlcore.nets.scdl import SCDLModule
from scdlcore.training.config import Config
from scdlcore.training.ssl.base import Batch, SSLBase, sigmoid_rampup
from scdlcore.training.ssl.cps import CPS
from scdlcore.training.ssl.mean_teacher import MeanTeacher
from scdlcore.training.ssl.supervised import Supervised

__all__ = ["Batch", "CPS", "MeanTeacher", "SSLBase", "Supervised", "build_base", "sigmoid_rampup"]


def build_base(config: Config, num_classes: int) -> SSLBase:
    """Networks (and SCDL modules if enabled) for ``config.ssl.base``, initialised from the current RNG."""
    prior = config.scdl.enabled and config.scdl.prior

    def network():
        sizes = {"in_channels": 1, "num_classes": num_classes, "width": config.network.width, "norm": config.norm}
        if prior:  # the SCDL module lives inside the network, which uses it for the prior path
            return build_network("vnet_scdl_prior", scdl=config.scdl.module_kwargs(), **sizes)
        return build_network(config.network.arch, **sizes)

    def scdl_modules(networks: list) -> list[SCDLModule] | None:
        if not config.scdl.enabled:
            return None
        if prior:
            return [net.scdl for net in networks]
        return [SCDLModule(config.network.width, num_classes, **config.scdl.module_kwargs()) for _ in networks]

    common = {"scdl_weight": config.scdl.weight, "top_k": config.ssl.top_k}
    if config.ssl.base == "cps":
        pair = [network(), network()]
        return CPS(*pair, cps_weight=config.ssl.cps_weight, scdl=scdl_modules(pair), **common)
    student = network()
    if config.ssl.base == "mean_teacher":
        return MeanTeacher(
            student,
            consistency_weight=config.ssl.consistency_weight,
            ema_decay=config.ssl.ema_decay,
            noise_std=config.ssl.noise_std,
            scdl=scdl_modules([student]),
            **common,
        )
    return Supervised(student, scdl=scdl_modules([student]), **common)
