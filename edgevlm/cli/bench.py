"""``edgevlm bench``: load, encode, prefill, decode and follow-up timings as JSON."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from typing import Any

import click

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
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def bench(image: str | None, prompt: str, follow_up: str, max_tokens: int, as_json: bool,
          **params: Any) -> None:
    """Measure one two-turn conversation (greedy decoding)."""
    vlm = load_from_options(params)
    report = run_bench(vlm, image, prompt, follow_up, max_tokens)
    report["threads"] = params["n_threads"]
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key:28s} {value}")


def run_bench(vlm: Any, image: str | None, prompt: str, follow_up: str, max_tokens: int) -> dict[str, Any]:
    """Run the benchmark conversation on a loaded VLM; returns the report dict."""
    report: dict[str, Any] = {"model": str(vlm.model_path),
                              "mmproj": str(vlm.mmproj_path) if vlm.mmproj_path else None,
                              "machine": platform.machine(), "model_load_ms": round(vlm.load_ms, 1)}
    # Cold figures: no embedding cache (RAM or disk) during the measurement.
    store, vlm.engine.store = vlm.engine.store, None
    try:
        return _measure(vlm, report, image, prompt, follow_up, max_tokens)
    finally:
        vlm.engine.store = store


def _measure(vlm: Any, report: dict[str, Any], image: str | None, prompt: str, follow_up: str,
             max_tokens: int) -> dict[str, Any]:
    if image is not None:
        vlm.engine.embeddings = type(vlm.engine.embeddings)()
        t0 = time.perf_counter()
        emb = vlm.embed_image(image)
        report["image_encode_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        report["image_tokens"] = int(emb.shape[0])
        vlm.engine.embeddings = type(vlm.engine.embeddings)()
    vlm.reset()
    content: list[dict[str, Any]] = [{"type": "image", "image": image}] if image else []
    messages: list[dict[str, Any]] = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    first = _turn(vlm, messages, max_tokens)
    messages += [{"role": "assistant", "content": first.pop("text")},
                 {"role": "user", "content": follow_up}]
    second = _turn(vlm, messages, max_tokens)
    second.pop("text")
    prefill_s = max(first["prefill_ms"], 1e-6) / 1e3
    report.update(
        prompt_tokens=first["prompt_positions"],
        prefill_tokens_per_s=round(first["evaluated_positions"] / prefill_s, 1),
        time_to_first_token_ms=round(first["ttft_ms"], 1),
        decode_tokens_per_s=first["decode_tps"],
        generated_tokens=first["completion_tokens"],
        follow_up_prompt_tokens=second["prompt_positions"],
        follow_up_evaluated_tokens=second["evaluated_positions"],
        follow_up_time_to_first_token_ms=round(second["ttft_ms"], 1),
        follow_up_images_encoded=second["images_encoded"],
        peak_rss_mb=round(peak_rss_mb(), 1),
    )
    return report


def _turn(vlm: Any, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    text = "".join(vlm.stream(messages, max_tokens=max_tokens, temperature=0.0, stats=stats))
    pre = stats["prefill"]
    gen_ms = max(stats["total_ms"] - stats["ttft_ms"], 1e-6)
    return {"text": text, "ttft_ms": stats["ttft_ms"], "prompt_positions": pre.prompt_positions,
            "evaluated_positions": pre.evaluated_positions, "images_encoded": pre.images_encoded,
            "prefill_ms": pre.decode_ms + pre.encode_ms, "completion_tokens": stats["completion_tokens"],
            "decode_tps": round(max(stats["completion_tokens"] - 1, 0) / gen_ms * 1e3, 1)}
