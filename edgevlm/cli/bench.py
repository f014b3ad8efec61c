"""``edgevlm bench``: load, encode, prefill, decode, follow-up and cache figures as JSON.

Everything is measured cold: the bench runs on a temporary cache directory
(the user's cache is neither read nor written) with empty in-memory caches.
Cache figures: what the follow-up reused, an estimate of the time that saved
(encode and prefill time avoided, at the rates measured in the first turn),
and a fresh process asking a new question about the same image (KV snapshot
restore). ``--compare llama-cpp-python`` adds the comparison of
:mod:`edgevlm.cli.bench_compare`.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from edgevlm.cli.bench_probe import LOAD_KEYS, image_question, run_probe, timed_turn
from edgevlm.cli.options import load_from_options, model_options


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


@click.command()
@model_options
@click.option("-i", "--image", "image", type=click.Path(), default=None, help="Image to use.")
@click.option("-p", "--prompt", default="Describe this image in one sentence.", show_default=True)
@click.option("--follow-up", default="What colours dominate?", show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--compare", type=click.Choice(["llama-cpp-python"]), default=None,
              help="Also run the workloads through llama-cpp-python's multimodal chat handler.")
@click.option("--batch-size", type=click.IntRange(min=1), default=20, show_default=True,
              help="With --compare: images in the batch workload.")
@click.option("--prefix-tokens", type=click.IntRange(min=1), default=200, show_default=True,
              help="With --compare: length of the batch's fixed instruction prefix.")
@click.option("--restart-rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --compare: cold/restart process pairs (the best of each is reported).")
@click.option("--encode-repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed image encodes after the first (image_encode_ms is their median).")
@click.option("--reference", type=click.Choice(["torch"]), default=None,
              help="Also time the projector's tower + MLP in PyTorch (f32 and bf16, same weights).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def bench(image: str | None, prompt: str, follow_up: str, max_tokens: int, compare: str | None,
          batch_size: int, prefix_tokens: int, restart_rounds: int, encode_repeats: int,
          reference: str | None, as_json: bool, **params: Any) -> None:
    """Measure one two-turn conversation (greedy decoding), cache effects, optionally a comparison."""
    vlm = load_from_options(params)
    spec = probe_spec(params)
    report = run_bench(vlm, image, prompt, follow_up, max_tokens, load_spec=spec,
                       encode_repeats=encode_repeats)
    report["threads"] = params["n_threads"]
    if reference and image is not None:
        from edgevlm.cli.bench_vision import reference_pixels, torch_reference_times

        report.update(torch_reference_times(vlm.mmproj_path, reference_pixels(vlm.mmproj_path, image),
                                            vlm.engine.ctx.options.threads()[1], encode_repeats))
    if compare:
        from edgevlm.cli.bench_compare import run_compare

        report["compare"] = run_compare(vlm, spec, image=image, prompt=prompt, follow_up=follow_up,
                                        max_tokens=max_tokens, batch_size=batch_size,
                                        prefix_tokens=prefix_tokens, restart_rounds=restart_rounds)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key:36s} {value}")


def probe_spec(params: dict[str, Any]) -> dict[str, Any]:
    """What a probe process needs to load the same model the same way."""
    options = dict(params, cache=not params["no_cache"])
    return {"model": params["model"], **{k: options[k] for k in LOAD_KEYS if k in options}}


@contextmanager
def cold_caches(vlm: Any) -> Iterator[Path]:
    """Run with empty caches on a temporary cache directory; yields that directory.

    The VLM's disk stores (if enabled) are swapped for ones under the temporary
    directory, its in-memory caches emptied; all is put back afterwards.
    """
    from edgevlm.cache import EmbeddingStore
    from edgevlm.snapshots import SnapshotStore

    engine = vlm.engine
    store, snapshots, ram = engine.store, engine.snapshots, engine.embeddings
    with tempfile.TemporaryDirectory(prefix="edgevlm-bench-") as tmp:
        root = Path(tmp)
        engine.store = EmbeddingStore(root) if store is not None else None
        engine.snapshots = SnapshotStore(snapshots.identity, root) if snapshots is not None else None
        engine.embeddings = type(ram)(ram.max_bytes)
        vlm.reset()
        try:
            yield root
        finally:
            engine.store, engine.snapshots, engine.embeddings = store, snapshots, ram
            vlm.reset()


def run_bench(vlm: Any, image: str | None, prompt: str, follow_up: str, max_tokens: int,
              load_spec: dict[str, Any] | None = None, encode_repeats: int = 3) -> dict[str, Any]:
    """Run the benchmark conversation on a loaded VLM; returns the report dict.

    Args:
        vlm: the loaded model.
        image: image path (None: text only).
        prompt, follow_up: the two questions.
        max_tokens: reply length limit.
        load_spec: how to load the model in a probe process (:func:`probe_spec`);
            with an image and caching on, a fresh process then asks the
            follow-up about the same image and its figures are reported.
    """
    report: dict[str, Any] = {"model": str(vlm.model_path),
                              "mmproj": str(vlm.mmproj_path) if vlm.mmproj_path else None,
                              "machine": platform.machine(), "model_load_ms": round(vlm.load_ms, 1)}
    if image is not None:
        with cold_caches(vlm):
            from edgevlm.cli.bench_vision import time_encoder

            t0 = time.perf_counter()
            emb = vlm.embed_image(image)
            report["image_encode_first_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
            report["image_tokens"] = int(emb.shape[0])
            report["vision_engine"] = vlm.vision_engine
            report["image_encode_ms"] = time_encoder(vlm, image, encode_repeats)
    with cold_caches(vlm) as root:
        first, second = conversation(vlm, image, prompt, follow_up, max_tokens)
        report.update(_conversation_report(first, second))
        if load_spec is not None and image is not None and vlm.engine.snapshots is not None:
            # a new process, same image, new question: restores what the first turn saved
            spec = dict(load_spec, image=image, question=follow_up, max_tokens=max_tokens)
            report.update(restart_report(run_probe(spec, root), first))
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return report


def conversation(vlm: Any, image: str | None, prompt: str, follow_up: str,
                 max_tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two timed turns: ``prompt`` (about ``image``), then ``follow_up`` after the reply."""
    messages = image_question(image, prompt) if image else [{"role": "user", "content": prompt}]
    first = timed_turn(vlm, messages, max_tokens)
    return first, timed_turn(vlm, follow(messages, first["text"], follow_up), max_tokens)


