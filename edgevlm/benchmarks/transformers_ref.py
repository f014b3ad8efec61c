"""``edgevlm bench --reference transformers``: the first turn through transformers, same image, prompt, threads.

The Hugging Face checkpoint the GGUF pair was converted from (``--hf PATH``,
else the ``hf`` folder next to the model: ``examples/make_bench_model.py
--keep-checkpoint`` keeps the bench model's in ``OUT/hf``) is loaded with transformers in float32 and in bfloat16, and the
same question about the same image is answered with one greedy token, in
rounds interleaved with edgevlm's own first turn (empty caches). Time to
first token counts what edgevlm's counts: from the call (image loading,
chat template, processor) to the first sampled token. Each dtype's first
call is reported apart; the medians of ``repeats`` rounds after it. torch and
transformers are needed only for this option.

:func:`transformers_items` serves ``edgevlm eval --reference transformers``
(see :mod:`edgevlm.evaluate.reference`): a short greedy answer per item, for
items/s.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from edgevlm.api import VLM
from edgevlm.errors import InvalidRequestError, UnsupportedModelError


def _load(checkpoint: Path, dtype: Any) -> tuple[Any, Any]:
    try:
        import transformers
    except ImportError as exc:
        raise UnsupportedModelError("--reference transformers needs torch and transformers "
                                    "(pip install -e '.[test]')") from exc
    import json

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # the bench's output stays the report
    config = json.loads((checkpoint / "config.json").read_text())
    arch = (config.get("architectures") or [""])[0]
    model_cls = getattr(transformers, arch, None)
    if model_cls is None:
        raise UnsupportedModelError(f"transformers has no {arch!r} to run {checkpoint} as the reference")
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    return model_cls.from_pretrained(checkpoint, dtype=dtype).eval(), processor


def _checkpoint_folder(checkpoint: str | Path) -> Path:
    """The ``--hf`` folder.

    Raises:
        InvalidRequestError: not a Hugging Face checkpoint folder.
    """
    folder = Path(checkpoint).expanduser()
    if not (folder / "config.json").is_file():
        raise InvalidRequestError(f"--hf {folder}: not a Hugging Face checkpoint folder (no config.json)")
    return folder


def _first_token_ms(model: Any, processor: Any, image: str, question: str) -> float:
    import torch
    from PIL import Image

    t0 = time.perf_counter()
    with Image.open(image) as img:
        picture = img.convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[picture], return_tensors="pt")
    inputs = {k: (v.to(model.dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return (time.perf_counter() - t0) * 1e3


def find_checkpoint(model: str | Path | None, hf: str | Path | None) -> Path | None:
    """The checkpoint to compare with: ``hf`` if given, else the ``hf`` folder kept next to the model
    (``examples/make_bench_model.py --keep-checkpoint`` keeps it in ``OUT/hf``), else None."""
    if hf is not None:
        return Path(hf).expanduser()
    if model is None:
        return None
    folder = Path(model).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    kept = folder / "hf"
    return kept if (kept / "config.json").is_file() else None


def edgevlm_first_turn_ms(vlm: VLM, image: str, question: str) -> float:
    """edgevlm's first-turn TTFT (ms) with empty caches (nothing reused), one greedy token as transformers."""
    from edgevlm.benchmarks.probe import image_question, timed_turn

    with vlm.isolated_caches():
        return float(timed_turn(vlm, image_question(image, question), 1)["ttft_ms"])


def edgevlm_prepared_turn_ms(vlm: VLM, image: str, question: str) -> tuple[float, float]:
    """The first turn as ``edgevlm chat --image`` runs it, with empty caches: the image prepared
    (:meth:`edgevlm.VLM.prepare`) when it is attached, then the question.

    Returns:
        (the preparation's ms, done while the user types; the question's TTFT ms, what they wait).
    """
    from edgevlm.benchmarks.probe import image_question, timed_turn

    messages = image_question(image, question)
    with vlm.isolated_caches():
        started = time.perf_counter()
        vlm.prepare([{"role": "user", "content": messages[-1]["content"][:1]}])
        prepared = (time.perf_counter() - started) * 1e3
        return prepared, float(timed_turn(vlm, messages, 1)["ttft_ms"])


