"""Timed turns for ``edgevlm bench``, in this process or in a fresh one.

A *probe* is a new Python process that loads the model, asks one question
about an image and prints its timings as JSON; running two probes with the
same cache directory measures "process restart, same image, new question"
against a cold run.

Run as ``python -m edgevlm.benchmarks.probe '<json spec>'``. Everything here
uses the public API only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgevlm.api import VLM, load
from edgevlm.errors import RuntimeFailure

#: The load() arguments a probe passes on.
LOAD_KEYS = ("mmproj", "n_ctx", "n_threads", "n_gpu_layers", "kv_type", "cache", "vision_engine",
             "vision_device", "max_image_tokens", "tiles")


def timed_turn(vlm: VLM, messages: list[dict[str, Any]], max_tokens: int,
               max_image_tokens: int | None = None) -> dict[str, Any]:
    """One greedy reply, timed from the call (prompt building included) to the first token.

    Args:
        vlm: an :class:`edgevlm.VLM`.
        messages: the conversation.
        max_tokens: reply length limit.
        max_image_tokens: the request's image-token budget (None: the load default).

    Returns:
        text, ttft_ms, total_ms, completion_tokens, decode_tps and the prefill
        figures (PrefillStats fields).
    """
    t0 = time.perf_counter()
    stream = vlm.stream(messages, max_tokens=max_tokens, temperature=0.0, max_image_tokens=max_image_tokens)
    reply = stream.reply()
    wall_ms = (time.perf_counter() - t0) * 1e3
    stats = stream.stats
    assert stats is not None  # reply() ran the stream to its end
    before_generate = wall_ms - stats.total_ms  # image loading, template, tokenisation
    gen_ms = max(stats.total_ms - stats.ttft_ms, 1e-6)
    return {"text": reply.text, "ttft_ms": before_generate + stats.ttft_ms, "total_ms": wall_ms,
            "completion_tokens": stats.completion_tokens,
            "decode_tps": round(max(stats.completion_tokens - 1, 0) / gen_ms * 1e3, 1),
            **dataclasses.asdict(stats.prefill)}


def image_question(image: str, question: str, system: str | None = None) -> list[dict[str, Any]]:
    """Messages: an optional system prompt, then one user turn with the image and the question."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": [{"type": "image", "image": image},
                                                    {"type": "text", "text": question}]}]


def run_probe(spec: dict[str, Any], cache_dir: Path, timeout: float = 600) -> dict[str, Any]:
    """Run a probe process with ``cache_dir`` as its edgevlm cache; returns its report.

    Args:
        spec: model, image, question, max_tokens, optional system and LOAD_KEYS.
        cache_dir: the cache directory the probe uses (kept between probes).
        timeout: seconds before the probe is killed.

    Raises:
        RuntimeFailure: the probe failed (its stderr tail is in the message).
    """
    env = dict(os.environ, EDGEVLM_CACHE_DIR=str(cache_dir))
    proc = subprocess.run([sys.executable, "-m", "edgevlm.benchmarks.probe", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeFailure(f"bench probe failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe(spec: dict[str, Any]) -> dict[str, Any]:
    vlm = load(spec["model"], **{k: spec[k] for k in LOAD_KEYS if k in spec})
    turn = timed_turn(vlm, image_question(spec["image"], spec["question"], spec.get("system")),
                      spec["max_tokens"])
    turn.pop("text")
    turn["load_ms"] = vlm.load_ms
    turn["encoder_calls"] = vlm.encoder_calls
    return turn


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    print(json.dumps(_probe(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
