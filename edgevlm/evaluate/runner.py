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
from edgevlm.evaluate.reference import Reference, run_reference

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm import VLM
    from edgevlm.scoring import ChoiceScores
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
        direct_too: with ``cot``, also answer each item directly (the prompt without the reasoning
            instruction, scored right after it, as a run without ``cot`` would) and report both accuracies.
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
    direct_too: bool = False
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
        direct: with ``direct_too``, the metrics of the direct answers (``metrics`` are the CoT ones).
        reference: the transformers reference (items/s beside edgevlm's on the same items), or None.
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
    direct: EvalMetrics | None = None
    reference: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), **self.metrics.to_json(), **direct_json(self.direct),
                "compare": self.compare.to_json() if self.compare else None, "reference": self.reference,
                "new": self.new, "before": self.before, "remaining": self.remaining,
                "errors": [e.__dict__ for e in self.errors], "wall_s": self.wall_s,
                "files": [str(f) for f in self.files]}


def manifest_for(vlm: VLM, config: EvalConfig, compare: VLM | None) -> store.RunManifest:
    """The run's identity: model files, prompt, choices and settings."""
    return store.RunManifest(version=store.MANIFEST_VERSION, model=vlm.identity, prompt=config.prompt,
                             system=config.system or "", choices=config.choices,
                             choices_sha256=choices_digest(config.choices), method=config.method, cot=config.cot,
                             cot_tokens=config.cot_tokens if config.cot else 0, image_tokens=config.image_tokens,
                             compare=compare.identity if compare is not None else None,
                             direct=config.cot and config.direct_too)


