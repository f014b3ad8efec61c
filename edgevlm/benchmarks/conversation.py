"""The benchmark conversation: load, encode, prefill, decode, follow-up and cache figures.

Everything is measured cold: on a temporary cache directory (the user's
cache is neither read nor written) with empty in-memory caches
(:meth:`edgevlm.VLM.isolated_caches`). Cache figures: what the follow-up
reused, an estimate of the time that saved (encode and prefill time avoided,
at the rates measured in the first turn), and a fresh process asking a new
question about the same image (KV snapshot restore). Public API only.
"""

from __future__ import annotations

import platform
import resource
import sys
from typing import Any

from edgevlm.api import VLM
from edgevlm.benchmarks.probe import LOAD_KEYS, image_question, run_probe, timed_turn


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def probe_spec(model: str, load_options: dict[str, Any]) -> dict[str, Any]:
    """What a probe process needs to load the same model the same way."""
    return {"model": model, **{k: load_options[k] for k in LOAD_KEYS if k in load_options}}


def run_bench(vlm: VLM, image: str | None, prompt: str, follow_up: str, max_tokens: int,
              load_spec: dict[str, Any] | None = None, encode_repeats: int = 3,
              with_conversation: bool = True) -> dict[str, Any]:
    """Run the benchmark conversation on a loaded VLM; returns the report dict.

    The first request of the process and a second, different one are timed
    first (:mod:`edgevlm.benchmarks.first_request`), before the image figures'
    encodes warm anything up.

    Args:
        vlm: the loaded model (no request made yet).
        image: image path (None: text only).
        prompt, follow_up: the two questions.
        max_tokens: reply length limit.
        load_spec: how to load the model in a probe process (:func:`probe_spec`);
            with an image and caching on, a fresh process then asks the
            follow-up about the same image and its figures are reported.
        encode_repeats: timed encodes of the image (see
            :func:`edgevlm.benchmarks.budgets.image_figures`).
        with_conversation: False: the model and image figures only.
    """
    report: dict[str, Any] = {"model": str(vlm.model_path),
                              "mmproj": str(vlm.mmproj_path) if vlm.mmproj_path else None,
                              "family": vlm.family, "machine": platform.machine(),
                              "model_load_ms": round(vlm.load_ms, 1)}
    if with_conversation:  # before anything else touches the model: the process's true first request
        from edgevlm.benchmarks.first_request import first_and_second_request

        report.update(first_and_second_request(vlm, image, prompt, follow_up, max_tokens))
    if image is not None:
        from edgevlm.benchmarks.budgets import image_figures

        report["vision_engine"] = vlm.vision_engine
        report.update(image_figures(vlm, image, encode_repeats))
    if not with_conversation:
        report["peak_rss_mb"] = round(peak_rss_mb(), 1)
        return report
    with vlm.isolated_caches() as root:
        first, second = conversation(vlm, image, prompt, follow_up, max_tokens)
        report.update(_conversation_report(first, second))
        if load_spec is not None and image is not None and vlm.caching:
            # a new process, same image, new question: restores what the first turn saved
            spec = dict(load_spec, image=image, question=follow_up, max_tokens=max_tokens)
            report.update(restart_report(run_probe(spec, root), first))
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return report


def conversation(vlm: VLM, image: str | None, prompt: str, follow_up: str,
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
        "text_prefill_tokens_per_s": round(first["evaluated_positions"] / max(first["decode_ms"] / 1e3, 1e-6), 1),
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
