"""``edgevlm bench --compare llama-cpp-python``: the same workloads through llama-cpp-python.

In the same process, on the same GGUF pair, with the same threads, context
size, batch size and flash-attention setting, greedy decoding and the same
``max_tokens``, edgevlm and llama-cpp-python's own multimodal chat handler
(``MTMDChatHandler``, which renders the GGUF's chat template like edgevlm;
``Llava15ChatHandler`` where it is missing) run:

* **conversation**: two turns about one image; time to first token of each;
* **batch**: N different images, each asked one question after a fixed
  instruction prefix of about ``prefix_tokens`` tokens; total time;
* **restart** (edgevlm only): a new process asking a new question about an
  image that an earlier process asked about, against that earlier, cold
  process (both in fresh processes sharing one temporary cache directory).

Ratios are peer / edgevlm (above 1: edgevlm is faster) and cold / restart.
Both engines are warmed up first (one request with another image) so that
one-time costs (graph allocation, page faults of the weights) are not
counted, and their requests are interleaved (edgevlm, peer, edgevlm, ...)
so that background load on a shared machine hits both alike; the restart
figures are the best of two rounds. The peer clears its KV cache and re-encodes every image at each
call; edgevlm reuses its KV prefix, parked states, embeddings and snapshots.
"""

from __future__ import annotations

import base64
import mimetypes
import tempfile
import time
from pathlib import Path
from typing import Any

from edgevlm.api import VLM
from edgevlm.benchmarks.conversation import follow
from edgevlm.benchmarks.probe import image_question, run_probe, timed_turn

#: Sentences the batch's instruction prefix is made of (repeated to length).
INSTRUCTIONS = (
    "You are a careful cataloguing assistant for a museum archive.",
    "For every image, describe the main subject, the setting and the colours in one plain sentence.",
    "Do not guess names, dates or places that the image does not show.",
    "Mention text visible in the image only when it is clearly legible.",
    "Use neutral words, no opinions, and keep the answer under thirty words.",
    "If the image is blurred, dark or empty, say so instead of describing it.",
)


def run_compare(vlm: VLM, spec: dict[str, Any], *, image: str | None, prompt: str, follow_up: str,
                max_tokens: int, batch_size: int = 20, prefix_tokens: int = 200,
                restart_rounds: int = 2) -> dict[str, Any]:
    """Run the three workloads; returns the comparison report.

    Args:
        vlm: the loaded edgevlm model.
        spec: how a probe process loads it (``edgevlm.benchmarks.conversation.probe_spec``).
        image: the conversation's image (None: a generated one).
        prompt, follow_up: the conversation's questions.
        max_tokens: reply length limit for every request, on both sides.
        batch_size: images in the batch workload.
        prefix_tokens: approximate length of the batch's instruction prefix.
        restart_rounds: cold/restart process pairs; the best time of each is reported.
    """
    peer, handler = load_peer(vlm)
    with tempfile.TemporaryDirectory(prefix="edgevlm-compare-") as tmp:
        images = make_images(batch_size + 2, Path(tmp))
        image = image or images[-1]
        warm = image_question(images[-2], "Warm up.")
        with vlm.isolated_caches():
            timed_turn(vlm, warm, 1)
        peer_turn(peer, warm, 1)
        report: dict[str, Any] = {"peer": f"llama-cpp-python {_version()} ({handler})",
                                  "threads": vlm.settings.n_threads,
                                  "n_ctx": vlm.n_ctx, "max_tokens": max_tokens}
        report["conversation"] = _compare_conversation(vlm, peer, image, prompt, follow_up, max_tokens)
        prefix = instruction_prefix(vlm, prefix_tokens)
        report["batch"] = _compare_batch(vlm, peer, images[:batch_size], prefix, max_tokens)
        report["restart"] = _restart_vs_cold(dict(spec, image=image, max_tokens=max_tokens),
                                             prompt, follow_up, Path(tmp) / "cache", restart_rounds)
    return report


