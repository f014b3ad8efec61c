"""The mllama decoder's quantised KV cache (q8_0 / q4_0, read by ggml's flash attention) against
its f16 cache.

ggml quantises rows of one head in blocks of 32 values, so these tests use the tiny checkpoint
with 2 heads of 32 (1 KV head) instead of the session's 4 heads of 16 (which q8_0 refuses).
Tolerances (measured, see the asserts): teacher-forced logits with a q8_0 cache within
:data:`Q8_MAX_ABS` of the f16 cache's with every position's top-1 equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.mllama import MllamaSizes
from tests.kernels.test_mllama_text import IMAGES, _ours, _pixels

HEADS_OF_32 = MllamaSizes(text_heads=2, text_kv_heads=1)
Q8_MAX_ABS = 5e-2   # measured 2.4e-2 (|logit| up to 7.9), as the f16 cache against f32
PROMPTS = (("<|image|>the red car on the road is small and the sky is blue", IMAGES[4]),
           ("look at this: <|image|> a dog under a tree, looking left", IMAGES[2]))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    from edgevlm.convert import convert
    from tests.fixtures.mllama import build_mllama_checkpoint

    folder = build_mllama_checkpoint(tmp_path_factory.mktemp("mllama_hd32") / "hd32-mllama", HEADS_OF_32, seed=5)
    return folder, convert(folder, tmp_path_factory.mktemp("mllama_hd32_f32"), quant="f32", vision_type="f32")


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(converted[0])


@pytest.fixture(scope="module")
def encoder(converted):
    from edgevlm.kernels.mllama_vision import MllamaVisionEncoder

    enc = MllamaVisionEncoder(converted[1].mmproj_path, device="cpu", n_threads=1)
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def models(converted):
    """kv_type -> a decoder of 64 cells."""
    from edgevlm.kernels.mllama_text import MllamaTextModel

    out = {kv: MllamaTextModel(converted[1].llm_path, device="cpu", n_threads=1, n_ctx=64, kv_type=kv)
           for kv in ("f16", "q8_0", "q4_0")}
    yield out
    for m in out.values():
        m.close()


def _teacher_forced(models, tokenizer, encoder, kv, chunks=None):
    return [_ours(models[kv], encoder, tokenizer(text).input_ids, _pixels([size]), chunks=chunks)[0]
            for text, size in PROMPTS]


def test_q8_0_cache_stays_close_to_f16(models, tokenizer, encoder):
    ref = _teacher_forced(models, tokenizer, encoder, "f16")
    got = _teacher_forced(models, tokenizer, encoder, "q8_0")
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
    print(f"q8_0 KV vs f16 KV: max-abs {err:.2e} over {sum(len(r) for r in ref)} positions "
          f"(|logit| max {max(np.abs(r).max() for r in ref):.2f})")
    assert err <= Q8_MAX_ABS
    assert all(np.array_equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(got, ref))


def test_q4_0_cache_keeps_most_top1(models, tokenizer, encoder):
    ref = np.concatenate(_teacher_forced(models, tokenizer, encoder, "f16"))
    got = np.concatenate(_teacher_forced(models, tokenizer, encoder, "q4_0"))
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    print(f"q4_0 KV vs f16 KV: max-abs {np.abs(got - ref).max():.2e}, top-1 agree {agree:.3f}")
    assert agree >= 0.9


@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_follow_up_and_one_token_steps_equal_one_pass(models, tokenizer, encoder, kv):
    whole = _teacher_forced(models, tokenizer, encoder, kv)
    turns = _teacher_forced(models, tokenizer, encoder, kv, chunks=[7])
    steps = _teacher_forced(models, tokenizer, encoder, kv, chunks=list(range(1, 12)))
    for a, b, c in zip(whole, turns, steps):
        # one-query graphs take ggml's other flash-attention split (another summation order): 8e-4 measured
        assert np.abs(a - b).max() <= 1e-4 and np.abs(a - c).max() <= 2e-3


def test_snapshot_and_attach_reuse_the_prefix(models, tokenizer, encoder):
    """A parked quantised prefix (its blocks copied to the host) continues as an uncached run."""
    model = models["q8_0"]
    text, size = PROMPTS[0]
    ids = tokenizer(text).input_ids
    whole, mask = _ours(model, encoder, ids, _pixels([size]))
    model.rewind(6)
    state = model.snapshot()
    assert state.kv["cache.k.0"].dtype == np.uint8 and state.kv["cache.k.0"].shape == (6, 34)
    model.reset()
    model.forward([3, 4, 5, 6, 7, 8, 9])   # another conversation overwrites the cache
    model.attach(state)
    rest = model.forward(ids[6:], mask[6:], all_logits=True)
    assert np.abs(rest - whole[6:]).max() <= 1e-4


def test_greedy_reply_unchanged(models, tokenizer, encoder):
    replies = {}
    for kv in ("f16", "q8_0"):
        model = models[kv]
        text, size = PROMPTS[0]
        logits = _ours(model, encoder, tokenizer(text).input_ids, _pixels([size]))[0][-1]
        reply = []
        for _ in range(12):
            reply.append(int(logits.argmax()))
            logits = model.forward([reply[-1]])[0]
        replies[kv] = reply
    assert replies["q8_0"] == replies["f16"]


def test_bad_kv_types_are_refused(converted, mllama_f32_result):
    from edgevlm.errors import InvalidRequestError
    from edgevlm.kernels.mllama_text import MllamaTextModel

    with pytest.raises(InvalidRequestError, match="f32, f16, q8_0, q4_0"):
        MllamaTextModel(converted[1].llm_path, device="cpu", n_threads=1, n_ctx=8, kv_type="q5_1")
    with pytest.raises(InvalidRequestError, match="whole blocks of 32"):   # heads of 16
        MllamaTextModel(Path(mllama_f32_result.llm_path), device="cpu", n_threads=1, n_ctx=8, kv_type="q8_0")


def test_load_and_chat_with_a_q8_0_cache(converted):
    """``edgevlm.load(kv_type="q8_0")`` runs the mllama engine; its greedy reply equals the f16 cache's."""
    import edgevlm
    from edgevlm.errors import InvalidRequestError
    from tests.fixtures.internvl import gradient_image

    folder = converted[1].llm_path.parent
    messages = [{"role": "user", "content": [{"type": "image", "image": gradient_image(100, 100)},
                                             {"type": "text", "text": "what is in the picture?"}]}]
    replies = {}
    for kv in ("f16", "q8_0"):
        vlm = edgevlm.load(folder, n_ctx=128, kv_type=kv, n_threads=1, n_gpu_layers=0, cache=False)
        try:
            assert vlm.settings.kv_type == kv and vlm.settings.flash_attn == int(kv == "q8_0")
            replies[kv] = vlm.chat(messages, max_tokens=10, temperature=0).text
        finally:
            vlm.close()
    assert replies["q8_0"] == replies["f16"]
    with pytest.raises(InvalidRequestError, match="f32, f16, q8_0, q4_0"):
        edgevlm.plan(folder, kv_type="bf16")


def test_a_quantised_cache_with_flash_attention_forced_off_is_refused(converted):
    """As for llama.cpp models: a q8_0 cache is read only by flash attention, so flash_attn=False is refused
    before anything loads, with what to change."""
    import edgevlm
    from edgevlm.errors import InvalidRequestError

    folder = converted[1].llm_path.parent
    with pytest.raises(InvalidRequestError, match="needs flash attention.*--kv-type f16"):
        edgevlm.load(folder, n_ctx=128, kv_type="q8_0", flash_attn=False, n_threads=1, n_gpu_layers=0, cache=False)
