"""Classify one image, or evaluate a labelled set (resumably), on the public API.

:func:`classify` answers one image with one of the choices. :func:`run_eval`
runs an items CSV through a model into a run folder (see
:mod:`edgevlm.evaluate.store`): ``predictions.jsonl`` (one line per item, the
moment it is done), ``metrics.json``, ``confusion.png`` and ``f1.png``. A run
stopped by Ctrl-C, a crash or ``limit`` continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import edgevlm.evaluate.prompts as prompts
import edgevlm.evaluate.store as store
from edgevlm.errors import DataError, EdgeVLMError, InvalidRequestError, RunConflictError
from edgevlm.evaluate.compare import CompareMetrics, compare_metrics, compare_scores
from edgevlm.evaluate.data import Item, choices_digest, load_items
from edgevlm.evaluate.metrics import EvalMetrics, Outcome, compute_metrics
from edgevlm.evaluate.plots import save_confusion, save_f1

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm import VLM
    from edgevlm.stats import PrefillStats

LOG = logging.getLogger("edgevlm")
METHODS = ("score", "grammar")


@dataclass(frozen=True)
class Classification:
    """One image's answer.

    Attributes:
        choice: the answer (always one of the choices).
        method: "score" (the most probable choice) or "grammar" (constrained greedy decoding).
        probabilities: each choice's probability ("score" only).
        ms: the model's time.
    """

    choice: str
    method: str
    probabilities: dict[str, float] | None
    ms: float


def classify(vlm: VLM, image: str, choices: tuple[str, ...], *, prompt: str = prompts.DEFAULT_PROMPT,
             system: str | None = None, method: str = "score", image_tokens: int | None = None) -> Classification:
    """Answer ``image`` with one of ``choices``.

    Args:
        vlm: the loaded model.
        image: the image (path, URL-less data as :meth:`edgevlm.VLM.chat` takes).
        choices: at least two answers.
        prompt: the question (``{choices}`` is filled in).
        system: a system prompt before it.
        method: "score" or "grammar".
        image_tokens: the image-token budget.

    Raises:
        InvalidRequestError, DataError, ImageError: bad choices, prompt or image.
    """
    _check_method(method)
    conversation = prompts.messages(prompts.layout(prompt, choices), image, choices, {}, system=system)
    t0 = time.perf_counter()
    if method == "grammar":
        chosen = vlm.generate_choice(conversation, choices, max_image_tokens=image_tokens)
        return Classification(chosen.choice, method, None, (time.perf_counter() - t0) * 1e3)
    scores = vlm.score_choices(conversation, choices, max_image_tokens=image_tokens)
    return Classification(scores.choice, method, dict(zip(choices, scores.probabilities)),
                          (time.perf_counter() - t0) * 1e3)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise InvalidRequestError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate (the fields a run's manifest records, plus where and how much).

    Attributes:
        data: the items CSV (columns image, label, any others).
        choices: the answers (every label must be one).
        out: the run folder.
        prompt: the template (``{choices}``, ``{column}``).
        system: a system prompt before the template's shared head.
        limit: evaluate only the first ``limit`` items of the CSV.
        cot: reason freely first (at most ``cot_tokens``), then score the answer over the reasoning.
        image_tokens: the image-token budget per image.
        method: "score" or "grammar".
        restart: delete the folder's earlier results first.
    """

    data: Path
    choices: tuple[str, ...]
    out: Path
    prompt: str = prompts.DEFAULT_PROMPT
    system: str | None = None
    limit: int | None = None
    cot: bool = False
    cot_tokens: int = 256
    image_tokens: int | None = None
    method: str = "score"
    restart: bool = False


@dataclass(frozen=True)
class ItemError:
    """An item that could not be evaluated (the run went on without it)."""

    row: int
    image: str
    message: str


@dataclass(frozen=True)
class EvalSummary:
    """What a run did and where its results are.

    Attributes:
        out: the run folder.
        metrics: over every prediction in the folder (earlier runs' included).
        compare: the second model against the first, or None.
        new: items evaluated by this run; before: items the folder already had.
        errors: items this run could not evaluate.
        wall_s: this run's time.
        remaining: items left for a later run (``limit``).
    """

    out: Path
    metrics: EvalMetrics
    compare: CompareMetrics | None
    new: int
    before: int
    errors: tuple[ItemError, ...]
    wall_s: float
    remaining: int = 0
    files: tuple[Path, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), **self.metrics.to_json(),
                "compare": self.compare.to_json() if self.compare else None,
                "new": self.new, "before": self.before, "remaining": self.remaining,
                "errors": [e.__dict__ for e in self.errors], "wall_s": self.wall_s,
                "files": [str(f) for f in self.files]}