def transformers_first_turn(checkpoint: str | Path, image: str, question: str, threads: int,
                            repeats: int = 2, vlm: VLM | None = None) -> dict[str, float]:
    """First-turn TTFT of transformers f32 and bf16 (ms), interleaved with edgevlm's when ``vlm`` is given.

    Both dtypes stay loaded; each is called once first (``..._ttft_first_ms``: the first call of that
    model in the process), then each round runs edgevlm (cold caches), f32 and bf16 in turn, so that
    background load hits all alike; ``..._ttft_ms`` are the medians of ``repeats`` rounds, and
    ``edgevlm_vs_transformers_{f32,bf16}`` edgevlm's median over theirs (below 1: edgevlm is faster).
    ``edgevlm_prepare_ms`` / ``edgevlm_prepared_ttft_ms`` split edgevlm's first turn as ``chat --image``
    runs it (see :func:`edgevlm_prepared_turn_ms`): the work done while the question is typed, and the
    wait after it is sent.

    Raises:
        InvalidRequestError: no checkpoint folder.
        UnsupportedModelError: torch / transformers missing, or an architecture they lack.
    """
    folder = _checkpoint_folder(checkpoint)
    import torch

    torch.set_num_threads(threads)
    models = {label: _load(folder, dtype) for label, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16))}
    out: dict[str, float] = {}
    for label, (model, processor) in models.items():
        out[f"transformers_{label}_ttft_first_ms"] = round(_first_token_ms(model, processor, image, question), 1)
    times: dict[str, list[float]] = {label: [] for label in ("edgevlm", "prepare", "prepared", *models)}
    for _ in range(max(1, repeats)):
        if vlm is not None:
            times["edgevlm"].append(edgevlm_first_turn_ms(vlm, image, question))
            prepare_ms, prepared_ms = edgevlm_prepared_turn_ms(vlm, image, question)
            times["prepare"].append(prepare_ms)
            times["prepared"].append(prepared_ms)
        for label, (model, processor) in models.items():
            times[label].append(_first_token_ms(model, processor, image, question))
    for label in models:
        out[f"transformers_{label}_ttft_ms"] = round(statistics.median(times[label]), 1)
    if times["edgevlm"]:
        mine = statistics.median(times["edgevlm"])
        out["edgevlm_ttft_ms"] = round(mine, 1)
        for label in models:
            out[f"edgevlm_vs_transformers_{label}"] = round(mine / out[f"transformers_{label}_ttft_ms"], 2)
        out["edgevlm_prepare_ms"] = round(statistics.median(times["prepare"]), 1)
        out["edgevlm_prepared_ttft_ms"] = round(statistics.median(times["prepared"]), 1)
    return out


def _hf_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """edgevlm's messages in the processor's form: every content a list, images as ``{"type": "image"}``."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({"role": message["role"], "content": [
            {"type": "image"} if part.get("type") == "image" else part for part in content]})
    return out


def _generate_answer(model: Any, processor: Any, image: str, messages: list[dict[str, Any]],
                     max_new_tokens: int) -> str:
    import torch
    from PIL import Image

    with Image.open(image) as img:
        picture = img.convert("RGB")
    text = processor.apply_chat_template(_hf_messages(messages), add_generation_prompt=True)
    inputs = processor(text=text, images=[picture], return_tensors="pt")
    inputs = {k: (v.to(model.dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return str(processor.tokenizer.decode(new, skip_special_tokens=True)).strip()


def transformers_items(checkpoint: str | Path, requests: list[tuple[str, list[dict[str, Any]]]],
                       choices: tuple[str, ...], threads: int) -> dict[str, Any]:
    """Greedy ``generate`` of a short answer for each (image, messages) in transformers float32.

    At most as many new tokens as the longest choice takes after a space. The
    first request is run once more first to warm up (not counted).

    Returns:
        ``engine``, ``dtype``, ``method``, ``max_new_tokens``, ``items``, ``seconds``,
        ``items_per_s`` and the ``answers`` (text, stripped).

    Raises:
        InvalidRequestError: no checkpoint folder or no requests.
        UnsupportedModelError: torch / transformers missing, or an architecture they lack.
    """
    folder = _checkpoint_folder(checkpoint)
    if not requests:
        raise InvalidRequestError("the transformers reference has no items to run")
    import torch

    torch.set_num_threads(threads)
    model, processor = _load(folder, torch.float32)
    tokenizer = processor.tokenizer
    max_new = max(len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in choices)
    _generate_answer(model, processor, *requests[0], max_new)
    t0 = time.perf_counter()
    answers = [_generate_answer(model, processor, image, messages, max_new) for image, messages in requests]
    seconds = time.perf_counter() - t0
    return {"engine": "transformers", "dtype": "float32", "method": "generate", "max_new_tokens": max_new,
            "items": len(requests), "seconds": seconds, "items_per_s": len(requests) / seconds if seconds else 0.0,
            "answers": answers}
