"""Classification and evaluation on the public API: ``edgevlm classify`` and ``edgevlm eval``.

* :func:`classify`: one image, one of the choices (scored, or grammar-constrained);
* :func:`run_eval`: a labelled items CSV into a resumable run folder with
  predictions, metrics (accuracy, macro-F1, per-class scores), a confusion
  matrix and an F1 chart, optionally compared with a second model variant
  (:mod:`~edgevlm.evaluate.compare`) or timed beside transformers
  (:mod:`~edgevlm.evaluate.reference`).

The answers come from :meth:`edgevlm.VLM.score_choices` (or
:meth:`edgevlm.VLM.generate_choice`), so every answer is one of the choices.
"""

from __future__ import annotations

from edgevlm.evaluate.data import Item, load_choices, load_items
from edgevlm.evaluate.metrics import EvalMetrics, compute_metrics
from edgevlm.evaluate.reference import Reference
from edgevlm.evaluate.runner import Classification, EvalConfig, EvalSummary, classify, run_eval

__all__ = ["Classification", "EvalConfig", "EvalMetrics", "EvalSummary", "Item", "Reference", "classify",
           "compute_metrics", "load_choices", "load_items", "run_eval"]
