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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm.api import VLM
from edgevlm.errors import InvalidRequestError, UnsupportedModelError


def _load(checkpoint: Path, dtype: Any) -> tuple[Any, Any]:
    """The checkpoint's model in ``dtype`` (eval mode) and its processor."""
    model_cls, processor = _model_class_and_processor(checkpoint)
    return model_cls.from_pretrained(checkpoint, dtype=dtype).eval(), processor


def _model_class_and_processor(checkpoint: Path) -> tuple[Any, Any]:
    """transformers' class for the checkpoint's architecture and its processor (loads no weights).

    Raises:
        UnsupportedModelError: transformers missing, an architecture it lacks, or a processor that
            needs a package not installed (Qwen2-VL's needs torchvision for its video processor).
    """
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
    try:
        return model_cls, transformers.AutoProcessor.from_pretrained(checkpoint)
    except ImportError as exc:
        first_sentence = " ".join(str(exc).split()).split(". ")[0].rstrip(".") or type(exc).__name__
        raise UnsupportedModelError(f"--reference transformers cannot load the processor of {checkpoint}: "
                                    f"{first_sentence}; install what it names (e.g. pip install torchvision)"
                                    ) from exc


def check_reference(checkpoint: str | Path) -> None:
    """Check, before anything is measured, that transformers can run ``checkpoint`` as the reference:
    the folder, transformers itself, the architecture and the processor (no weights are read).

    Raises:
        InvalidRequestError: not a Hugging Face checkpoint folder.
        UnsupportedModelError: as :func:`_model_class_and_processor`.
    """
    _model_class_and_processor(_checkpoint_folder(checkpoint))


def _checkpoint_folder(checkpoint: str | Path) -> Path:
    """The ``--hf`` folder.

    Raises:
        InvalidRequestError: not a Hugging Face checkpoint folder.
    """
    folder = Path(checkpoint).expanduser()
    if not (folder / "config.json").is_file():
        raise InvalidRequestError(f"--hf {folder}: not a Hugging Face checkpoint folder (no config.json)")
    return folder


#: The submodules that turn pixels into the LLM's image embeddings, by attribute name under the
#: model's ``model`` (source: transformers' modeling files: LLaVA / LLaVA-NeXT / InternVL
#: ``vision_tower`` + ``multi_modal_projector``, Qwen2-VL ``visual`` (its merger inside),
#: mllama ``vision_model`` + ``multi_modal_projector``).
IMAGE_MODULES = ("vision_tower", "vision_model", "visual", "multi_modal_projector")


@dataclass(frozen=True)
class FirstTurn:
    """One first turn: time to first token and the part of it spent turning the image into embeddings.

    Attributes:
        ttft_ms: from the call (image file, template, processor) to the first sampled token.
        image_ms: the vision tower and projector (edgevlm: the prefill's ``encode_ms``).
    """

    ttft_ms: float
    image_ms: float

    @property
    def prompt_ms(self) -> float:
        """The rest: mostly the LLM reading the prompt (template, tokeniser, preprocessing: a few ms)."""
        return self.ttft_ms - self.image_ms


@contextmanager
def _timed_image_modules(model: Any) -> Iterator[list[float]]:
    """Seconds spent in the model's :data:`IMAGE_MODULES` while the block runs (one entry per call)."""
    inner = getattr(model, "model", model)
    modules = [getattr(inner, name) for name in IMAGE_MODULES if getattr(inner, name, None) is not None]
    spent: list[float] = []
    started: dict[int, float] = {}

    def before(module: Any, _args: Any) -> None:
        started[id(module)] = time.perf_counter()

    def after(module: Any, _args: Any, _output: Any) -> None:
        spent.append(time.perf_counter() - started.pop(id(module)))

    handles = [hook for m in modules for hook in (m.register_forward_pre_hook(before),
                                                  m.register_forward_hook(after))]
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


def _first_turn(model: Any, processor: Any, image: str, question: str) -> FirstTurn:
    """transformers' first turn: one greedy token with ``generate``, as edgevlm's is timed."""
    import torch
    from PIL import Image

    with _timed_image_modules(model) as spent:
        t0 = time.perf_counter()
        with Image.open(image) as img:
            picture = img.convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=text, images=[picture], return_tensors="pt")
        inputs = {k: (v.to(model.dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        total = time.perf_counter() - t0
    return FirstTurn(ttft_ms=total * 1e3, image_ms=sum(spent) * 1e3)


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


def edgevlm_first_turn(vlm: VLM, image: str, question: str) -> FirstTurn:
    """edgevlm's first turn with empty caches (nothing reused), one greedy token as transformers."""
    from edgevlm.benchmarks.probe import image_question, timed_turn

    with vlm.isolated_caches():
        turn = timed_turn(vlm, image_question(image, question), 1)
    return FirstTurn(ttft_ms=float(turn["ttft_ms"]), image_ms=float(turn["encode_ms"]))


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
    ``..._image_ms`` / ``..._prompt_ms`` split the turns (medians, see :class:`FirstTurn`): the
    image into embeddings, and the rest (mostly the LLM reading the prompt), so that the report says
    which half a difference comes from. ``edgevlm_prepare_ms`` / ``edgevlm_prepared_ttft_ms`` split
    edgevlm's first turn as ``chat --image`` runs it (see :func:`edgevlm_prepared_turn_ms`): the work
    done while the question is typed, and the wait after it is sent.

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
        out[f"transformers_{label}_ttft_first_ms"] = round(_first_turn(model, processor, image, question).ttft_ms, 1)
    turns: dict[str, list[FirstTurn]] = {label: [] for label in ("edgevlm", *models)}
    prepared: dict[str, list[float]] = {"prepare": [], "prepared": []}
    for _ in range(max(1, repeats)):
        if vlm is not None:
            turns["edgevlm"].append(edgevlm_first_turn(vlm, image, question))
            prepare_ms, prepared_ms = edgevlm_prepared_turn_ms(vlm, image, question)
            prepared["prepare"].append(prepare_ms)
            prepared["prepared"].append(prepared_ms)
        for label, (model, processor) in models.items():
            turns[label].append(_first_turn(model, processor, image, question))
    for label in models:
        out.update(_median_turn(f"transformers_{label}", turns[label]))
    if turns["edgevlm"]:
        out.update(_median_turn("edgevlm", turns["edgevlm"]))
        for label in models:
            out[f"edgevlm_vs_transformers_{label}"] = round(
                out["edgevlm_ttft_ms"] / out[f"transformers_{label}_ttft_ms"], 2)
        out["edgevlm_prepare_ms"] = round(statistics.median(prepared["prepare"]), 1)
        out["edgevlm_prepared_ttft_ms"] = round(statistics.median(prepared["prepared"]), 1)
    return out


def _median_turn(name: str, turns: list[FirstTurn]) -> dict[str, float]:
    """``{name}_ttft_ms``, ``{name}_image_ms`` and ``{name}_prompt_ms``: each the median over ``turns``."""
    parts = {"ttft": [t.ttft_ms for t in turns], "image": [t.image_ms for t in turns],
             "prompt": [t.prompt_ms for t in turns]}
    return {f"{name}_{part}_ms": round(statistics.median(values), 1) for part, values in parts.items()}


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
