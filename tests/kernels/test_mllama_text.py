"""The mllama text decoder on ggml against transformers' MllamaForConditionalGeneration (f32).

Image prompts with 1-4 tiles, text only, text before the image, two images, a
follow-up call on the KV cache, one-token decoding, and a Q8_0 LLM's top-1 agreement.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.internvl import gradient_image

MAX_ABS = 5e-3   # the tolerance for next-token logits at f32
IMAGES = {1: (56, 56), 2: (112, 56), 3: (168, 50), 4: (100, 100)}   # tiles -> (width, height)


@pytest.fixture(scope="module")
def hf_model(mllama_checkpoint):
    from tests.fixtures.mllama import load_model

    return load_model(mllama_checkpoint)


@pytest.fixture(scope="module")
def tokenizer(mllama_checkpoint):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(mllama_checkpoint)


@pytest.fixture(scope="module")
def encoder(mllama_f32_result):
    from edgevlm.kernels.mllama_vision import MllamaVisionEncoder

    enc = MllamaVisionEncoder(mllama_f32_result.mmproj_path, device="cpu", n_threads=1)
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def text_model(mllama_f32_result):
    from edgevlm.kernels.mllama_text import MllamaTextModel

    model = MllamaTextModel(mllama_f32_result.llm_path, device="cpu", n_threads=1, n_ctx=256)
    yield model
    model.close()


def _pixels(sizes):
    from tests.fixtures.mllama import image_processor

    images = [gradient_image(*s, seed=i + 1) for i, s in enumerate(sizes)]
    return image_processor()(images=[images], return_tensors="np")


def _reference(hf_model, ids, batch):
    """transformers' logits (every position) with the processor's own cross-attention mask."""
    import torch
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

    kwargs = {}
    if batch is not None:
        sparse = get_cross_attention_token_mask(ids, hf_model.config.image_token_index)
        mask = convert_sparse_cross_attention_mask_to_dense([sparse], batch["num_tiles"], 4, len(ids))
        kwargs = dict(pixel_values=torch.from_numpy(batch["pixel_values"]),
                      aspect_ratio_ids=torch.from_numpy(batch["aspect_ratio_ids"]),
                      aspect_ratio_mask=torch.from_numpy(batch["aspect_ratio_mask"]),
                      cross_attention_mask=torch.from_numpy(mask))
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([ids]), **kwargs).logits[0].numpy()
    return out, (mask[0] if batch is not None else None)


def _ours(text_model, encoder, ids, batch, *, chunks=None):
    from edgevlm.kernels.mllama_text import cross_attention_mask

    text_model.reset()
    mask = None
    if batch is not None:
        tiles = batch["num_tiles"][0]
        states = [encoder.encode(batch["pixel_values"][0, i], int(batch["aspect_ratio_ids"][0, i]), t)
                  for i, t in enumerate(tiles)]
        text_model.set_images(states, tiles)
        mask = cross_attention_mask(ids, text_model.config.image_token_id, tiles, 4)
    bounds = [0, *(chunks or []), len(ids)]
    parts = [text_model.forward(ids[a:b], None if mask is None else mask[a:b], all_logits=True)
             for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate(parts), mask


def _compare(got, ref, label):
    err = float(np.abs(got - ref).max())
    print(f"{label}: max-abs {err:.2e} over {got.shape[0]} positions (|logit| max {np.abs(ref).max():.1f}), "
          f"top-1 agree {np.mean(got.argmax(-1) == ref.argmax(-1)):.3f}")
    assert got.shape == ref.shape and err <= MAX_ABS


@pytest.mark.parametrize("n_tiles", sorted(IMAGES))
def test_image_prompt_matches_transformers(hf_model, tokenizer, encoder, text_model, n_tiles):
    ids = tokenizer("<|image|>what is in the picture? the red car").input_ids
    batch = _pixels([IMAGES[n_tiles]])
    assert batch["num_tiles"] == [[n_tiles]]
    ref, ref_mask = _reference(hf_model, ids, batch)
    got, mask = _ours(text_model, encoder, ids, batch)
    np.testing.assert_array_equal(mask, ref_mask)
    _compare(got, ref, f"{n_tiles} tiles")


def test_text_only_matches_transformers(hf_model, tokenizer, encoder, text_model):
    ids = tokenizer("hello world, where is the dog?").input_ids
    got, _ = _ours(text_model, encoder, ids, None)
    _compare(got, _reference(hf_model, ids, None)[0], "text only")


def test_text_before_the_image_matches_transformers(hf_model, tokenizer, encoder, text_model):
    ids = tokenizer("look at this: <|image|> and tell me the color").input_ids
    batch = _pixels([IMAGES[2]])
    got, mask = _ours(text_model, encoder, ids, batch)
    assert not mask[:3].any()
    _compare(got, _reference(hf_model, ids, batch)[0], "text before the image")


def test_two_images_match_transformers(hf_model, tokenizer, encoder, text_model):
    ids = tokenizer("<|image|>a cat<|image|>a dog. which one is red?").input_ids
    batch = _pixels([IMAGES[3], IMAGES[1]])
    got, _ = _ours(text_model, encoder, ids, batch)
    _compare(got, _reference(hf_model, ids, batch)[0], "two images")


def test_follow_up_on_the_cache_equals_one_pass(hf_model, tokenizer, encoder, text_model):
    first = "<|image|>what is in the picture?"
    ids = tokenizer(first + " a red car. and the sky?").input_ids
    cut = len(tokenizer(first).input_ids)
    batch = _pixels([IMAGES[4]])
    whole, _ = _ours(text_model, encoder, ids, batch)
    turns, _ = _ours(text_model, encoder, ids, batch, chunks=[cut])
    one_by_one, _ = _ours(text_model, encoder, ids, batch, chunks=list(range(1, len(ids))))
    assert np.abs(turns - whole).max() <= 1e-4 and np.abs(one_by_one - whole).max() <= 1e-4
    _compare(turns, _reference(hf_model, ids, batch)[0], "follow-up turn")


def test_the_image_changes_the_logits(tokenizer, encoder, text_model):
    ids = tokenizer("<|image|>what is it?").input_ids
    a, _ = _ours(text_model, encoder, ids, _pixels([(56, 56)]))
    b, _ = _ours(text_model, encoder, ids, _pixels([(100, 100)]))
    assert np.abs(a[-1] - b[-1]).max() > 0.1


@pytest.mark.parametrize(("quant", "agreement"), [("q8_0", 0.99), ("q4_0", 0.8)])
def test_quantised_top1_agreement(hf_model, tokenizer, encoder, mllama_checkpoint, tmp_path, quant,
                                  agreement):
    """Teacher-forced top-1 agreement with transformers' f32 logits (the issue asks 0.99 at Q8_0)."""
    from edgevlm.convert import convert
    from edgevlm.kernels.mllama_text import MllamaTextModel
    from tests.helpers import gguf_tensors

    result = convert(mllama_checkpoint, tmp_path, quant=quant, vision_type="f32")
    types = {n: t.tensor_type.name for n, t in gguf_tensors(result.llm_path).items()}
    assert types["blk.0.ffn_up.weight"] == quant.upper()
    model = MllamaTextModel(result.llm_path, device="cpu", n_threads=1, n_ctx=256)
    agree = total = 0
    try:
        for text, size in (("<|image|>the red car on the road is small and the sky is blue", IMAGES[4]),
                           ("<|image|>describe the picture: a dog under a tree, looking left", IMAGES[2])):
            ids = tokenizer(text).input_ids
            batch = _pixels([size])
            ref, _ = _reference(hf_model, ids, batch)
            got, _ = _ours(model, encoder, ids, batch)
            agree += int(np.sum(got.argmax(-1) == ref.argmax(-1)))
            total += len(ids)
    finally:
        model.close()
    print(f"{quant} top-1 agreement {agree}/{total}")
    assert agree / total >= agreement


