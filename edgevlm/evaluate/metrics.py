"""Classification metrics from predictions: accuracy, macro-F1, per-class scores, the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Outcome:
    """What metrics need of one prediction (a line of predictions.jsonl)."""

    label: str
    prediction: str
    ms: float = 0.0
    prompt_positions: int = 0
    evaluated_positions: int = 0
    reused_positions: int = 0
    choice_tokens: int = 0


@dataclass(frozen=True)
class ClassMetrics:
    """One class's scores (precision / recall / F1 are 0 where undefined, as scikit-learn's default)."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int
    predicted: int


@dataclass(frozen=True)
class TokenCounts:
    """Prompt positions over all items: how many were evaluated and how many reused from the KV cache."""

    prompt: int = 0
    evaluated: int = 0
    reused: int = 0
    choice_tokens: int = 0


@dataclass(frozen=True)
class EvalMetrics:
    """A run's metrics (what metrics.json holds, ``compare`` and ``errors`` aside).

    Attributes:
        items: items with a prediction; correct: of which right.
        accuracy: correct / items.
        macro_f1: mean F1 over the classes that occur as label or prediction.
        per_class: every choice's scores, in the choices' order.
        confusion: counts[label][prediction], rows and columns in the choices' order.
        malformed: predictions that are not one of the choices (0: answers are constrained).
        items_per_s: items per second of model time (the predictions' ``ms``).
        tokens: prompt positions evaluated vs reused.
    """

    items: int
    correct: int
    accuracy: float
    macro_f1: float
    per_class: tuple[ClassMetrics, ...]
    labels: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]
    malformed: int
    items_per_s: float
    tokens: TokenCounts = field(default_factory=TokenCounts)

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        out["per_class"] = {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in self.per_class}
        out["confusion"] = [list(row) for row in self.confusion]
        out["labels"] = list(self.labels)
        return out


def compute_metrics(outcomes: Sequence[Outcome], choices: Sequence[str]) -> EvalMetrics:
    """Metrics of ``outcomes`` over the classes ``choices``."""
    index = {c: i for i, c in enumerate(choices)}
    n = len(choices)
    confusion = [[0] * n for _ in range(n)]
    malformed = 0
    for o in outcomes:
        if o.prediction not in index:
            malformed += 1
        elif o.label in index:
            confusion[index[o.label]][index[o.prediction]] += 1
    per_class = tuple(_class(c, i, confusion) for i, c in enumerate(choices))
    present = [c for c in per_class if c.support or c.predicted]
    correct = sum(confusion[i][i] for i in range(n))
    seconds = sum(o.ms for o in outcomes) / 1e3
    tokens = TokenCounts(prompt=sum(o.prompt_positions for o in outcomes),
                         evaluated=sum(o.evaluated_positions for o in outcomes),
                         reused=sum(o.reused_positions for o in outcomes),
                         choice_tokens=sum(o.choice_tokens for o in outcomes))
    return EvalMetrics(items=len(outcomes), correct=correct, accuracy=correct / len(outcomes) if outcomes else 0.0,
                       macro_f1=sum(c.f1 for c in present) / len(present) if present else 0.0,
                       per_class=per_class, labels=tuple(choices),
                       confusion=tuple(tuple(r) for r in confusion), malformed=malformed,
                       items_per_s=len(outcomes) / seconds if seconds > 0 else 0.0, tokens=tokens)


def _class(name: str, i: int, confusion: list[list[int]]) -> ClassMetrics:
    tp = confusion[i][i]
    support = sum(confusion[i])
    predicted = sum(row[i] for row in confusion)
    precision = tp / predicted if predicted else 0.0
    recall = tp / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ClassMetrics(name=name, precision=precision, recall=recall, f1=f1, support=support, predicted=predicted)
