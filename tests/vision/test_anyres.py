"""LLaVA-NeXT geometry, token counts and views against transformers' processors.

References: ``transformers.image_processing_utils.select_best_resolution``,
``LlavaNextProcessor._get_number_of_features`` (minus the CLS token, strategy
``default``) and ``LlavaNextImageProcessorPil`` pixel values (max-abs <= 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm.errors import ContextOverflowError, InvalidModelError
from edgevlm.vision.anyres import (anyres_views, image_tokens, plan_anyres, select_best_resolution,
                                   unpadded_window)

LLAVA16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SHAPES = [(500, 500), (800, 400), (300, 900), (20, 15), (900, 60), (61, 45), (1000, 1001), (337, 336)]


def _hf_processor(pinpoints, tile: int, patch: int):
    """A LlavaNextProcessor without a tokenizer: only its token-count methods are used."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
    proc.image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    proc.patch_size, proc.num_additional_image_tokens = patch, 1
    proc.vision_feature_select_strategy = "default"
    return proc


def _image(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed + width * 7 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_best_resolution_equals_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    sizes = [(w, h) for w in (1, 7, 20, 100, 336, 337, 500, 672, 900, 1500, 4000)
             for h in (1, 15, 60, 336, 400, 671, 1008, 3000)]
    for pinpoints in (LLAVA16_PINPOINTS, TINY_PINPOINTS):
        for w, h in sizes:
            assert select_best_resolution((w, h), pinpoints) == tuple(hf_select((h, w), pinpoints)), (w, h)


@pytest.mark.parametrize("pinpoints,tile,patch", [(LLAVA16_PINPOINTS, 336, 14), (TINY_PINPOINTS, 32, 8)])
def test_token_counts_equal_the_processor(pinpoints, tile, patch):
    proc = _hf_processor(pinpoints, tile, patch)
    counts = set()
    for w in (1, 13, 20, 32, 33, 64, 90, 336, 337, 500, 673, 900, 2000):
        for h in (1, 15, 31, 60, 64, 336, 401, 672, 999, 3000):
            ours = image_tokens(w, h, pinpoints, tile, patch)
            assert ours == proc._get_number_of_features(h, w, tile, tile) - 1, (w, h)
            counts.add(ours)
    assert len(counts) > 10  # the grid covers many different layouts


def test_plan_geometry():
    plan = plan_anyres(800, 400, LLAVA16_PINPOINTS, 336, 14)
    assert plan.best_resolution == (336, 672) and plan.grid == (2, 1) and plan.n_views == 3
    assert plan.tokens_per_view == 576
    # 800x400 -> 672x336 exactly: no padding rows
    assert plan.window == (0, 24, 0, 48) and plan.n_tokens == 576 + 24 * 49
    tall = plan_anyres(250, 900, LLAVA16_PINPOINTS, 336, 14)
    assert tall.grid == (1, 3) and tall.window[2] > 0 and tall.window[0] == 0
    assert unpadded_window((100, 50), (24, 24)) == (6, 18, 0, 24)


def test_token_budget_restricts_pinpoints():
    free = plan_anyres(1000, 1000, LLAVA16_PINPOINTS, 336, 14)
    assert free.best_resolution == (672, 672) and free.n_tokens == 576 + 48 * 49
    capped = plan_anyres(1000, 1000, LLAVA16_PINPOINTS, 336, 14, max_tokens=2000)
    assert capped.n_tokens <= 2000 and capped.grid in ((2, 1), (1, 2), (3, 1), (1, 3))
    fitting = [p for p in LLAVA16_PINPOINTS if plan_anyres(1000, 1000, [p], 336, 14).n_tokens <= 2000]
    assert capped.best_resolution == select_best_resolution((1000, 1000), fitting) == (336, 672)
    with pytest.raises(ContextOverflowError, match="at least 1176 image tokens.*budget of 1000"):
        plan_anyres(1000, 1000, LLAVA16_PINPOINTS, 336, 14, max_tokens=1000)


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(InvalidModelError, match="not a multiple of the 336-pixel tile"):
        plan_anyres(100, 100, [[300, 600]], 336, 14)
    with pytest.raises(InvalidModelError, match="is empty"):
        plan_anyres(0, 100, LLAVA16_PINPOINTS, 336, 14)
    with pytest.raises(InvalidModelError, match="pinpoints is empty"):
        select_best_resolution((10, 10), [])
    with pytest.raises(InvalidModelError, match="plan this image first"):
        anyres_views(_image(30, 30), plan_anyres(20, 15, TINY_PINPOINTS, 32, 8), CLIP_MEAN, CLIP_STD)


@pytest.mark.parametrize("pinpoints,tile,patch", [(LLAVA16_PINPOINTS, 336, 14), (TINY_PINPOINTS, 32, 8)])
@pytest.mark.parametrize("size", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_views_equal_image_processor_pixels(pinpoints, tile, patch, size):
    proc = _hf_processor(pinpoints, tile, patch).image_processor
    img = _image(*size)
    ref = proc(images=[img], return_tensors="np")
    assert tuple(ref["image_sizes"][0]) == (size[1], size[0])
    plan = plan_anyres(*size, pinpoints, tile, patch)
    ours = anyres_views(img, plan, CLIP_MEAN, CLIP_STD)
    expected = ref["pixel_values"][0]
    assert ours.shape == expected.shape == (plan.n_views, 3, tile, tile)
    assert ours.dtype == np.float32
    assert float(np.abs(ours - expected).max()) <= 1e-5
