"""Semi-supervised bases, each taking a batch of labeled + unlabeled patches to a dict of losses.

SCDL is a plug-in: every base takes an optional SCDL module per trained network. :func:`build_base`
turns a :class:`scdlcore.config.Config` into the right base with fresh networks.
"""

from __future__ import annotations

from ..config import Config
from ..nets import build_network
from ..scdl import SCDLModule
from .base import Batch, SSLBase, sigmoid_rampup
from .cps import CPS
from .mean_teacher import MeanTeacher
from .supervised import Supervised

__all__ = ["Batch", "CPS", "MeanTeacher", "SSLBase", "Supervised", "build_base", "sigmoid_rampup"]


def build_base(config: Config, num_classes: int) -> SSLBase:
    """Networks (and SCDL modules if enabled) for ``config.ssl.base``, initialised from the current RNG."""
    def network():
        return build_network(config.network.arch, in_channels=1, num_classes=num_classes, width=config.network.width, norm=config.norm)

    def scdl_modules(count: int) -> list[SCDLModule] | None:
        if not config.scdl.enabled:
            return None
        return [SCDLModule(config.network.width, num_classes, **config.scdl.module_kwargs()) for _ in range(count)]

    common = {"scdl_weight": config.scdl.weight, "top_k": config.ssl.top_k}
    if config.ssl.base == "cps":
        return CPS(network(), network(), cps_weight=config.ssl.cps_weight, scdl=scdl_modules(2), **common)
    if config.ssl.base == "mean_teacher":
        return MeanTeacher(
            network(),
            consistency_weight=config.ssl.consistency_weight,
            ema_decay=config.ssl.ema_decay,
            noise_std=config.ssl.noise_std,
            scdl=scdl_modules(1),
            **common,
        )
    return Supervised(network(), scdl=scdl_modules(1), **common)