def test_bad_requests_are_refused(tokenizer, encoder, text_model):
    from edgevlm.errors import ContextOverflowError, InvalidRequestError
    from edgevlm.kernels.mllama_text import cross_attention_mask

    with pytest.raises(InvalidRequestError, match="2 image tokens for 1 images"):
        cross_attention_mask(tokenizer("<|image|><|image|>x").input_ids, 411, [1], 4)
    text_model.reset()
    with pytest.raises(InvalidRequestError, match="non-empty"):
        text_model.forward([])
    with pytest.raises(ContextOverflowError):
        text_model.forward([1] * 257)


def test_f16_kv_cache_stays_close(tokenizer, encoder, text_model, mllama_f32_result):
    from edgevlm.kernels.mllama_text import MllamaTextModel

    ids = tokenizer("<|image|>what is in the picture? the red car").input_ids
    batch = _pixels([IMAGES[3]])
    ref, _ = _ours(text_model, encoder, ids, batch, chunks=[5])
    model = MllamaTextModel(mllama_f32_result.llm_path, device="cpu", n_threads=1, n_ctx=64, kv_type="f16")
    try:
        got, _ = _ours(model, encoder, ids, batch, chunks=[5])
    finally:
        model.close()
    print(f"f16 KV cache: max-abs {np.abs(got - ref).max():.2e}")
    assert np.abs(got - ref).max() <= 5e-2 and np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_micro_batches_and_chunked_cross_kv_equal_one_graph(tokenizer, encoder, text_model, mllama_f32_result,
                                                             monkeypatch):
    """A forward split into graphs of 3 tokens (all logits, and the last only), attention products of 2
    query tokens and cross-attention K/V computed 10 states at a time give one graph's logits; one-token
    graphs reuse one allocator."""
    import edgevlm.kernels.mllama_text as mt

    ids = tokenizer("<|image|>what is in the picture? the red car on the road").input_ids
    batch = _pixels([IMAGES[3]])
    whole, mask = _ours(text_model, encoder, ids, batch)
    monkeypatch.setattr(mt, "CROSS_KV_CHUNK", 10)
    monkeypatch.setattr(mt, "ATTN_CHUNK", 2)
    model = mt.MllamaTextModel(mllama_f32_result.llm_path, device="cpu", n_threads=1, n_ctx=64, n_ubatch=3)
    try:
        split, _ = _ours(model, encoder, ids, batch)
        model.rewind(0)
        last = model.forward(ids, mask)
        first = model.forward([5])
        allocator = model._decode_alloc
        model.forward([6])
        assert allocator is not None and model._decode_alloc == allocator
    finally:
        model.close()
    assert split.shape == whole.shape and np.abs(split - whole).max() <= 1e-5
    assert last.shape == (1, whole.shape[1]) and np.abs(last[0] - whole[-1]).max() <= 1e-5
    assert first.shape == (1, whole.shape[1])
