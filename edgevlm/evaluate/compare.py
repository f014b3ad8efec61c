"""Comparing two variants of a model (e.g. F16 and Q4_K_M) on the same items, at the answer position."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.scoring import ChoiceScores


@dataclass(frozen=True)
class ItemComparison:
    """One item on the second model.

    Attributes:
        prediction: the second model's answer.
        kl: KL(reference || other) of the next-token distributions at the answer position (nats).
        top1_same: both models' most likely next token is the same.
        ms: the second model's time for the item.
    """

    prediction: str
    kl: float
    top1_same: bool
    ms: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CompareMetrics:
    """The second model against the reference over a run's items.

    Attributes:
        model: the second model's path.
        items: items compared.
        mean_kl, max_kl: KL(reference || other) at the answer position (nats).
        top1_agreement: share of items whose most likely next token is the same.
        answer_agreement: share of items with the same answer.
        accuracy: the second model's accuracy.
    """

    model: str
    items: int
    mean_kl: float
    max_kl: float
    top1_agreement: float
    answer_agreement: float
    accuracy: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """KL(p || q) in nats from two log-probability vectors over the same vocabulary."""
    p = np.exp(reference)
    return float(max(np.sum(p * (reference - other)), 0.0))


def compare_scores(reference: ChoiceScores, other: ChoiceScores, ms: float) -> ItemComparison:
    """One item's comparison from both models' scores."""
    return ItemComparison(prediction=other.choice, kl=kl_divergence(reference.next_logprobs, other.next_logprobs),
                          top1_same=int(np.argmax(reference.next_logprobs)) == int(np.argmax(other.next_logprobs)),
                          ms=ms)


def compare_metrics(model: str, records: Sequence[dict[str, Any]]) -> CompareMetrics | None:
    """The comparison over the predictions that carry one (None when none do)."""
    rows = [r for r in records if isinstance(r.get("compare"), dict)]
    if not rows:
        return None
    kls = [float(r["compare"]["kl"]) for r in rows]
    n = len(rows)
    return CompareMetrics(model=model, items=n, mean_kl=sum(kls) / n, max_kl=max(kls),
                          top1_agreement=sum(bool(r["compare"]["top1_same"]) for r in rows) / n,
                          answer_agreement=sum(r["compare"]["prediction"] == r["prediction"] for r in rows) / n,
                          accuracy=sum(r["compare"]["prediction"] == r["label"] for r in rows) / n)
