"""The InternVL runtime family against transformers' InternVL (tiny -hf fixture, f32 GGUF, f32 KV, CPU).

* ``embed_image``: the processor's tiles (row by row, then the thumbnail), per-token
  cosine >= 0.9999 against ``get_image_features`` (measured >= 0.99999).
* prompts: token ids identical to ``InternVLProcessor``'s ``input_ids``; next-token
  logits max-abs <= 5e-3 (measured ~6e-4, GELU: ggml's tanh form vs erf).
* budgets: ``image_cost`` is what a request uses (views + ``<img>`` / ``</img>``, all
  counted by the budget); the tiles are the processor's with ``max_patches`` lowered by
  the budget; budgets never share chunk keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgevlm
from edgevlm.chunks import ImageChunk, TextChunk
from edgevlm.errors import ContextOverflowError, UnsupportedModelError
from edgevlm.vision.internvl_tiles import budget_max_tiles
from tests.fixtures.internvl import InternVLSizes, gradient_image, image_processor, load_processor
from tests.reference import cosine_rows, hf_model

SIZES = InternVLSizes()
PER_TILE = SIZES.tokens_per_tile
FRAME = 2
"""``<img>`` and ``</img>``: one token each."""
QUESTION = "what is it?"


@pytest.fixture(scope="module")
def vlm(internvl_f32_result) -> Iterator[edgevlm.VLM]:
    model = edgevlm.load(internvl_f32_result.llm_path, mmproj=internvl_f32_result.mmproj_path,
                         n_ctx=1024, n_threads=2, kv_type="f32", cache=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def processor(internvl_checkpoint: Path) -> Any:
    return load_processor(internvl_checkpoint)


def _messages(*turns: tuple[str, list[Any], str]) -> tuple[list[dict], list[dict]]:
    """(edgevlm messages with images, the same for transformers' chat template)."""
    ours, theirs = [], []
    for role, images, text in turns:
        parts = [{"type": "image", "image": img} for img in images]
        ours.append({"role": role, "content": [*parts, {"type": "text", "text": text}]})
        theirs.append({"role": role, "content": [*({"type": "image"} for _ in images),
                                                 {"type": "text", "text": text}]})
    return ours, theirs


def _hf_inputs(processor: Any, messages: list[dict], images: list[Any]) -> dict:
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=images or None, text=[text], return_tensors="pt")


def _hf_features(checkpoint: Path, img: Any, max_patches: int | None = None) -> np.ndarray:
    import torch

    kwargs = {} if max_patches is None else {"max_patches": max_patches}
    pixels = image_processor(SIZES)(images=[img], return_tensors="np", **kwargs)["pixel_values"]
    with torch.no_grad():
        feats = hf_model(checkpoint).get_image_features(pixel_values=torch.tensor(pixels)).pooler_output
    return feats.reshape(-1, feats.shape[-1]).numpy()


def _as_ids(chunks: list, context_id: int) -> list[int]:
    """The chunks as the processor's ids (each image embedding as ``<IMG_CONTEXT>``)."""
    ids: list[int] = []
    for chunk in chunks:
        ids += list(chunk.tokens) if isinstance(chunk, TextChunk) else [context_id] * chunk.n_tokens
    return ids


def test_the_family_runs_internvl_on_libmtmd(vlm, internvl_f32_result):
    assert (vlm.family, vlm.vision_engine) == ("internvl", "mtmd")
    with pytest.raises(UnsupportedModelError, match="use vision_engine='mtmd'"):
        edgevlm.load(internvl_f32_result.llm_path, mmproj=internvl_f32_result.mmproj_path,
                     n_threads=2, cache=False, vision_engine="kernels")


