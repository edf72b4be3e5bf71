"""Which unlabeled case to correct next: the cases a model is least sure of, with the organs to blame.

A CPS model's two networks disagree most where it is unsure (their disagreement is the score); a model
of one network is scored by the entropy of its probabilities. Only body voxels count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from scdlcore.io.volume import Volume
from scdlcore.labels import LabelTable

if TYPE_CHECKING:
    import torch

    from scdlcore.inference.predictor import Predictor


__all__ = ["Suggestion"]


_BODY_HU = -500.0  # body voxels for the suggestion scores (inside the body crop of the network input)


_MOSTLY_SHARE = 0.6  # a reason names the organs holding this share of the disagreement/uncertainty


@dataclass(frozen=True)
class Suggestion:
    """Why an unlabeled case is worth correcting (see :meth:`DatasetStore.suggest`).

    Attributes:
        case_id: the case.
        image: the stored CT file (absolute path), to load for correcting.
        score: in [0, 1], higher = a correction helps more. For ``measure="disagreement"`` the fraction of
            body voxels where the two networks' class maps differ; for ``"entropy"`` the mean softmax entropy
            of the body voxels over its maximum, log(C).
        measure: ``"disagreement"`` (CPS bundles: two networks) or ``"entropy"`` (one network).
        organs: per organ the networks found: the same measure restricted to the organ (disagreement: the
            fraction of the voxels either network calls that organ on which they differ; entropy: mean
            normalised entropy of the voxels predicted as that organ).
        reason: one sentence for people, e.g. "networks disagree on 12.0% of body voxels, mostly pancreas
            and right adrenal gland".
    """

    case_id: str
    image: str
    score: float
    measure: str
    organs: dict[str, float]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_case(image: Volume, predictor: Predictor) -> tuple[str, float, dict[str, float], str]:
    """Score one CT on the model grid (body voxels only), each network on its own.

    Returns:
        ``(measure, score, organs, reason)`` as in :class:`Suggestion`.
    """
    import torch

    from scdlcore.classes import class_argmax

    bundle = predictor.bundle
    prepared = predictor.preprocessing.prepare(image)  # the network input that `scdl segment` gives it
    body = torch.from_numpy(prepared.grid.array > _BODY_HU).to(predictor.device)
    x = torch.from_numpy(prepared.image())  # (D, H, W)
    probs = [predictor.sliding_window(x, networks=[net]) for net in predictor.networks[:2]]  # each (C, D, H, W)
    if len(probs) >= 2:
        return "disagreement", *_disagreement(class_argmax(probs[0]), class_argmax(probs[1]), body, bundle.labels)
    return "entropy", *_entropy(probs[0], body, bundle.labels)


def _disagreement(
    a: torch.Tensor, b: torch.Tensor, body: torch.Tensor, table: LabelTable
) -> tuple[float, dict[str, float], str]:
    """Class maps a, b (D, H, W) of two networks; body (D, H, W) bool. Returns ``(score, organs, reason)``."""
    differ = (a != b) & body
    score = float(differ.sum()) / max(1, int(body.sum()))
    organs, involved = {}, {}
    for index, name in enumerate(table.names, start=1):
        either = ((a == index) | (b == index)) & body
        count = int(either.sum())
        if count:
            involved[name] = float((either & differ).sum())
            organs[name] = involved[name] / count
    if score == 0:
        reason = "networks agree on every body voxel"
    else:
        reason = f"networks disagree on {_percent(score)} of body voxels" + _mostly(involved, table, ", mostly ")
    return score, organs, reason


def _entropy(probs: torch.Tensor, body: torch.Tensor, table: LabelTable) -> tuple[float, dict[str, float], str]:
    """Class probabilities (C, D, H, W) of one network; body (D, H, W) bool. Returns ``(score, organs, reason)``."""
    import torch

    from scdlcore.classes import class_argmax

    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(0) / math.log(probs.shape[0])
    score = float(entropy[body].mean()) if bool(body.any()) else 0.0
    predicted = class_argmax(probs)
    organs, total = {}, {}
    for index, name in enumerate(table.names, start=1):
        voxels = (predicted == index) & body
        if bool(voxels.any()):
            organs[name] = float(entropy[voxels].mean())
            total[name] = float(entropy[voxels].sum())
    reason = f"mean voxel uncertainty {_percent(score)} of the maximum" + _mostly(total, table, ", highest in ")
    return score, organs, reason


def _mostly(amounts: dict[str, float], table: LabelTable, prefix: str) -> str:
    """``prefix`` + the (at most 3) organs holding most of ``amounts``; or "".

    E.g. "pancreas and right adrenal gland".
    """
    ranked = sorted((item for item in amounts.items() if item[1] > 0), key=lambda item: -item[1])
    total, chosen, covered = sum(amount for _, amount in ranked), [], 0.0
    for name, amount in ranked[:3]:
        chosen.append(table[name].display_name.lower())
        covered += amount
        if covered >= _MOSTLY_SHARE * total:
            break
    if not chosen:
        return ""
    return prefix + (chosen[0] if len(chosen) == 1 else ", ".join(chosen[:-1]) + " and " + chosen[-1])


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"