def guard_peer_amx() -> bool:
    """Where the AMX guard is on, make llama-cpp-python load weights without extra buffer types, as edgevlm does.

    Its ``Llama`` has no such option, and quantised weights in ggml's AMX buffer type
    crash the pinned llama.cpp (SIGILL/SIGSEGV) on these CPUs; the peer gets the same
    guard as edgevlm (README "Builds"), so the comparison stays like for like.

    Returns:
        Whether the guard was applied.
    """
    from edgevlm.amx_guard import amx_guard_active

    if not amx_guard_active():
        return False
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params
    if getattr(original, "edgevlm_amx_guard", False):
        return True

    def guarded() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    guarded.edgevlm_amx_guard = True  # type: ignore[attr-defined]
    lib.llama_model_default_params = guarded
    return True


def load_peer(vlm: VLM) -> tuple[Any, str]:
    """llama-cpp-python's Llama + multimodal chat handler on vlm's files and settings."""
    from llama_cpp import Llama, llama_chat_format

    guard_peer_amx()

    handler_cls = getattr(llama_chat_format, "MTMDChatHandler", None)
    run = vlm.settings
    on_gpu = run.n_gpu_layers != 0
    if handler_cls is not None:
        handler = handler_cls(clip_model_path=str(vlm.mmproj_path), verbose=False, use_gpu=on_gpu)
    else:  # pragma: no cover - older llama-cpp-python
        handler_cls = llama_chat_format.Llava15ChatHandler
        handler = handler_cls(clip_model_path=str(vlm.mmproj_path), verbose=False)
    llm = Llama(model_path=str(vlm.model_path), chat_handler=handler, n_ctx=run.n_ctx,
                n_batch=run.n_batch, n_ubatch=run.n_batch, n_threads=run.n_threads,
                n_threads_batch=run.n_threads_batch, n_gpu_layers=run.n_gpu_layers,
                flash_attn=run.flash_attn == 1, seed=0, verbose=False)
    return llm, handler_cls.__name__