@pytest.mark.parametrize(("size", "views"), [
    ((56, 56), 1),     # one tile
    ((70, 70), 1),     # one tile, resized
    ((170, 57), 4),    # 3 tiles + thumbnail
    ((100, 100), 5),   # 4 tiles + thumbnail
    ((150, 100), 7),   # 6 tiles + thumbnail
])
def test_embed_image_is_transformers_tiles_in_order(vlm, internvl_checkpoint, size, views, record_property):
    img = gradient_image(*size, seed=7)
    ours = vlm.embed_image(img)
    ref = _hf_features(internvl_checkpoint, img)
    assert ours.shape == ref.shape == (views * PER_TILE, SIZES.text_hidden)
    assert float(np.abs(ref).max()) > 0.3, "degenerate reference features"
    cos = cosine_rows(ours, ref)
    record_property(f"internvl_embed_cosine_min_{size[0]}x{size[1]}", float(cos.min()))
    assert cos.min() >= 0.9999, f"min per-token cosine {cos.min():.6f}"


@pytest.mark.parametrize("case", ["one image", "two images", "text only"])
def test_prompt_ids_and_next_token_logits_match_transformers(vlm, processor, internvl_checkpoint, case,
                                                             record_property):
    import torch

    images = {"one image": [gradient_image(150, 100, seed=4)],
              "two images": [gradient_image(170, 57, seed=5), gradient_image(56, 56, seed=6)],
              "text only": []}[case]
    ours, theirs = _messages(("user", images, QUESTION))
    inputs = _hf_inputs(processor, theirs, images)
    context_id = processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert _as_ids(vlm.prompt_chunks(ours), context_id) == inputs["input_ids"][0].tolist()
    logits = vlm.next_token_logits(ours)
    with torch.no_grad():
        ref = hf_model(internvl_checkpoint)(**inputs).logits[0, -1].numpy()
    gap = float(np.abs(logits - ref).max())
    record_property(f"internvl_logits_max_abs_{case.replace(' ', '_')}", gap)
    assert float(np.abs(ref).max()) > 0.5, "degenerate reference logits"
    assert gap <= 5e-3, f"next-token logits max-abs {gap:.2e}"


def _request_cost(vlm: edgevlm.VLM, img: Any, budget: int | None) -> tuple[int, int, int]:
    """(tokens, image chunks, view tokens) the image takes in a real request, ``<img>`` / ``</img>`` included."""
    chunks = vlm.prompt_chunks(_messages(("user", [img], QUESTION))[0], max_image_tokens=budget)
    llm = vlm.engine.model
    delimiters = {t for text in ("<img>", "</img>") for t in llm.tokenize(text, add_special=False)}
    views = [c for c in chunks if isinstance(c, ImageChunk)]
    n_delimiters = sum(t in delimiters for c in chunks if isinstance(c, TextChunk) for t in c.tokens)
    view_tokens = sum(c.n_tokens for c in views)
    return view_tokens + n_delimiters, len(views), view_tokens


@pytest.mark.parametrize("size", [(56, 56), (170, 57), (100, 100), (150, 100), (640, 480), (30, 400)])
def test_image_cost_is_what_a_request_uses(vlm, size):
    img = gradient_image(*size)
    seen = []
    budgets = (None, 13 * PER_TILE + FRAME, 13 * PER_TILE, 7 * PER_TILE + FRAME, 5 * PER_TILE + FRAME,
               4 * PER_TILE, 2 * PER_TILE + FRAME, PER_TILE + FRAME)
    for budget in budgets:
        cost = vlm.image_cost(*size, max_image_tokens=budget)
        tokens, views, view_tokens = _request_cost(vlm, img, budget)
        assert (cost.tokens, cost.views) == (tokens, views), (size, budget)
        assert tokens == view_tokens + FRAME
        assert cost.positions == cost.cells == cost.tokens  # 1-D positions
        if budget is not None:
            assert cost.tokens <= budget
            # the tiles are the processor's with max_patches lowered by the budget
            ref = image_processor(SIZES)(images=[img], return_tensors="np",
                                         max_patches=budget_max_tiles(budget - FRAME, PER_TILE))
            assert int(ref["num_patches"][0]) == views
        seen.append(views)
    assert seen == sorted(seen, reverse=True) and seen[-1] == 1


