"""Image-token budgets: each family's prediction is what a request uses; caches never mix budgets."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import edgevlm
from edgevlm.chunks import ImageChunk
from edgevlm.errors import ContextOverflowError

SIZES = [(20, 15), (64, 64), (90, 45), (40, 100), (300, 40), (250, 190)]


@pytest.fixture(scope="module")
def next_cached(llava_next_f32_result):
    vlm = edgevlm.load(llava_next_f32_result.llm_path.parent, n_ctx=1024, n_threads=2)
    yield vlm
    vlm.close()


def _image(tmp_path, w, h, seed=0):
    path = tmp_path / f"img-{w}x{h}-{seed}.png"
    rng = np.random.default_rng(seed + w + h)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _request_tokens(vlm, path, budget):
    chunks = vlm.prompt_chunks([{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                             {"type": "text", "text": "Hi"}]}],
                               max_image_tokens=budget)
    return sum(c.n_tokens for c in chunks if isinstance(c, ImageChunk))


@pytest.mark.parametrize("budget", [None, 60, 44, 30])
def test_llava_next_prediction_is_the_request(next_cached, tmp_path, budget):
    for w, h in SIZES:
        path = _image(tmp_path, w, h)
        try:
            cost = next_cached.image_cost(w, h, max_image_tokens=budget)
        except ContextOverflowError:
            with pytest.raises(ContextOverflowError, match="image tokens"):
                _request_tokens(next_cached, path, budget)
            continue
        assert _request_tokens(next_cached, path, budget) == cost.tokens, (w, h, budget)
        if budget is not None:
            assert cost.tokens <= budget


def test_a_smaller_budget_picks_a_smaller_grid(next_cached):
    full = next_cached.image_cost(250, 190)
    small = next_cached.image_cost(250, 190, max_image_tokens=full.tokens - 1)
    assert small.tokens < full.tokens and small.views < full.views


def test_budget_below_the_smallest_view_is_a_clear_error(next_cached, tmp_path):
    with pytest.raises(ContextOverflowError, match=r"needs at least \d+ image tokens.*budget of 10"):
        _request_tokens(next_cached, _image(tmp_path, 90, 45), 10)


def test_caches_never_mix_budgets(llava_next_f32_result, tmp_path):
    path = _image(tmp_path, 250, 190, seed=3)
    ask = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "Hi"}]}]
    with edgevlm.load(llava_next_f32_result.llm_path.parent, n_ctx=1024, n_threads=2) as vlm:
        big = vlm.embed_image(path)
        small = vlm.embed_image(path, max_image_tokens=big.shape[0] - 1)
        assert small.shape[0] < big.shape[0] and vlm.encoder_calls == 2
        vlm.chat(ask, max_tokens=1, temperature=0, max_image_tokens=big.shape[0] - 1)
        assert vlm.last_prefill.images_encoded == 0 and vlm.last_prefill.images_from_cache == 1
        small_positions = vlm.last_prefill.prompt_positions
        vlm.chat(ask, max_tokens=1, temperature=0)  # the default plan: its own entry, not the small one
        assert vlm.last_prefill.images_encoded == 0 and vlm.last_prefill.images_from_cache == 1
        assert vlm.last_prefill.prompt_positions == small_positions + big.shape[0] - small.shape[0]
        vlm.chat(ask, max_tokens=1, temperature=0, max_image_tokens=small.shape[0] - 1)  # a third plan
        assert vlm.last_prefill.images_encoded == 1


def test_the_context_caps_the_default_budget(llava_next_f32_result, tmp_path):
    paths = [_image(tmp_path, 64, 64, seed=i) for i in range(3)]
    ask = [{"role": "user", "content": [{"type": "image", "image": str(p)} for p in paths]
            + [{"type": "text", "text": "Compare."}]}]
    with edgevlm.load(llava_next_f32_result.llm_path.parent, n_ctx=256, n_threads=2, cache=False) as vlm:
        cap = (vlm.n_ctx - min(512, vlm.n_ctx // 4)) // 3
        assert vlm.image_cost(64, 64).tokens == 88 > cap  # alone, the model's own plan
        images = [c for c in vlm.prompt_chunks(ask) if isinstance(c, ImageChunk)]
        assert len(images) == 3 and all(c.n_tokens <= cap for c in images)  # three share the context
        vlm.chat(ask, max_tokens=2, temperature=0)  # and the request fits


def test_load_default_budget_and_request_override(llava_next_f32_result):
    with edgevlm.load(llava_next_f32_result.llm_path.parent, n_ctx=1024, n_threads=2, cache=False,
                      max_image_tokens=44) as vlm:
        assert vlm.image_cost(250, 190).tokens <= 44
        assert vlm.image_cost(250, 190, max_image_tokens=200).tokens > 44


def test_qwen2vl_budget_lowers_the_pixels(qwen2vl_vlm, tmp_path):
    path = _image(tmp_path, 224, 168)
    full = qwen2vl_vlm.image_cost(224, 168)
    for budget in (full.tokens // 2, full.tokens // 4):
        cost = qwen2vl_vlm.image_cost(224, 168, max_image_tokens=budget)
        assert cost.tokens <= budget < full.tokens
        assert _request_tokens(qwen2vl_vlm, path, budget) == cost.tokens
    with pytest.raises(ContextOverflowError, match="image tokens"):
        _request_tokens(qwen2vl_vlm, path, 1)


def test_single_view_models_ignore_the_budget(siglip_vlm, tmp_path):
    path = _image(tmp_path, 64, 48)
    assert _request_tokens(siglip_vlm, path, 3) == siglip_vlm.image_cost(64, 48).tokens


def test_grid_tiles_for_single_view_models(clip_f32, tmp_path):
    path = _image(tmp_path, 120, 50)
    with edgevlm.load(clip_f32, n_ctx=1024, n_threads=2, cache=False) as plain, \
            edgevlm.load(clip_f32, n_ctx=1024, n_threads=2, cache=False, tiles="grid") as grid:
        one = plain.embed_image(path)
        tiled = grid.embed_image(path)
        cost = grid.image_cost(120, 50)
        assert cost.views == 4  # a 120x50 image: the overview + a 1x3 grid (the best llava-v1.6 grid)
        assert tiled.shape == (4 * one.shape[0], one.shape[1]) == (cost.tokens, one.shape[1])
        np.testing.assert_allclose(tiled[:one.shape[0]], one, atol=1e-4)  # the overview comes first
        assert grid.image_cost(120, 50, max_image_tokens=2 * one.shape[0]).views == 1
    with pytest.raises(edgevlm.EdgeVLMError, match="tiles='grid'"):
        edgevlm.load(clip_f32, n_ctx=512, n_threads=2, cache=False, tiles="grid", vision_engine="mtmd")
