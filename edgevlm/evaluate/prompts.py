"""Prompt templates for classification and evaluation, laid out so the shared part comes first.

A template is ``str.format`` text: ``{choices}`` becomes the choices joined
by ", ", ``{column}`` an item's CSV column (``{{`` / ``}}`` are literal
braces). The messages put the long part that every item shares before the
image, where the engine's KV reuse (and its text-prefix snapshots across
processes) evaluates it once: the template's *head*, up to the last sentence
end before the first per-item field (without one, everything but the last
sentence), goes into the system message after ``--system``; the image and
the rest of the template make the user turn. LLaVA-style templates render a
turn's images before its text, so the head must be outside the user turn to
come before the image.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from edgevlm.errors import DataError

#: The template used when none is given.
DEFAULT_PROMPT = "Which of these best describes the image: {choices}? Answer with one of them only."
#: What --cot appends to the question, and the follow-up that asks for the answer.
COT_INSTRUCTION = "Think it through step by step first, then give your answer."
COT_ANSWER = "So which is it: {choices}? Answer with one of them only."
#: Where a head may end: after a sentence's punctuation and white space, or a line end.
_SENTENCE_END = re.compile(r"[.!?:;](?=\s)\s*|\n\s*")


@dataclass(frozen=True)
class PromptLayout:
    """A template split into the shared head and the per-item rest.

    Attributes:
        head: the shared text (``{choices}`` expanded), sent before the image.
        rest: the per-item template (``{choices}`` and ``{column}`` expanded per item).
        fields: the per-item fields the template uses.
    """

    head: str
    rest: str
    fields: tuple[str, ...]


def template_fields(template: str) -> tuple[str, ...]:
    """The ``{names}`` a template uses, in order.

    Raises:
        DataError: the template is not valid format text (unbalanced braces, ``{0}``, ``{a.b}``).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"the prompt template is invalid ({exc}); write literal braces as {{{{ and }}}}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise DataError(f"the prompt template field {{{name}}} is not allowed: use {{choices}} or "
                            "{column} with a CSV column name")
        if name not in names:
            names.append(name)
    return tuple(names)


def layout(template: str, choices: tuple[str, ...], columns: tuple[str, ...] | None = None) -> PromptLayout:
    """Split ``template`` into its shared head and per-item rest.

    Args:
        template: the prompt template.
        choices: the choices (``{choices}``).
        columns: the items CSV's extra columns (the per-item fields allowed); None
            where there is no CSV (one image: ``classify``), so only ``{choices}`` is allowed.

    Raises:
        DataError: a field that is neither ``choices`` nor a column.
    """
    fields = [f for f in template_fields(template) if f != "choices"]
    unknown = [f for f in fields if f not in (columns or ())]
    if unknown and columns is None:
        raise DataError(f"the prompt uses {{{unknown[0]}}}, but classifying one image fills in only {{choices}}: "
                        "write the value into the prompt (literal braces as {{ and }}), or put the images in an "
                        "items CSV with that column for edgevlm eval")
    if unknown:
        have = ", ".join(columns) if columns else "none besides image and label"
        raise DataError(f"the prompt uses {{{unknown[0]}}} but the items have no {unknown[0]!r} column "
                        f"(columns: {have})")
    first = _first_field(template, fields)
    cut = _head_end(template, first if first is not None else None)
    head = fill(template[:cut], choices, {}) if cut else ""
    return PromptLayout(head=head.strip(), rest=template[cut:].strip(), fields=tuple(fields))


def _first_field(template: str, fields: list[str]) -> int | None:
    """Offset of the first per-item field in the template (None without one)."""
    offsets = [m.start() for f in fields for m in re.finditer(r"(?<!\{)\{" + re.escape(f) + r"\}", template)]
    return min(offsets) if offsets else None


def _head_end(template: str, first_field: int | None) -> int:
    """Where the shared head ends: the last sentence end before the first field (or the last sentence)."""
    limit = first_field if first_field is not None else len(template.rstrip())
    ends = [m.end() for m in _SENTENCE_END.finditer(template, 0, limit) if m.end() <= limit]
    if first_field is None and ends and ends[-1] >= limit:
        ends.pop()
    return ends[-1] if ends else 0


def fill(template: str, choices: tuple[str, ...], fields: dict[str, str]) -> str:
    """``template`` with ``{choices}`` and the item's fields filled in."""
    return template.format_map({**fields, "choices": ", ".join(choices)})


def messages(prompt: PromptLayout, image: str, choices: tuple[str, ...], fields: dict[str, str], *,
             system: str | None = None, cot: bool = False) -> list[dict[str, Any]]:
    """The conversation for one item: the shared head first, then the image and the item's question."""
    first = "\n".join(p for p in (system or "", prompt.head) if p)
    question = fill(prompt.rest, choices, fields)
    if cot:
        question = f"{question} {COT_INSTRUCTION}".strip()
    content: list[dict[str, Any]] = [{"type": "image", "image": image}]
    if question:
        content.append({"type": "text", "text": question})
    out: list[dict[str, Any]] = [{"role": "system", "content": first}] if first else []
    out.append({"role": "user", "content": content})
    return out


def answer_turns(conversation: list[dict[str, Any]], reasoning: str,
                 choices: tuple[str, ...]) -> list[dict[str, Any]]:
    """The conversation after free reasoning, asking for the answer (scored over the reasoning)."""
    return [*conversation, {"role": "assistant", "content": reasoning},
            {"role": "user", "content": fill(COT_ANSWER, choices, {})}]