def peer_turn(llm: Any, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """One greedy streamed reply from the peer: text, ttft_ms (first chunk), total_ms."""
    t0 = time.perf_counter()
    first, pieces = None, []
    for chunk in llm.create_chat_completion(messages=to_peer_messages(messages), max_tokens=max_tokens,
                                            temperature=0.0, repeat_penalty=1.0, stream=True):
        first = first or time.perf_counter()
        pieces.append(chunk["choices"][0]["delta"].get("content") or "")
    end = time.perf_counter()
    return {"text": "".join(pieces).strip(), "ttft_ms": ((first or end) - t0) * 1e3,
            "total_ms": (end - t0) * 1e3, "positions_after": llm.n_tokens}


def to_peer_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """edgevlm messages -> llama-cpp-python's: image paths become data URLs, text becomes parts.

    The peer hands messages to the GGUF template as they are; llava-hf's
    template renders only part lists and would silently drop string contents
    (the system prompt, earlier turns), which edgevlm's renderer handles.
    """
    out = []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        out.append({**message, "content": [
            {"type": "image_url", "image_url": {"url": _data_url(part["image"])}}
            if part.get("type") == "image" else part for part in parts]})
    return out


def _data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _compare_conversation(vlm: VLM, peer: Any, image: str, prompt: str, follow_up: str,
                          max_tokens: int) -> dict[str, Any]:
    """Both engines' turns interleaved (ours, peer, ours, peer): background load hits both alike."""
    first = image_question(image, prompt)
    with vlm.isolated_caches():
        ours, theirs = [timed_turn(vlm, first, max_tokens)], [peer_turn(peer, first, max_tokens)]
        ours.append(timed_turn(vlm, follow(first, ours[0]["text"], follow_up), max_tokens))
        theirs.append(peer_turn(peer, follow(first, theirs[0]["text"], follow_up), max_tokens))
    report: dict[str, Any] = {}
    for turn in (1, 2):
        a, b = ours[turn - 1], theirs[turn - 1]
        report[f"turn{turn}_ttft_ms"] = {"edgevlm": round(a["ttft_ms"], 1), "peer": round(b["ttft_ms"], 1),
                                         "ratio": round(b["ttft_ms"] / a["ttft_ms"], 2)}
    # same prompts: positions in the KV cache after turn 1 (prompt + reply), each engine
    report["turn1_positions_after"] = {"edgevlm": ours[0]["prompt_positions"] + ours[0]["completion_tokens"],
                                       "peer": theirs[0]["positions_after"]}
    report["edgevlm_turn2_evaluated_positions"] = ours[1]["evaluated_positions"]
    report["edgevlm_turn2_reused_positions"] = ours[1]["reused_positions"]
    report["edgevlm_turn2_images_encoded"] = ours[1]["images_encoded"]
    return report


def _compare_batch(vlm: VLM, peer: Any, images: list[str], prefix: str,
                   max_tokens: int) -> dict[str, Any]:
    """Each image asked of edgevlm, then of the peer; each engine's times are summed."""
    turns, ours_ms, theirs_ms = [], 0.0, 0.0
    with vlm.isolated_caches():
        for img in images:
            messages = image_question(img, "Describe this image.", prefix)
            t0 = time.perf_counter()
            turns.append(timed_turn(vlm, messages, max_tokens))
            t1 = time.perf_counter()
            peer_turn(peer, messages, max_tokens)
            ours_ms, theirs_ms = ours_ms + (t1 - t0) * 1e3, theirs_ms + (time.perf_counter() - t1) * 1e3
    return {"images": len(images), "prefix_tokens": len(vlm.tokenize(prefix)),
            "prompt_positions": turns[0]["prompt_positions"],
            "edgevlm_total_ms": round(ours_ms, 1), "peer_total_ms": round(theirs_ms, 1),
            "ratio": round(theirs_ms / ours_ms, 2),
            "edgevlm_reused_positions": sum(t["reused_positions"] for t in turns),
            "edgevlm_evaluated_positions": sum(t["evaluated_positions"] for t in turns),
            "edgevlm_snapshots_saved": sum(t["snapshots_saved"] for t in turns)}


def _restart_vs_cold(spec: dict[str, Any], prompt: str, follow_up: str, cache: Path,
                     rounds: int = 2) -> dict[str, Any]:
    """``rounds`` pairs of probes (cold, then restart) on fresh cache directories; best of each."""
    pairs = []
    for i in range(rounds):
        root = cache / f"round{i}"
        pairs.append((run_probe(dict(spec, question=prompt), root),
                      run_probe(dict(spec, question=follow_up), root)))
    cold = min((c for c, _ in pairs), key=lambda r: r["ttft_ms"])
    warm = min((w for _, w in pairs), key=lambda r: r["ttft_ms"])
    return {"cold_ttft_ms": round(cold["ttft_ms"], 1), "restart_ttft_ms": round(warm["ttft_ms"], 1),
            "ratio": round(cold["ttft_ms"] / warm["ttft_ms"], 2),
            "rounds_ttft_ms": [[round(c["ttft_ms"], 1), round(w["ttft_ms"], 1)] for c, w in pairs],
            "cold_load_ms": round(cold["load_ms"], 1), "restart_load_ms": round(warm["load_ms"], 1),
            "restart_snapshot_restored": warm["snapshot_restored"],
            "restart_snapshot_restore_ms": round(warm["restore_ms"], 1),
            "restart_images_encoded": warm["images_encoded"],
            "restart_evaluated_positions": warm["evaluated_positions"]}


def instruction_prefix(vlm: VLM, n_tokens: int) -> str:
    """Instruction sentences repeated until the model's tokenizer makes about ``n_tokens`` of them."""
    text, i = "", 0
    while len(vlm.tokenize(text)) < n_tokens:
        text = f"{text} {INSTRUCTIONS[i % len(INSTRUCTIONS)]}".strip()
        i += 1
    return text


def make_images(n: int, folder: Path) -> list[str]:
    """``n`` different deterministic 256x256 PNG images (gradients, noise and a shape)."""
    import numpy as np
    from PIL import Image, ImageDraw

    paths = []
    yy, xx = np.mgrid[0:256, 0:256]
    for i in range(n):
        rng = np.random.default_rng(i)
        rgb = np.stack([(xx * (i + 1)) % 256, (yy * (i + 2)) % 256, (xx + yy + 17 * i) % 256], axis=-1)
        img = Image.fromarray((rgb + rng.integers(0, 30, rgb.shape)).clip(0, 255).astype("uint8"))
        x, y = rng.integers(20, 160, 2)
        ImageDraw.Draw(img).ellipse((int(x), int(y), int(x) + 60, int(y) + 60),
                                    fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path = folder / f"bench-{i:02d}.png"
        img.save(path)
        paths.append(str(path))
    return paths


def _version() -> str:
    import llama_cpp

    return llama_cpp.__version__
