"""``edgevlm eval``: a labelled image set through a model: predictions, metrics, pictures; resumable."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from edgevlm.cli.options import load_from_options, load_kwargs, model_options
from edgevlm.errors import DataError, InvalidRequestError
from edgevlm.evaluate import EvalConfig, EvalSummary, load_choices, run_eval
from edgevlm.evaluate.reference import DEFAULT_LIMIT, Reference, check_reference
from edgevlm.evaluate.prompts import DEFAULT_PROMPT
from edgevlm.evaluate.runner import METHODS, check_data


@click.command(name="eval")
@model_options
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="Items CSV: columns image (relative to the CSV), label, any others usable as {column}.")
@click.option("--choices", "choices_file", required=True, type=click.Path(dir_okay=False),
              help="Text file with one choice a line (every label must be one).")
@click.option("-p", "--prompt", default=DEFAULT_PROMPT, show_default=True,
              help="Template: {choices} and {column}; the shared part is evaluated once.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumable).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--limit", type=int, default=None, help="Only the first N items (N >= 1).")
@click.option("--cot", is_flag=True, help="Reason freely first, then score the answer over the reasoning.")
@click.option("--direct-too", is_flag=True,
              help="With --cot: also score each item's direct answer (no reasoning); reports both accuracies.")
@click.option("--cot-tokens", type=click.IntRange(min=1, max=4096), default=256, show_default=True,
              help="Most tokens of reasoning per item (--cot).")
@click.option("--method", type=click.Choice(METHODS), default="score", show_default=True,
              help="score: the most probable choice; grammar: greedy decoding constrained to the choices.")
@click.option("--compare", "compare_model", default=None,
              help="A second variant of the model (e.g. a Q4_K_M GGUF): KL and agreement at the answer.")
@click.option("--compare-mmproj", type=click.Path(dir_okay=False), default=None,
              help="The second variant's projector (e.g. q8_0 vs f16); without --compare, with --model's LLM.")
@click.option("--reference", type=click.Choice(["transformers"]), default=None,
              help="transformers: also run the first items through transformers generate (needs --hf); "
                   "items/s side by side.")
@click.option("--hf", "hf_checkpoint", type=click.Path(file_okay=False), default=None,
              help="With --reference transformers: the Hugging Face checkpoint the GGUF pair came from.")
@click.option("--reference-limit", type=int, default=DEFAULT_LIMIT, show_default=True,
              help="Items run through transformers (the first ones edgevlm answered).")
@click.option("--restart", is_flag=True, help="Delete the run folder's earlier results and start over.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def eval_(data: str, choices_file: str, prompt: str, out: str, system: str | None, limit: int | None, cot: bool,
          direct_too: bool, cot_tokens: int, method: str, compare_model: str | None, compare_mmproj: str | None,
          reference: str | None, hf_checkpoint: str | None, reference_limit: int, restart: bool, as_json: bool,
          **params: Any) -> None:
    """Evaluate a labelled image set: accuracy, macro-F1, per-class scores, a confusion matrix."""
    config = EvalConfig(data=Path(data), choices=load_choices(choices_file), out=Path(out), prompt=prompt,
                        system=system, limit=limit, cot=cot, cot_tokens=cot_tokens, direct_too=direct_too,
                        image_tokens=params.get("max_image_tokens"), method=method, restart=restart)
    comparing = bool(compare_model or compare_mmproj)
    ref = _reference(reference, hf_checkpoint, reference_limit, params)
    # bad settings, rows or prompt are refused before a model is loaded
    check_data(config, compare=comparing, reference=ref is not None)
    vlm = load_from_options(params)
    if ref is not None and not params.get("n_threads"):
        ref = replace(ref, threads=vlm.settings.n_threads_batch)  # the threads edgevlm runs with
    compare = _load_compare(compare_model, compare_mmproj, params) if comparing else None
    bar = _Progress()
    try:
        with _stop_on_sigint() as stop:
            summary = run_eval(vlm, config, compare=compare, reference=ref, on_item=bar.update,
                               on_start=bar.start, should_stop=stop.is_set)
    except KeyboardInterrupt:
        bar.close()
        click.echo(f"edgevlm: interrupted; {out} keeps every finished item: run the same command to resume",
                   err=True)
        sys.exit(130)
    bar.close()
    click.echo(json.dumps(summary.to_json(), indent=2) if as_json else describe(summary))
    if summary.errors:
        shown = "; ".join(e.message for e in summary.errors[:3])
        more = f" (and {len(summary.errors) - 3} more)" if len(summary.errors) > 3 else ""
        raise DataError(f"{len(summary.errors)} item(s) could not be evaluated: {shown}{more}; see "
                        f"{Path(out) / 'errors.jsonl'}; the other items' results are kept")


def _reference(reference: str | None, hf_checkpoint: str | None, limit: int,
               params: dict[str, Any]) -> Reference | None:
    """The transformers reference asked for, checked (before any model is loaded)."""
    if reference is None:
        if hf_checkpoint is not None:
            raise InvalidRequestError("--hf is the checkpoint for --reference transformers: add that option")
        return None
    if hf_checkpoint is None:
        raise InvalidRequestError("--reference transformers needs the checkpoint folder: --hf PATH")
    ref = Reference(checkpoint=Path(hf_checkpoint), limit=limit, threads=int(params.get("n_threads") or 1))
    check_reference(ref)
    return ref


def _load_compare(compare_model: str | None, compare_mmproj: str | None, params: dict[str, Any]) -> Any:
    """The second model: ``--compare`` (or ``--model``'s LLM) with ``--compare-mmproj`` (or its own projector)."""
    import edgevlm

    kwargs = {**load_kwargs(params), "mmproj": compare_mmproj, "quant": None}
    return edgevlm.load(compare_model or params["model"], **kwargs)


@contextmanager
def _stop_on_sigint() -> Iterator[threading.Event]:
    """Ctrl-C sets the yielded flag (the run stops after the item in progress); a second one interrupts at once.

    A flag, because a KeyboardInterrupt raised while llama.cpp calls back into
    Python (its log callback) is dropped by ctypes.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class _Progress:
    """A tqdm bar with ETA on a terminal; nothing when stderr is piped."""

    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, todo: int, before: int) -> None:
        if not sys.stderr.isatty() or not todo:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=todo, unit="item", file=sys.stderr, desc="eval",
                        postfix={"done before": before} if before else None)

    def update(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def describe(summary: EvalSummary) -> str:
    """The few lines printed at the end of a run."""
    m = summary.metrics
    tokens = m.tokens
    share = tokens.reused / tokens.prompt if tokens.prompt else 0.0
    mode = " (CoT)" if summary.direct is not None else ""
    lines = [f"accuracy{mode} {m.accuracy:.3f} ({m.correct}/{m.items}), macro-F1 {m.macro_f1:.3f}, "
             f"malformed {m.malformed}"]
    if summary.direct is not None:
        d = summary.direct
        lines.append(f"accuracy (direct) {d.accuracy:.3f} ({d.correct}/{d.items}), macro-F1 {d.macro_f1:.3f}")
    lines += [f"{m.items} items ({summary.new} new, {summary.before} from earlier runs"
              + (f", {summary.remaining} left by --limit" if summary.remaining else "")
              + f"); {m.items_per_s:.2f} items/s",
              f"prompt positions: {tokens.evaluated} evaluated, {tokens.reused} reused ({share:.0%})"]
    worst = sorted((c for c in m.per_class if c.support), key=lambda c: c.f1)[:3]
    if worst:
        lines.append("lowest F1: " + ", ".join(f"{c.name} {c.f1:.2f} (n={c.support})" for c in worst))
    if summary.reference is not None:
        r = summary.reference
        lines.append(f"transformers generate ({r['dtype']}, first {r['items']} items): {r['items_per_s']:.2f} items/s "
                     f"vs edgevlm {r['edgevlm_items_per_s']:.2f} items/s on the same items ({r['speedup']:.1f}x); "
                     f"{r['answers_that_are_choices']}/{r['items']} of its answers are a choice")
    if summary.compare is not None:
        c = summary.compare
        lines.append(f"vs {c.model}: KL mean {c.mean_kl:.4g} / max {c.max_kl:.4g} nats, top-1 agreement "
                     f"{c.top1_agreement:.3f}, answer agreement {c.answer_agreement:.3f}, accuracy {c.accuracy:.3f}")
    lines.append("results: " + ", ".join(str(f) for f in summary.files))
    return "\n".join(lines)