def manifest_for(vlm: VLM, config: EvalConfig, compare: VLM | None) -> store.RunManifest:
    """The run's identity: model files, prompt, choices and settings."""
    return store.RunManifest(version=store.MANIFEST_VERSION, model=vlm.identity, prompt=config.prompt,
                             system=config.system or "", choices=config.choices,
                             choices_sha256=choices_digest(config.choices), method=config.method, cot=config.cot,
                             cot_tokens=config.cot_tokens if config.cot else 0, image_tokens=config.image_tokens,
                             compare=compare.identity if compare is not None else None)


def run_eval(vlm: VLM, config: EvalConfig, *, compare: VLM | None = None,
             on_item: Callable[[dict[str, Any]], None] | None = None,
             on_start: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> EvalSummary:
    """Evaluate the items of ``config.data`` not yet in ``config.out``, then write metrics and pictures.

    Args:
        vlm: the model.
        config: what to run.
        compare: a second variant of the model to compare at the answer position.
        on_item: called with each new prediction record (progress bars).
        on_start: called with (items to do now, items done before).
        should_stop: asked before each item; True stops the run as Ctrl-C does (a
            SIGINT handler that sets a flag stops it between items, even when the
            signal lands in a llama.cpp callback, where Python drops the exception).

    Returns:
        The summary (metrics over every prediction in the folder).

    Raises:
        DataError: bad CSV, choices or prompt (nothing is run).
        RunConflictError: the folder holds another run (use ``restart``).
        KeyboardInterrupt: after the metrics of what was done are written.
    """
    _check(vlm, config, compare)
    items, layout = check_data(config)
    store.prepare(config.out, manifest_for(vlm, config, compare), restart=config.restart)
    log = store.PredictionLog(config.out / store.PREDICTIONS)
    earlier = log.read()
    todo, remaining = _todo(items, earlier, config)
    if on_start is not None:
        on_start(len(todo), len(earlier))
    t0, new, errors = time.perf_counter(), [], []
    try:
        for item in todo:
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            try:
                record = evaluate_item(vlm, item, layout, config, compare)
            except EdgeVLMError as exc:
                errors.append(_item_error(config.data, item, exc))
                continue
            log.append(record)
            new.append(record)
            if on_item is not None:
                on_item(record)
    finally:
        summary = _finish(config, compare, earlier + new, len(earlier), errors, time.perf_counter() - t0, remaining)
    return summary


def check_data(config: EvalConfig) -> tuple[list[Item], prompts.PromptLayout]:
    """The items and the prompt's layout, checked (cheap: call it before loading a model).

    Raises:
        DataError: a bad CSV row (named), or a prompt field that is not a column.
    """
    items = load_items(config.data, config.choices)
    return items, prompts.layout(config.prompt, config.choices, tuple(items[0].fields))


def _check(vlm: VLM, config: EvalConfig, compare: VLM | None) -> None:
    _check_method(config.method)
    if compare is not None and config.method != "score":
        raise InvalidRequestError("--compare needs the score method (it compares the next-token distributions)")
    if compare is not None and compare.n_vocab != vlm.n_vocab:
        raise InvalidRequestError(f"--compare: the models' vocabularies differ ({vlm.n_vocab} vs "
                                  f"{compare.n_vocab} tokens); compare variants of one model")
    if config.limit is not None and config.limit < 1:
        raise InvalidRequestError(f"--limit must be at least 1, got {config.limit}")


def _todo(items: list[Item], earlier: list[dict[str, Any]], config: EvalConfig) -> tuple[list[Item], int]:
    """The items still to do within the limit, and how many the limit leaves for later.

    Raises:
        RunConflictError: the CSV changed under the run (a row now names another image).
    """
    by_row = {item.row: item for item in items}
    for record in earlier:
        item = by_row.get(record.get("row"))  # type: ignore[arg-type]
        if item is None or item.image != record.get("image"):
            raise RunConflictError(
                f"{config.out}: row {record.get('row')} was {record.get('image')!r} when the run began but the "
                f"CSV now has {item.image if item else 'no such row'!r}; use --restart or another --out")
    done = {record["row"] for record in earlier}
    chosen = items[:config.limit] if config.limit is not None else items
    todo = [item for item in chosen if item.row not in done]
    remaining = sum(item.row not in done for item in items) - len(todo)
    return todo, remaining


def evaluate_item(vlm: VLM, item: Item, layout: prompts.PromptLayout, config: EvalConfig,
                  compare: VLM | None = None) -> dict[str, Any]:
    """One item's prediction record (a line of predictions.jsonl)."""
    choices = config.choices
    t0 = time.perf_counter()
    conversation = prompts.messages(layout, str(item.path), choices, item.fields, system=config.system,
                                    cot=config.cot)
    prefills: list[PrefillStats] = []
    record: dict[str, Any] = {"row": item.row, "image": item.image, "label": item.label}
    if config.cot:
        reply = vlm.chat(conversation, max_tokens=config.cot_tokens, temperature=0,
                         max_image_tokens=config.image_tokens)
        prefills.append(reply.prefill)
        record["reasoning"] = reply.text
        conversation = prompts.answer_turns(conversation, reply.text, choices)
    scores = None
    if config.method == "grammar":
        chosen = vlm.generate_choice(conversation, choices, max_image_tokens=config.image_tokens)
        prefills.append(chosen.prefill)
        record.update(prediction=chosen.choice, probabilities=None, choice_tokens=len(chosen.tokens))
    else:
        scores = vlm.score_choices(conversation, choices, max_image_tokens=config.image_tokens)
        prefills.append(scores.prefill)
        record.update(prediction=scores.choice, probabilities=dict(zip(choices, scores.probabilities)),
                      choice_tokens=scores.evaluated_tokens)
    record.update(correct=record["prediction"] == item.label, ms=(time.perf_counter() - t0) * 1e3,
                  prompt_positions=sum(p.prompt_positions for p in prefills),
                  evaluated_positions=sum(p.evaluated_positions for p in prefills),
                  reused_positions=sum(p.reused_positions for p in prefills), fields=item.fields)
    if compare is not None and scores is not None:
        t1 = time.perf_counter()
        other = compare.score_choices(conversation, choices, max_image_tokens=config.image_tokens)
        record["compare"] = compare_scores(scores, other, (time.perf_counter() - t1) * 1e3).to_json()
    return record


def _item_error(data: Path, item: Item, exc: EdgeVLMError) -> ItemError:
    message = f"{data.name} row {item.row} ({item.image}): {' '.join(str(exc).split())}"
    LOG.warning("%s", message)
    return ItemError(row=item.row, image=item.image, message=message)


def outcome(record: dict[str, Any]) -> Outcome:
    """What the metrics need of a prediction record."""
    return Outcome(label=str(record["label"]), prediction=str(record["prediction"]), ms=float(record.get("ms", 0.0)),
                   prompt_positions=int(record.get("prompt_positions", 0)),
                   evaluated_positions=int(record.get("evaluated_positions", 0)),
                   reused_positions=int(record.get("reused_positions", 0)),
                   choice_tokens=int(record.get("choice_tokens", 0)))


def _finish(config: EvalConfig, compare: VLM | None, records: list[dict[str, Any]], before: int,
            errors: list[ItemError], wall_s: float, remaining: int) -> EvalSummary:
    """Write metrics.json, the pictures and errors.jsonl for every prediction so far."""
    out = config.out
    try:
        metrics = compute_metrics([outcome(r) for r in records], config.choices)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{out / store.PREDICTIONS} has a record without {exc}; use --restart") from None
    compared = compare_metrics(str(compare.model_path), records) if compare is not None else None
    data = {**metrics.to_json(), "errors": len(errors), "remaining": remaining,
            "run": {"new": len(records) - before, "before": before, "wall_s": wall_s,
                    "items_per_s": (len(records) - before) / wall_s if wall_s > 0 else 0.0},
            "compare": compared.to_json() if compared else None}
    store.write_metrics(out / store.METRICS, data)
    store.write_errors(out / store.ERRORS, [e.__dict__ for e in errors])
    files = [out / store.PREDICTIONS, out / store.METRICS]
    if records:
        files += [save_confusion(metrics, out / store.CONFUSION), save_f1(metrics, out / store.F1_CHART)]
    return EvalSummary(out=out, metrics=metrics, compare=compared, new=len(records) - before, before=before,
                       errors=tuple(errors), wall_s=wall_s, remaining=remaining, files=tuple(files))