def test_a_smaller_budget_means_fewer_tiles_and_never_shares_embeddings(vlm, internvl_checkpoint):
    img = gradient_image(640, 480, seed=8)
    big = vlm.engine.image_chunks(edgevlm.load_image(img))
    small = vlm.engine.image_chunks(edgevlm.load_image(img), max_image_tokens=5 * PER_TILE + FRAME)
    assert (len(big), len(small)) == (13, 5)   # 4x3 + thumbnail vs 2x2 + thumbnail
    assert not {c.key for c in big} & {c.key for c in small}
    messages = _messages(("user", [img], QUESTION))[0]
    vlm.next_token_logits(messages)
    assert vlm.last_prefill.images_encoded == 13
    vlm.next_token_logits(messages, max_image_tokens=5 * PER_TILE + FRAME)
    assert vlm.last_prefill.images_encoded == 5, "the second budget must encode its own tiles"
    emb = vlm.embed_image(img, max_image_tokens=5 * PER_TILE + FRAME)
    ref = _hf_features(internvl_checkpoint, img, max_patches=budget_max_tiles(5 * PER_TILE, PER_TILE))
    assert emb.shape == ref.shape == (5 * PER_TILE, SIZES.text_hidden)
    assert cosine_rows(emb, ref).min() >= 0.9999


def test_a_budget_below_one_tile_is_refused(vlm):
    img = gradient_image(100, 100)
    smallest = PER_TILE + FRAME
    with pytest.raises(ContextOverflowError, match=f"needs at least {smallest} image tokens") as info:
        vlm.next_token_logits(_messages(("user", [img], QUESTION))[0], max_image_tokens=smallest - 1)
    assert "--image-tokens" in str(info.value) and "budget of 17" in str(info.value)
    with pytest.raises(ContextOverflowError, match=f"needs at least {smallest} image tokens"):
        vlm.image_cost(100, 100, max_image_tokens=smallest - 1)
    with pytest.raises(ContextOverflowError, match="budget of 15"):  # the embeddings alone
        vlm.embed_image(img, max_image_tokens=PER_TILE - 1)


def test_a_follow_up_about_the_same_image_encodes_nothing(vlm):
    img = gradient_image(150, 100, seed=9)
    first = _messages(("user", [img], QUESTION))[0]
    vlm.reset()
    vlm.next_token_logits(first)
    assert vlm.last_prefill.images_encoded == 7
    follow_up = first + _messages(("assistant", [], "a gradient"), ("user", [], "which colours?"))[0]
    vlm.next_token_logits(follow_up)
    stats = vlm.last_prefill
    assert stats.images_encoded == 0
    assert stats.reused_positions >= 7 * PER_TILE + 2
    # nor cuts it into tiles again (the family keeps the last images' tiles per plan)
    family, encoder, loaded = vlm.engine.family, vlm.engine.encoder, edgevlm.load_image(img)
    tiled = family.prepare_image(loaded, None, encoder)
    assert family.prepare_image(loaded, None, encoder).views is tiled.views
    assert family.prepare_image(loaded, PER_TILE + FRAME, encoder).views is not tiled.views


def test_embed_image_refuses_a_budget_a_request_refuses(internvl_f32_result, tmp_path):
    """The budget counts <img> and </img>: embed_image and requests agree on the smallest one."""
    import edgevlm
    from edgevlm.errors import ContextOverflowError
    from PIL import Image

    path = tmp_path / "one.png"
    Image.new("RGB", (56, 56), (30, 60, 90)).save(path)
    with edgevlm.load(internvl_f32_result.llm_path.parent, n_ctx=512, n_threads=2, cache=False) as vlm:
        smallest = vlm.image_cost(56, 56).tokens
        vlm.embed_image(path, max_image_tokens=smallest)
        with pytest.raises(ContextOverflowError, match=f"needs at least {smallest} image tokens"):
            vlm.embed_image(path, max_image_tokens=smallest - 1)
