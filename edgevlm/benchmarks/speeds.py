"""``edgevlm bench --reference transformers-speed``: prefill and decode tokens/s and image encode time
through transformers (f32 and bf16, same checkpoint, image, prompt and threads), and the decode's
memory-bandwidth bound for the GGUF pair being benchmarked.

transformers, per dtype (each figure the median of ``repeats`` after a warm-up):

* ``image_encode_ms``: the vision model + projector on the processor's pixels (for
  Llama-3.2-Vision: every tile, as the model's forward runs them);
* ``prefill_tokens_per_s``: the prompt's tokens / one forward over them given the projected image
  states (``cross_attention_states``: encode time excluded, cross-attention K/V included);
* ``decode_tokens_per_s``: ``(n - 1) / (t(n) - t(1))`` for greedy ``generate`` of ``n`` and 1 new
  tokens (``min_new_tokens`` forces the length).

The bound: bytes of weights one decoded token reads (every LLM tensor but the token embeddings;
families name what else a token skips, e.g. mllama's cross-attention K/V projections) plus the
image's cross-attention K/V, divided by the copy bandwidth of this machine (a numpy copy of a
1 GiB array, read + write bytes per second, best of 3).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Tensors a decoded token does not read: token embeddings (one row), image-only projections.
NOT_READ_PER_TOKEN = ("token_embd.", "cross_attn_k_proj.", "cross_attn_v_proj.")


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """GB/s (10^9) a numpy copy of an ``nbytes`` array moves (read + write), best of ``repeats``."""
    import numpy as np

    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def decode_bytes_per_token(llm_path: str | Path, extra: int = 0) -> int:
    """Bytes of LLM weights one decoded token reads (see the module docstring), plus ``extra``."""
    import math

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from edgevlm.gguf_info import read_header

    def nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        return math.prod(shape) // block * size

    header = read_header(Path(llm_path))
    return extra + sum(nbytes(t.shape, t.ggml_type) for t in header.tensors
                       if not any(part in t.name for part in NOT_READ_PER_TOKEN))


def _median_ms(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _inputs(processor: Any, model: Any, image: str, prompt: str) -> dict[str, Any]:
    from PIL import Image

    with Image.open(image) as img:
        picture = img.convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[picture], return_tensors="pt")
    return {k: (v.to(model.dtype) if v.is_floating_point() else v) for k, v in inputs.items()}


def _one_dtype(model: Any, inputs: dict[str, Any], new_tokens: int, repeats: int) -> dict[str, float]:
    import torch

    inner = model.model
    vision_args = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    text_args = {k: v for k, v in inputs.items() if k not in vision_args}

    def encode() -> Any:
        states = inner.vision_model(**vision_args).last_hidden_state
        return inner.multi_modal_projector(states).reshape(-1, states.shape[-2], inner.hidden_size)

    def generate(n: int) -> None:
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        encode_ms = _median_ms(encode, repeats)
        states = encode()
        prefill_ms = _median_ms(lambda: model(**text_args, cross_attention_states=states, use_cache=True), repeats)
        one, many = _median_ms(lambda: generate(1), repeats), _median_ms(lambda: generate(new_tokens), repeats)
    n_prompt = int(inputs["input_ids"].shape[1])
    return {"image_encode_ms": round(encode_ms, 1), "prompt_tokens": n_prompt,
            "prefill_tokens_per_s": round(n_prompt / (prefill_ms / 1e3), 1),
            "decode_tokens_per_s": round((new_tokens - 1) / max((many - one) / 1e3, 1e-9), 2)}


def transformers_speeds(checkpoint: str | Path, image: str, prompt: str, threads: int, new_tokens: int = 8,
                        repeats: int = 1) -> dict[str, dict[str, float]]:
    """``{"transformers_f32": {...}, "transformers_bf16": {...}}`` (see the module docstring).

    Raises:
        InvalidRequestError: no checkpoint folder.
        UnsupportedModelError: torch / transformers missing, or an architecture they lack.
    """
    import torch

    from edgevlm.benchmarks.transformers_ref import _checkpoint_folder, _load

    folder = _checkpoint_folder(checkpoint)
    torch.set_num_threads(threads)
    out = {}
    for label, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        model, processor = _load(folder, dtype)
        out[f"transformers_{label}"] = _one_dtype(model, _inputs(processor, model, image, prompt),
                                                  max(2, new_tokens), repeats)
        del model
    return out


def decode_bound(llm_path: str | Path, image_kv_bytes: int, measured_tps: float) -> dict[str, float]:
    """The decode's memory-bandwidth bound for this LLM file and what the measured rate reaches of it."""
    per_token = decode_bytes_per_token(llm_path, image_kv_bytes)
    bandwidth = copy_bandwidth_gbs()
    bound = bandwidth * 1e9 / per_token
    return {"decode_bytes_per_token": per_token, "copy_bandwidth_gbs": round(bandwidth, 2),
            "decode_bound_tokens_per_s": round(bound, 2),
            "decode_fraction_of_bound": round(measured_tps / bound, 3) if bound else 0.0}