def follow(messages: list[dict[str, Any]], reply: str, question: str) -> list[dict[str, Any]]:
    """The conversation with the assistant's ``reply`` and a new user ``question`` appended."""
    return messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": question}]


def _conversation_report(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    prefill_s = max(first["decode_ms"] + first["encode_ms"], 1e-6) / 1e3
    return {
        "prompt_tokens": first["prompt_positions"],
        "prefill_tokens_per_s": round(first["evaluated_positions"] / prefill_s, 1),
        "time_to_first_token_ms": round(first["ttft_ms"], 1),
        "decode_tokens_per_s": first["decode_tps"],
        "generated_tokens": first["completion_tokens"],
        "follow_up_prompt_tokens": second["prompt_positions"],
        "follow_up_evaluated_tokens": second["evaluated_positions"],
        "follow_up_reused_positions": second["reused_positions"],
        "follow_up_time_to_first_token_ms": round(second["ttft_ms"], 1),
        "follow_up_images_encoded": second["images_encoded"],
        "follow_up_images_from_cache": second["images_from_cache"],
        "follow_up_saved_ms_estimate": round(saved_ms(second, first), 1),
    }


def restart_report(restart: dict[str, Any], cold: dict[str, Any]) -> dict[str, Any]:
    """Figures of a fresh process asking about an image an earlier process cached."""
    return {
        "restart_load_ms": round(restart["load_ms"], 1),
        "restart_time_to_first_token_ms": round(restart["ttft_ms"], 1),
        "restart_snapshot_restored": restart["snapshot_restored"],
        "restart_snapshot_restore_ms": round(restart["restore_ms"], 1),
        "restart_reused_positions": restart["reused_positions"],
        "restart_images_encoded": restart["images_encoded"],
        "restart_saved_ms_estimate": round(saved_ms(restart, cold), 1),
    }


def saved_ms(turn: dict[str, Any], cold: dict[str, Any]) -> float:
    """Encode and prefill time ``turn`` avoided, at the rates of the ``cold`` turn.

    ``cold`` encoded every image of the conversation; the images ``turn`` did
    not encode count at the cold encode time per image, its reused positions
    at the cold prefill time per position.
    """
    per_image = cold["encode_ms"] / cold["images_encoded"] if cold["images_encoded"] else 0.0
    per_pos = cold["decode_ms"] / cold["evaluated_positions"] if cold["evaluated_positions"] else 0.0
    images_avoided = max(cold["images_encoded"] - turn["images_encoded"], 0)
    return images_avoided * per_image + turn["reused_positions"] * per_pos
