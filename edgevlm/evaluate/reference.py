"""``edgevlm eval --reference transformers``: items/s of transformers ``generate`` beside edgevlm's.

The first ``limit`` items that edgevlm answered are run through transformers
(float32, on the CPU, the threads edgevlm used) on the Hugging Face checkpoint
the GGUF pair was converted from, with the same conversation: the template's
shared head as the system message, then the image and the item's question.
transformers answers by greedy ``generate`` of a short answer (at most as many
new tokens as the longest choice takes), as a script without constrained
scoring would; its text is reported and matched against the choices. One
item is run first to warm up and not counted. Each item's time runs from the
call (image loading, chat template, processor) to the generated answer, as
edgevlm's ``ms`` does; edgevlm's rate is taken from the same items' ``ms``.
torch and transformers are imported only here, and only for this option.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgevlm.errors import InvalidRequestError, UnsupportedModelError
import edgevlm.evaluate.prompts as prompts

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.evaluate.data import Item
    from edgevlm.evaluate.runner import EvalConfig

#: Items run through transformers when no limit is given (it is slow on big models).
DEFAULT_LIMIT = 4


@dataclass(frozen=True)
class Reference:
    """What to run through transformers.

    Attributes:
        checkpoint: the Hugging Face checkpoint folder (``--hf``).
        limit: the first items (of those edgevlm answered) to run.
        threads: torch's CPU threads.
    """

    checkpoint: Path
    limit: int = DEFAULT_LIMIT
    threads: int = 4


def check_reference(reference: Reference) -> None:
    """Refuse a reference that cannot run (no weights read: call it before loading a model).

    Raises:
        InvalidRequestError: no checkpoint folder, or a limit below 1.
        UnsupportedModelError: torch or transformers is not installed, transformers lacks the
            architecture, or its processor needs a package that is missing (Qwen2-VL: torchvision).
    """
    if not (Path(reference.checkpoint) / "config.json").is_file():
        raise InvalidRequestError(f"--hf {reference.checkpoint}: not a Hugging Face checkpoint folder "
                                  "(no config.json)")
    if reference.limit < 1:
        raise InvalidRequestError(f"--reference-limit must be at least 1, got {reference.limit}")
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise UnsupportedModelError("--reference transformers needs torch and transformers (pip install -e '.[test]')")
    from edgevlm.benchmarks.transformers_ref import check_reference as check_transformers

    check_transformers(reference.checkpoint)  # the architecture and the processor (no weights read)


def run_reference(reference: Reference, items: list[Item], layout: prompts.PromptLayout, config: EvalConfig,
                  records: list[dict[str, Any]]) -> dict[str, Any]:
    """transformers' items/s on the first answered items, beside edgevlm's on the same items."""
    from edgevlm.benchmarks.transformers_ref import transformers_items

    check_reference(reference)
    by_row = {r["row"]: r for r in records}
    chosen = [item for item in items if item.row in by_row][:reference.limit]
    requests = [(str(item.path), prompts.messages(layout, str(item.path), config.choices, item.fields,
                                                  system=config.system)) for item in chosen]
    report = transformers_items(reference.checkpoint, requests, config.choices, reference.threads)
    answers = report.pop("answers")
    ms = sum(float(by_row[item.row].get("ms", 0.0)) for item in chosen)
    edgevlm_rate = len(chosen) / (ms / 1e3) if ms > 0 else 0.0
    agree = sum(a == by_row[item.row]["prediction"] for a, item in zip(answers, chosen))
    return {**report, "rows": [item.row for item in chosen], "answers": answers,
            "answers_that_are_choices": sum(a in config.choices for a in answers),
            "answer_agreement": agree / len(chosen) if chosen else 0.0,
            "edgevlm_items_per_s": edgevlm_rate,
            "speedup": edgevlm_rate / report["items_per_s"] if report["items_per_s"] > 0 else 0.0}
