"""The SCDL module: Gaussian class proxies, bidirectional assignment (CDBA) and semantic anchors (SAC).

SCDLCore/docs/METHOD.md section 3 is the specification; the letters below follow it.

- B: samples in the batch, labeled ones first (``num_labeled`` of them);
- w: embedding channels of the backbone's ``feat``; C: classes, background included;
- G: token grid per axis, L = G**3 tokens per sample; E: projected dimension (256); S: proxy samples.

The module only adds training losses; at inference it costs nothing (the backbone ignores it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scdlcore.choices import ANCHOR_MODES, P2E_MODES

__all__ = ["SCDLModule", "SCDLLosses", "token_targets"]


@dataclass
class SCDLLosses:
    """The weighted total and its parts (scalars), for logging."""

    total: torch.Tensor
    proxy: torch.Tensor
    sac: torch.Tensor
    kl: torch.Tensor


class SCDLModule(nn.Module):
    """Semantic Class Distribution Learning for one segmentation network.

    Args:
        width: w, channels of the backbone's ``feat``.
        num_classes: C, background included.
        grid: G, tokens per axis (12 for a 96^3 patch; the pooled grid is G^3).
        hidden: widths of the projection MLP's hidden layers.
        embed_dim: E, dimension of projected tokens and proxies.
        dropout: dropout after each hidden layer of the MLP.
        num_samples: S, reparameterised samples drawn from each class proxy per forward.
        tau_e2p: temperature of the embedding-to-proxy softmax (over classes).
        tau_p2e: temperature of the proxy-to-embedding softmax.
        p2e: ``"tokens"``: softmax over the tokens of a sample, a real proxy->embedding distribution (default);
            ``"classes"``: over classes, as the released code does (with tau_p2e == tau_e2p, p2e equals e2p
            and the KL is 0).
        distance_weight: weight of the distance term inside the proxy loss.
        proxy_weight, sac_weight, kl_weight: weights of L_proxy, L_sac, L_kl in the total.
        unlabeled: also apply the proxy loss to unlabeled tokens, weighted by the detached agreement b.
        anchor: ``"batch"``: SAC centres from the current batch (released); ``"ema"``: an EMA memory of centres.
        anchor_momentum: EMA momentum of the centre memory.
        prior: build the optional prior path (:meth:`prior`), which then becomes part of the segmentation
            network (see :class:`scdlcore.nets.SCDLPriorVNet`).
    """

    def __init__(
        self,
        width: int,
        num_classes: int,
        *,
        grid: int = 12,
        hidden: tuple[int, ...] = (512, 512),
        embed_dim: int = 256,
        dropout: float = 0.2,
        num_samples: int = 50,
        tau_e2p: float = 0.2,
        tau_p2e: float = 0.2,
        p2e: str = "tokens",
        distance_weight: float = 0.1,
        proxy_weight: float = 0.3,
        sac_weight: float = 0.1,
        kl_weight: float = 0.02,
        unlabeled: bool = True,
        anchor: str = "batch",
        anchor_momentum: float = 0.9,
        prior: bool = False,
    ) -> None:
        super().__init__()
        if p2e not in P2E_MODES:
            raise ValueError(f"p2e must be one of {P2E_MODES}, got {p2e!r}.")
        if anchor not in ANCHOR_MODES:
            raise ValueError(f"anchor must be one of {ANCHOR_MODES}, got {anchor!r}.")
        for name, value, minimum in (
            ("width", width, 1),
            ("num_classes", num_classes, 2),
            ("grid", grid, 1),
            ("num_samples", num_samples, 1),
        ):
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}.")
        for name, value in (("tau_e2p", tau_e2p), ("tau_p2e", tau_p2e)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}.")
        self.grid, self.num_classes, self.num_samples = grid, num_classes, num_samples
        self.tau_e2p, self.tau_p2e, self.p2e = tau_e2p, tau_p2e, p2e
        self.distance_weight, self.proxy_weight, self.sac_weight, self.kl_weight = (
            distance_weight,
            proxy_weight,
            sac_weight,
            kl_weight,
        )
        self.unlabeled, self.anchor, self.anchor_momentum = unlabeled, anchor, anchor_momentum

        layers: list[nn.Module] = []
        previous = width
        for size in hidden:
            layers += [nn.Linear(previous, size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            previous = size
        layers.append(nn.Linear(previous, embed_dim))
        self.projection = nn.Sequential(*layers)
        self.proxy_mean = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.1)
        self.proxy_raw_std = nn.Parameter(torch.full((num_classes, embed_dim), -2.0))  # softplus(-2) ~ 0.13
        self.prior_projection = nn.Conv3d(embed_dim, width, kernel_size=1) if prior else None
        self.register_buffer("anchor_memory", torch.zeros(num_classes, embed_dim))
        self.register_buffer("anchor_seen", torch.zeros(num_classes, dtype=torch.bool))

    # --- the parts, each usable alone (tests pin them) -----------------------------------------------
    def tokens(self, feat: torch.Tensor) -> torch.Tensor:
        """feat (B, w, D, H, W) -> tokens (B, L, w), average-pooled to a G^3 grid."""
        pooled = F.adaptive_avg_pool3d(feat.float(), self.grid)
        return pooled.flatten(2).transpose(1, 2)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (..., w) -> unit vectors z (..., E)."""
        return F.normalize(self.projection(tokens), dim=-1)

    def proxy_samples(self) -> torch.Tensor:
        """Reparameterised, normalised samples of every class proxy: (C, S, E)."""
        std = F.softplus(self.proxy_raw_std)
        eps = torch.randn(self.num_classes, self.num_samples, std.shape[1], device=std.device)
        return F.normalize(self.proxy_mean.unsqueeze(1) + std.unsqueeze(1) * eps, dim=-1)

    def assignment(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CDBA. z (B, L, E) -> e2p P, class-normalised p2e Q', agreement b, each (B, L, C)."""
        q = z @ F.normalize(self.proxy_mean, dim=-1).t()
        e2p = torch.softmax(q / self.tau_e2p, dim=2)
        p2e = torch.softmax(q / self.tau_p2e, dim=1 if self.p2e == "tokens" else 2)
        p2e = p2e / p2e.sum(dim=2, keepdim=True).clamp_min(1e-12)
        agreement = e2p * p2e
        return e2p, p2e, agreement / agreement.sum(dim=2, keepdim=True).clamp_min(1e-12)

    def proxy_loss(self, similarity: torch.Tensor, weights: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
        """L_proxy from similarities m and class weights w, both (B, L, C); token_weight (B, L) scales each token."""
        pull_push = torch.exp(-(2.0 * weights - 1.0) * similarity).mean(dim=2)
        distance = (weights * (1.0 - similarity)).sum(dim=2)
        per_token = pull_push + self.distance_weight * distance
        return (per_token * token_weight).sum() / token_weight.sum().clamp_min(1e-12)

    def sac_loss(self, tokens: torch.Tensor, y_dist: torch.Tensor) -> torch.Tensor:
        """Semantic anchors. tokens (B_l, L, w) and y_dist (B_l, L, C) of labeled samples -> scalar.

        Class tokens are the y_dist-weighted means of a sample's tokens, projected by the same MLP; the
        batch centre of a class is detached, so only the proxy means receive this gradient.
        """
        mass = y_dist.sum(dim=1)  # (B_l, C)
        class_tokens = (y_dist.transpose(1, 2) @ tokens) / mass.clamp_min(1e-12).unsqueeze(2)  # (B_l, C, w)
        projected = self.project(class_tokens)
        present = mass > 1e-6
        counts = present.sum(dim=0)  # (C,)
        centres = (projected * present.unsqueeze(2)).sum(dim=0) / counts.clamp_min(1).unsqueeze(1)
        centres = F.normalize(centres, dim=-1).detach()
        in_batch = counts > 0
        if self.anchor == "ema":
            centres, in_batch = self._update_anchor_memory(centres, in_batch)
        if not bool(in_batch.any()):
            return self.proxy_mean.sum() * 0.0
        cosine = (centres * F.normalize(self.proxy_mean, dim=-1)).sum(dim=1)
        return (1.0 - cosine)[in_batch].mean()

    def prior(self, feat: torch.Tensor) -> torch.Tensor:
        """The prior path (released MagicNet/Synapse variant): ``feat`` plus class-prior features.

        Each token's prior is r_t = normalize(sum_c P[t, c] mu_c); the G^3 grid of priors is mapped to w channels by a
        1x1x1 convolution, upsampled trilinearly to the feature map and added. feat (B, w, D, H, W) -> same shape.
        """
        if self.prior_projection is None:
            raise RuntimeError("This SCDL module was built without the prior path (prior=False).")
        z = self.project(self.tokens(feat))
        e2p, _, _ = self.assignment(z.float())
        priors = F.normalize(e2p @ self.proxy_mean, dim=-1)  # (B, L, E)
        grid = priors.transpose(1, 2).reshape(feat.shape[0], -1, self.grid, self.grid, self.grid)
        upsampled = F.interpolate(
            self.prior_projection(grid.to(feat.dtype)), size=feat.shape[2:], mode="trilinear", align_corners=False
        )
        return feat + upsampled

    @staticmethod
    def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """0.5 (KL(p||q) + KL(q||p)) over the class axis, mean over tokens; p, q (B, L, C)."""
        log_p, log_q = p.clamp_min(1e-8).log(), q.clamp_min(1e-8).log()
        return 0.5 * ((p * (log_p - log_q)).sum(dim=2) + (q * (log_q - log_p)).sum(dim=2)).mean()

    # --- the whole module -----------------------------------------------------------------------------
    def forward(
        self,
        feat: torch.Tensor,
        labels: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        unlabeled_weight: float = 1.0,
    ) -> SCDLLosses:
        """SCDL losses of one network's batch.

        Args:
            feat: (B, w, D, H, W), the labeled samples first.
            labels: (B_l, D, H, W) integer targets of the first B_l samples, or None if no sample is labeled.
            valid: (B_l, D, H, W) bool, voxels whose label is known, or None (all known).
            unlabeled_weight: scales the unlabeled tokens' proxy loss (a ramp-up).
        """
        tokens = self.tokens(feat)
        z = self.project(tokens)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            similarity = torch.einsum("ble,cse->blc", z, self.proxy_samples()) / self.num_samples
            e2p, p2e, agreement = self.assignment(z)
            batch, num_tokens = z.shape[:2]
            num_labeled = 0 if labels is None else labels.shape[0]

            weights = agreement.detach().clone()
            token_weight = torch.full((batch, num_tokens), unlabeled_weight if self.unlabeled else 0.0, device=z.device)
            sac = self.proxy_mean.sum() * 0.0
            if num_labeled:
                y_dist, known = token_targets(labels, self.num_classes, self.grid, valid)
                weights[:num_labeled] = y_dist
                token_weight[:num_labeled] = known
                sac = self.sac_loss(tokens[:num_labeled].float(), y_dist * known.unsqueeze(2))
            proxy = self.proxy_loss(similarity, weights, token_weight)
            kl = self.symmetric_kl(e2p, p2e)
            total = self.proxy_weight * proxy + self.sac_weight * sac + self.kl_weight * kl
        return SCDLLosses(total=total, proxy=proxy.detach(), sac=sac.detach(), kl=kl.detach())

    def _update_anchor_memory(self, centres: torch.Tensor, in_batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            fresh = in_batch & ~self.anchor_seen
            blended = self.anchor_momentum * self.anchor_memory + (1 - self.anchor_momentum) * centres
            updated = torch.where(
                fresh.unsqueeze(1), centres, torch.where(in_batch.unsqueeze(1), blended, self.anchor_memory)
            )
            self.anchor_memory.copy_(F.normalize(updated, dim=-1) * (in_batch | self.anchor_seen).unsqueeze(1))
            self.anchor_seen |= in_batch
        return self.anchor_memory.clone(), self.anchor_seen.clone()


def token_targets(
    labels: torch.Tensor, num_classes: int, grid: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class distribution of every token.

    Args:
        labels: (B, D, H, W) integer map. valid: (B, D, H, W) bool or None.
    Returns:
        y_dist (B, L, C): the one-hot target pooled to G^3 over known voxels, clamped >= 0, rows summing to 1
        (a token with no known voxel gets a uniform row); known (B, L): the fraction of known voxels per token.
    """
    onehot = F.one_hot(labels.long(), num_classes).permute(0, 4, 1, 2, 3).float()
    mask = torch.ones_like(labels, dtype=torch.float32) if valid is None else valid.float()
    pooled = F.adaptive_avg_pool3d(onehot * mask.unsqueeze(1), grid).flatten(2).transpose(1, 2).clamp_min(0.0)
    known = F.adaptive_avg_pool3d(mask.unsqueeze(1), grid).flatten(1)
    totals = pooled.sum(dim=2, keepdim=True)
    uniform = torch.full_like(pooled, 1.0 / num_classes)
    y_dist = torch.where(totals > 1e-8, pooled / totals.clamp_min(1e-12), uniform)
    return y_dist, known
