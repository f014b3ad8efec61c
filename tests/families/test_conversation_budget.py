"""The default image budget over a conversation, and the too-small-context message.

Tiny LLaVA-NeXT (tests/fixtures/llava_next.py) at n_ctx 256: a 64x64 image costs 88 tokens
by the model's own plan, a 32x32 one 36; the smallest plan of any image is 26-36 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import edgevlm
from edgevlm.errors import ContextOverflowError


def _image(folder, size, seed):
    path = folder / f"img-{size}-{seed}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def small_ctx(llava_next_f32_result):
    vlm = edgevlm.load(llava_next_f32_result.llm_path.parent, n_ctx=256, n_threads=2, cache=False)
    yield vlm
    vlm.close()


def test_a_new_image_never_replans_the_earlier_ones(small_ctx, tmp_path):
    """One image per turn: the earlier images keep their plans (and KV prefix); only the new one
    shares what is left. Evenly shared, turn 3 re-planned the 64x64 image 88 -> 36 tokens,
    re-encoded 2 images and reused 8 positions."""
    small_ctx.reset()
    images = [_image(tmp_path, 64, 0), _image(tmp_path, 32, 1), _image(tmp_path, 32, 2)]
    messages: list[dict] = []
    cached = 0
    for turn, path in enumerate(images):
        messages.append({"role": "user", "content": [{"type": "image", "image": path},
                                                     {"type": "text", "text": f"Image {turn}?"}]})
        reply = small_ctx.chat(messages, max_tokens=2, temperature=0)
        stats = small_ctx.last_prefill
        assert stats.images_encoded == 1, (turn, stats)
        assert stats.reused_positions >= cached, (turn, stats)
        cached = stats.prompt_positions
        messages.append({"role": "assistant", "content": reply.text})
    assert small_ctx.image_cost(64, 64).tokens == 88  # the first image kept the model's own plan


def test_new_images_that_cannot_fit_beside_the_kept_ones_share_the_context(small_ctx, tmp_path):
    """Three 64x64 images (3 x 88 > 256): the request still fits, every image re-planned evenly."""
    small_ctx.reset()
    messages: list[dict] = []
    for turn in range(3):
        messages.append({"role": "user", "content": [{"type": "image", "image": _image(tmp_path, 64, 10 + turn)},
                                                     {"type": "text", "text": "And this?"}]})
        reply = small_ctx.chat(messages, max_tokens=2, temperature=0)
        messages.append({"role": "assistant", "content": reply.text})
    assert small_ctx.last_prefill.kv_cells <= 256


def test_too_small_context_says_what_each_image_needs(small_ctx, tmp_path):
    paths = [_image(tmp_path, 64, 20 + i) for i in range(8)]
    ask = [{"role": "user", "content": [{"type": "image", "image": p} for p in paths]
            + [{"type": "text", "text": "Compare."}]}]
    with pytest.raises(ContextOverflowError) as info:
        small_ctx.chat(ask, max_tokens=1)
    message = str(info.value)
    assert "8 images needing 36 tokens each (their smallest plans)" in message
    assert "--ctx" in message and "--image-tokens" not in message  # no smaller plan exists


def test_too_small_context_suggests_an_image_budget_that_fits(small_ctx, tmp_path):
    ask = [{"role": "user", "content": [{"type": "image", "image": _image(tmp_path, 64, 30)},
                                        {"type": "text", "text": " ".join(["word"] * 52)}]}]
    with pytest.raises(ContextOverflowError) as info:
        small_ctx.chat(ask, max_tokens=1)
    message = str(info.value)
    assert "1 image needing 88 tokens" in message and "--ctx / n_ctx= to at least" in message
    budget = int(message.split("--image-tokens ")[1].split()[0])
    small_ctx.chat(ask, max_tokens=1, max_image_tokens=budget)  # the suggestion works
    assert small_ctx.last_prefill.kv_cells <= 256