def run_eval(vlm: VLM, config: EvalConfig, *, compare: VLM | None = None, reference: Reference | None = None,
             on_item: Callable[[dict[str, Any]], None] | None = None,
             on_start: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> EvalSummary:
    """Evaluate the items of ``config.data`` not yet in ``config.out``, then write metrics and pictures.

    Args:
        vlm: the model.
        config: what to run.
        compare: a second variant of the model to compare at the answer position.
        reference: time the first items through transformers too (after the run; not on Ctrl-C).
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
    items, layout = check_data(config, compare=compare is not None, reference=reference is not None)
    store.prepare(config.out, manifest_for(vlm, config, compare), restart=config.restart)
    log = store.PredictionLog(config.out / store.PREDICTIONS)
    earlier = log.read()
    todo, remaining = todo_items(items, earlier, config)
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
        wall_s = time.perf_counter() - t0
        report = (run_reference(reference, items, layout, config, earlier + new)
                  if reference is not None and earlier + new else None)
    except BaseException:  # Ctrl-C, a crash, transformers failing: the metrics of what was done are written
        _finish(config, compare, earlier + new, len(earlier), errors, time.perf_counter() - t0, remaining)
        raise
    return _finish(config, compare, earlier + new, len(earlier), errors, wall_s, remaining, report)


def check_settings(config: EvalConfig, *, compare: bool = False, reference: bool = False) -> None:
    """The settings that need no data or model, checked.

    Raises:
        InvalidRequestError: an unknown method, ``--compare`` without scoring, a limit below 1,
            ``direct_too`` without ``cot``, a reference with ``cot``.
    """
    _check_method(config.method)
    if compare and config.method != "score":
        raise InvalidRequestError("--compare needs the score method (it compares the next-token distributions); "
                                  "drop --method grammar")
    if config.limit is not None and config.limit < 1:
        raise InvalidRequestError(f"--limit must be at least 1, got {config.limit}; leave it out for every item")
    if config.direct_too and not config.cot:
        raise InvalidRequestError("--direct-too scores the direct answer beside the reasoned one: add --cot")
    if reference and config.cot:
        raise InvalidRequestError("--reference transformers times the direct prompt; run it without --cot")


def check_data(config: EvalConfig, *, compare: bool = False,
               reference: bool = False) -> tuple[list[Item], prompts.PromptLayout]:
    """The settings, the items and the prompt's layout, checked (cheap: call it before loading a model).

    Raises:
        InvalidRequestError: bad settings (see :func:`check_settings`).
        DataError: a bad CSV row (named), or a prompt field that is not a column.
    """
    check_settings(config, compare=compare, reference=reference)
    items = load_items(config.data, config.choices)
    return items, prompts.layout(config.prompt, config.choices, tuple(items[0].fields))


def _check(vlm: VLM, config: EvalConfig, compare: VLM | None) -> None:
    if compare is not None and compare.n_vocab != vlm.n_vocab:
        raise InvalidRequestError(f"--compare: the models' vocabularies differ ({vlm.n_vocab} vs "
                                  f"{compare.n_vocab} tokens); compare variants of one model")


def _as_run_began(record: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What an earlier prediction says its row was: image, label and fields."""
    return record.get("image"), record.get("label"), record.get("fields", {})


def todo_items(items: list[Item], earlier: list[dict[str, Any]], config: EvalConfig) -> tuple[list[Item], int]:
    """The items still to do within the limit, and how many the limit leaves for later.

    Raises:
        RunConflictError: the CSV changed under the run (a done row now has another image, label or field).
    """
    by_row = {item.row: item for item in items}
    for record in earlier:
        item = by_row.get(record.get("row"))  # type: ignore[arg-type]
        now = (item.image, item.label, item.fields) if item is not None else None
        if now != _as_run_began(record):
            what = ("no such row" if now is None else
                    ", ".join(f"{name} {b!r} (was {a!r})" for name, a, b in zip(("image", "label", "fields"),
                                                                                  _as_run_began(record), now)
                              if a != b))
            raise RunConflictError(
                f"{config.out}: the CSV changed under the run: row {record.get('row')} now has {what}; "
                "use --restart or another --out")
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
    conversation = prompts.messages(layout, str(item.path), choices, item.fields, system=config.system)
    prefills: list[PrefillStats] = []
    record: dict[str, Any] = {"row": item.row, "image": item.image, "label": item.label}
    if config.cot and config.direct_too:  # the direct answer first: its prompt is the reasoning prompt's prefix
        direct, _ = _answer(vlm, conversation, config, prefills)
        record.update(direct_prediction=direct["prediction"], direct_probabilities=direct["probabilities"],
                      direct_correct=direct["prediction"] == item.label)
        record["choice_tokens"] = direct["choice_tokens"]
    if config.cot:
        conversation = prompts.messages(layout, str(item.path), choices, item.fields, system=config.system,
                                        cot=True)
        reply = vlm.chat(conversation, max_tokens=config.cot_tokens, temperature=0,
                         max_image_tokens=config.image_tokens)
        prefills.append(reply.prefill)
        record["reasoning"] = reply.text
        conversation = prompts.answer_turns(conversation, reply.text, choices)
    answer, scores = _answer(vlm, conversation, config, prefills)
    answer["choice_tokens"] += record.pop("choice_tokens", 0)
    record.update(answer)
    record.update(correct=record["prediction"] == item.label, ms=(time.perf_counter() - t0) * 1e3,
                  prompt_positions=sum(p.prompt_positions for p in prefills),
                  evaluated_positions=sum(p.evaluated_positions for p in prefills),
                  reused_positions=sum(p.reused_positions for p in prefills), fields=item.fields)
    if compare is not None and scores is not None:
        t1 = time.perf_counter()
        other = compare.score_choices(conversation, choices, max_image_tokens=config.image_tokens)
        record["compare"] = compare_scores(scores, other, (time.perf_counter() - t1) * 1e3).to_json()
    return record


def _answer(vlm: VLM, conversation: list[dict[str, Any]], config: EvalConfig,
            prefills: list[PrefillStats]) -> tuple[dict[str, Any], ChoiceScores | None]:
    """The constrained answer after ``conversation`` (its prefill appended to ``prefills``), and the scores."""
    choices = config.choices
    if config.method == "grammar":
        chosen = vlm.generate_choice(conversation, choices, max_image_tokens=config.image_tokens)
        prefills.append(chosen.prefill)
        return {"prediction": chosen.choice, "probabilities": None, "choice_tokens": len(chosen.tokens)}, None
    scores = vlm.score_choices(conversation, choices, max_image_tokens=config.image_tokens)
    prefills.append(scores.prefill)
    return {"prediction": scores.choice, "probabilities": dict(zip(choices, scores.probabilities)),
            "choice_tokens": scores.evaluated_tokens}, scores


def _item_error(data: Path, item: Item, exc: EdgeVLMError) -> ItemError:
    message = f"{data.name} row {item.row} ({item.image}): {' '.join(str(exc).split())}"
    LOG.warning("%s", message)
    return ItemError(row=item.row, image=item.image, message=message)


def outcome(record: dict[str, Any], key: str = "prediction") -> Outcome:
    """What the metrics need of a prediction record (``key``: "direct_prediction" for the direct answers)."""
    return Outcome(label=str(record["label"]), prediction=str(record[key]), ms=float(record.get("ms", 0.0)),
                   prompt_positions=int(record.get("prompt_positions", 0)),
                   evaluated_positions=int(record.get("evaluated_positions", 0)),
                   reused_positions=int(record.get("reused_positions", 0)),
                   choice_tokens=int(record.get("choice_tokens", 0)))


def direct_json(direct: EvalMetrics | None) -> dict[str, Any]:
    """The direct answers' figures in metrics.json and the JSON summary (nothing without ``direct_too``)."""
    if direct is None:
        return {}
    return {"direct_accuracy": direct.accuracy, "direct_macro_f1": direct.macro_f1, "direct_correct": direct.correct,
            "direct_per_class": direct.to_json()["per_class"], "direct_confusion": [list(r) for r in direct.confusion]}


def compare_label(compare: VLM) -> str:
    """How the second model is named in reports: its LLM file, plus its projector where it has one."""
    mmproj = getattr(compare, "mmproj_path", None)
    return f"{compare.model_path} + {mmproj}" if mmproj else str(compare.model_path)


def _metrics(config: EvalConfig, records: list[dict[str, Any]]) -> tuple[EvalMetrics, EvalMetrics | None]:
    """The answers' metrics, and the direct answers' (``direct_too``)."""
    try:
        metrics = compute_metrics([outcome(r) for r in records], config.choices)
        direct = (compute_metrics([outcome(r, "direct_prediction") for r in records], config.choices)
                  if config.cot and config.direct_too else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{config.out / store.PREDICTIONS} has a record without {exc}; use --restart") from None
    return metrics, direct


def _finish(config: EvalConfig, compare: VLM | None, records: list[dict[str, Any]], before: int,
            errors: list[ItemError], wall_s: float, remaining: int,
            reference: dict[str, Any] | None = None) -> EvalSummary:
    """Write metrics.json, the pictures and errors.jsonl for every prediction so far."""
    out = config.out
    metrics, direct = _metrics(config, records)
    compared = compare_metrics(compare_label(compare), records) if compare is not None else None
    data = {**metrics.to_json(), **direct_json(direct), "errors": len(errors), "remaining": remaining,
            "run": {"new": len(records) - before, "before": before, "wall_s": wall_s,
                    "items_per_s": (len(records) - before) / wall_s if wall_s > 0 else 0.0},
            "compare": compared.to_json() if compared else None, "reference": reference}
    store.write_metrics(out / store.METRICS, data)
    store.write_errors(out / store.ERRORS, [e.__dict__ for e in errors])
    files = [out / store.PREDICTIONS, out / store.METRICS]
    if records:
        files += [save_confusion(metrics, out / store.CONFUSION), save_f1(metrics, out / store.F1_CHART)]
    return EvalSummary(out=out, metrics=metrics, compare=compared, new=len(records) - before, before=before,
                       errors=tuple(errors), wall_s=wall_s, remaining=remaining, files=tuple(files), direct=direct,
                       reference=reference)
