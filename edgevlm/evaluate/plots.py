"""Pictures of a run: the labelled confusion matrix and per-class F1 (matplotlib, the ``eval`` extra)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgevlm.errors import DataError
from edgevlm.evaluate.metrics import EvalMetrics

#: Dots per inch of every picture (the pixel size is the figure size times this).
DPI = 100


def figure_size(n_classes: int) -> tuple[float, float]:
    """The confusion matrix's figure size in inches: room for the class names, growing with their number."""
    side = min(4.0 + 0.6 * n_classes, 24.0)
    return side + 1.5, side


def bar_size(n_classes: int) -> tuple[float, float]:
    """The F1 chart's figure size in inches."""
    return min(4.0 + 0.5 * n_classes, 24.0), 4.5


@contextmanager
def _figure(size: tuple[float, float], path: Path) -> Iterator[tuple[Any, Any]]:
    """A (figure, axes) pair of ``size`` inches, saved to ``path`` as a PNG on exit.

    Raises:
        DataError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("the pictures need matplotlib: pip install 'edgevlm[eval]'") from None
    fig, ax = plt.subplots(figsize=size, dpi=DPI)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)


def save_confusion(metrics: EvalMetrics, path: Path) -> Path:
    """Write the confusion matrix (rows: label, columns: prediction; counts in the cells) as a PNG.

    Raises:
        DataError: matplotlib is not installed.
    """
    n = len(metrics.labels)
    with _figure(figure_size(n), path) as (fig, ax):
        _draw_confusion(fig, ax, metrics)
    return path


def _draw_confusion(fig: Any, ax: Any, metrics: EvalMetrics) -> None:
    n = len(metrics.labels)
    counts = [list(r) for r in metrics.confusion]
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=[_short(c) for c in metrics.labels], rotation=45, ha="right")
    ax.set_yticks(range(n), labels=[_short(c) for c in metrics.labels])
    ax.set_xlabel("prediction")
    ax.set_ylabel("label")
    top = max((max(r) for r in counts), default=0)
    for i, row in enumerate(counts):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if top and value > top / 2 else "black")
    ax.set_title(f"accuracy {metrics.accuracy:.3f}, macro-F1 {metrics.macro_f1:.3f} ({metrics.items} items)")


def save_f1(metrics: EvalMetrics, path: Path) -> Path:
    """Write a bar chart of each class's F1 (support in the bar labels) as a PNG.

    Raises:
        DataError: matplotlib is not installed.
    """
    n = len(metrics.per_class)
    with _figure(bar_size(n), path) as (_, ax):
        names = [f"{_short(c.name)}\n(n={c.support})" for c in metrics.per_class]
        bars = ax.bar(range(n), [c.f1 for c in metrics.per_class], color="tab:blue")
        ax.bar_label(bars, labels=[f"{c.f1:.2f}" for c in metrics.per_class], padding=2)
        ax.set_xticks(range(n), labels=names, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("F1")
        ax.set_title(f"per-class F1 (macro-F1 {metrics.macro_f1:.3f})")
    return path


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"
