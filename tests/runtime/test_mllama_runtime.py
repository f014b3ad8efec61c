"""mllama end to end on the kernels (edgevlm.mllama_runtime) against transformers.

Tokenisation through llama.cpp's vocabulary-only load equals the checkpoint's
tokenizer; greedy tokens equal transformers' ``generate`` (f32 files).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.internvl import gradient_image

PROMPTS = ["<|image|>what is in the picture?", "hello world, where is the dog?",
           "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>describe<|eot_id|>",
           "ünïcödé 123456 and   spaces\n\nnew lines"]


@pytest.fixture(scope="module")
def pipeline(mllama_f32_result):
    from edgevlm.mllama_runtime import MllamaPipeline

    pipe = MllamaPipeline(mllama_f32_result.llm_path, mllama_f32_result.mmproj_path, device="cpu",
                          n_threads=1, n_ctx=128, kv_type="f32")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def hf(mllama_checkpoint):
    from transformers import PreTrainedTokenizerFast

    from tests.fixtures.mllama import load_model

    return load_model(mllama_checkpoint), PreTrainedTokenizerFast.from_pretrained(mllama_checkpoint)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_equals_the_checkpoints(pipeline, hf, prompt):
    assert pipeline.tokenize(prompt) == hf[1](prompt).input_ids  # BOS added, as the checkpoint's


def _hf_generate(hf, prompt, images, n):
    import torch
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

    from tests.fixtures.mllama import image_processor

    model, tok = hf
    ids = tok(prompt).input_ids
    kwargs = {}
    if images:
        batch = image_processor()(images=[images], return_tensors="np")
        sparse = get_cross_attention_token_mask(ids, model.config.image_token_index)
        mask = convert_sparse_cross_attention_mask_to_dense([sparse], batch["num_tiles"], 4, len(ids))
        kwargs = {k: torch.from_numpy(batch[k]) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        kwargs["cross_attention_mask"] = torch.from_numpy(mask)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=n, **kwargs)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize(("prompt", "sizes"), [
    ("<|image|>what is in the picture? it is", [(168, 50)]),
    ("<|image|>a cat<|image|>a dog. which one is red?", [(100, 100), (56, 56)]),
    ("hello world, where is the dog?", []),
])
def test_greedy_tokens_equal_transformers(pipeline, hf, prompt, sizes):
    images = [gradient_image(*s, seed=i) for i, s in enumerate(sizes)]
    ref = _hf_generate(hf, prompt, images, 10)
    got = pipeline.generate(prompt, images, max_tokens=10)
    print(f"{prompt[:20]!r}: {got} ({pipeline.detokenize(got)!r})")
    assert got == ref


def test_encoded_images_are_reused(pipeline):
    image = pipeline.encode_image(gradient_image(112, 56))
    a = pipeline.start("<|image|>what is it?", [image])
    b = pipeline.start("<|image|>what is it?", [gradient_image(112, 56)])
    np.testing.assert_array_equal(a, b)


def test_image_tokens_without_images_are_refused(pipeline):
    from edgevlm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="no images"):
        pipeline.start("<|image|>what is it?")
    with pytest.raises(InvalidRequestError, match="1 image tokens for 2 images"):
        pipeline.start("<|image|>what?", [gradient_image(56, 56)] * 2)


def test_follow_up_equals_reading_everything(pipeline):
    """Prefix reuse: a follow-up reads only its tokens and gives the one-pass logits."""
    first, second = "<|image|>what is in the picture?", " a red car. and the sky is"
    image = pipeline.encode_image(gradient_image(100, 100))
    pipeline.start(first, [image])
    n_cached = pipeline.text.n_past
    follow = pipeline.follow_up(second)
    assert pipeline.text.n_past == n_cached + len(pipeline.vocab.tokenize(second, add_special=False))
    whole = pipeline.start(first + second, [image])
    np.testing.assert_allclose(follow, whole, atol=1e-4)


def test_follow_up_after_generating_continues_the_conversation(pipeline):
    prompt, image = "<|image|>what is it?", gradient_image(168, 50)
    tokens = pipeline.generate(prompt, [image], max_tokens=3, stop_at_eog=False)
    new = pipeline.vocab.tokenize(" ok.", add_special=False)
    follow = pipeline.follow_up(" ok.")
    assert pipeline.history == pipeline.tokenize(prompt) + tokens + new
    pipeline.start(prompt, [image])
    again = pipeline.text.forward(tokens + new)[-1]
    np.testing.assert_allclose(follow, again, atol=1e-4)


def test_follow_up_with_a_new_image(pipeline):
    """The grown image set's keys are recomputed, the self-attention cache kept. Without
    text before the first image this equals one pass; with it (BOS here) the first tokens
    saw only the first image, where one pass lets them see both (their rows are unmasked)."""
    from edgevlm.kernels.mllama_text import cross_attention_mask

    a, b = gradient_image(56, 56), gradient_image(112, 56, seed=3)
    image_id = pipeline.text.config.image_token_id
    pipeline.start("<|image|>a cat.", [a])
    got = pipeline.follow_up("<|image|>a dog. which?", [b])
    whole = pipeline.start("<|image|>a cat.<|image|>a dog. which?", [a, b])
    assert len(pipeline.encoded) == 2
    with_bos = float(np.abs(got - whole).max())
    text = pipeline.text
    ids = [image_id, *pipeline.vocab.tokenize("a cat.", add_special=False)]
    more = [image_id, *pipeline.vocab.tokenize("a dog. which?", add_special=False)]
    ea, eb = pipeline.encode_image(a), pipeline.encode_image(b)
    mask = cross_attention_mask(ids + more, image_id, [1, 2], 4)
    text.reset()
    text.set_images([ea.states], [1])
    text.forward(ids, mask[:len(ids), :1])
    text.set_images([ea.states, eb.states], [1, 2])
    split = text.forward(more, mask[len(ids):])[-1]
    text.reset()
    text.set_images([ea.states, eb.states], [1, 2])
    one = text.forward(ids + more, mask)[-1]
    print(f"new image in a follow-up: max-abs {with_bos:.2e} with BOS before the first image, "
          f"{np.abs(split - one).max():.2e} without")
    np.testing.assert_allclose(split, one, atol=1e-4)
    assert with_bos > 1e-4


def test_a_load_parses_each_header_once(mllama_f32_result, monkeypatch):
    """Given the descriptor's headers, the pipeline parses neither file again (the vocabulary file is
    copied from the LLM file's raw metadata, not through gguf's reader); the token embeddings are
    read in place from the mapped file on the CPU."""
    import gguf

    import edgevlm.gguf_info as info
    from edgevlm.gguf_info import read_header
    from edgevlm.kernels.graph import MappedTensor
    from edgevlm.mllama_runtime import MllamaPipeline

    headers = (read_header(mllama_f32_result.llm_path), read_header(mllama_f32_result.mmproj_path))
    info.clear_header_cache()

    def forbidden(*args, **kwargs):
        raise AssertionError("a header was parsed again")

    monkeypatch.setattr(info, "_parse", forbidden)
    monkeypatch.setattr(gguf, "GGUFReader", forbidden)
    pipe = MllamaPipeline(mllama_f32_result.llm_path, mllama_f32_result.mmproj_path, device="cpu",
                          n_threads=1, n_ctx=32, kv_type="f32", headers=headers)
    try:
        assert isinstance(pipe.text._embd, MappedTensor) and "token_embd.weight" not in pipe.text.weights
        assert pipe.tokenize("hello world") == pipe.vocab.tokenize("hello world", add_special=True, parse_special=True)
    finally:
        pipe.close()
