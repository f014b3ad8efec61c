"""edgevlm.vision.internvl_tiles against transformers' InternVL processor (GotOcr2, PIL backend).

Pixels: max-abs <= 1e-5 against ``pixel_values``; token counts: the number of
``<IMG_CONTEXT>`` tokens ``InternVLProcessor`` writes, and its
``<img>...</img>`` framing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgevlm.errors import InvalidRequestError
from edgevlm.vision.internvl_tiles import (budget_max_tiles, closest_grid, image_tokens,
                                           plan_tiles, tile_views, tokens_per_tile)
from tests.fixtures.internvl import (InternVLSizes, gradient_image, image_processor,
                                     load_processor)

SIZES = InternVLSizes()
S = SIZES.image_size
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)



@pytest.mark.parametrize(("size", "grid", "views"), [
    ((56, 56), (1, 1), 1),     # exactly one tile, no resize
    ((70, 70), (1, 1), 1),     # one tile, resized (area below half of 2x2)
    ((170, 57), (3, 1), 4),    # 3 tiles + thumbnail
    ((100, 100), (2, 2), 5),   # 4 tiles + thumbnail
    ((150, 100), (3, 2), 7),   # 6 tiles + thumbnail
    ((45, 130), (1, 3), 4),    # tall
])
def test_views_match_processor(size: tuple[int, int], grid: tuple[int, int], views: int) -> None:
    img = gradient_image(*size)
    plan = plan_tiles(*size, 1, SIZES.max_tiles, S)
    assert (plan.columns, plan.rows) == grid
    assert plan.n_tiles == views
    ours = tile_views(img, plan, MEAN, STD)
    ref = image_processor(SIZES)(images=[img], return_tensors="np")
    assert list(ref["num_patches"]) == [views]
    theirs = np.asarray(ref["pixel_values"], dtype=np.float32)
    assert ours.shape == theirs.shape == (views, 3, S, S)
    assert float(np.abs(ours - theirs).max()) <= 1e-5


def test_grid_choice_matches_transformers_everywhere() -> None:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas)

    rng = np.random.default_rng(3)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 3000, (400, 2))]
    sizes += [(448 * c, 448 * r) for c in range(1, 7) for r in range(1, 7)]
    for lo, hi in ((1, 12), (1, 6), (2, 9), (1, 1), (4, 4)):
        for w, h in sizes:
            assert closest_grid(w, h, 448, lo, hi) == get_optimal_tiled_canvas(
                (h, w), (448, 448), lo, hi), (w, h, lo, hi)


@pytest.fixture(scope="module")
def processor(internvl_checkpoint: Path):
    return load_processor(internvl_checkpoint)


@pytest.mark.parametrize("size", [(56, 56), (70, 70), (170, 57), (100, 100), (150, 100),
                                  (640, 480), (30, 400)])
def test_token_count_and_layout_match_processor(processor, size: tuple[int, int]) -> None:
    tok = processor.tokenizer
    out = processor(images=[gradient_image(*size)], text=["a <IMG_CONTEXT>\nb"],
                    return_tensors="np")
    ids = list(out["input_ids"][0])
    n = image_tokens(*size, tile_size=S, patch_size=SIZES.patch_size, max_tiles=SIZES.max_tiles)
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids.count(context) == n
    # one <img> ... </img> span holding all the tiles' tokens back to back
    start, end = ids.index(tok.convert_tokens_to_ids("<img>")), ids.index(
        tok.convert_tokens_to_ids("</img>"))
    assert ids[start + 1:end] == [context] * n
    assert ids.count(tok.convert_tokens_to_ids("<img>")) == 1


def test_tokens_per_tile_is_the_shuffled_patch_grid() -> None:
    assert tokens_per_tile(448, 14) == 256          # InternVL2.5 / 3 / 3.5
    assert tokens_per_tile(S, SIZES.patch_size) == SIZES.tokens_per_tile == 16
    with pytest.raises(InvalidRequestError, match="multiple of the patch size"):
        tokens_per_tile(450, 14)
    with pytest.raises(InvalidRequestError, match="does not shuffle"):
        tokens_per_tile(98, 14)                    # 7x7 patches


def test_max_tokens_lowers_max_tiles(processor) -> None:
    per = SIZES.tokens_per_tile
    assert budget_max_tiles(13 * per, per) == 12
    assert budget_max_tiles(12 * per, per) == 11   # 11 tiles + thumbnail
    assert budget_max_tiles(2 * per, per) == 1     # 2 tiles would need a thumbnail too
    assert budget_max_tiles(per, per) == 1
    with pytest.raises(InvalidRequestError, match="raise max_tokens"):
        budget_max_tiles(per - 1, per)
    size = (640, 480)
    budget = 7 * per
    n = image_tokens(*size, tile_size=S, patch_size=SIZES.patch_size, max_tokens=budget)
    assert n <= budget
    ref = image_processor(SIZES)(images=[gradient_image(*size)],
                                 max_patches=budget_max_tiles(budget, per), return_tensors="np")
    assert int(ref["num_patches"][0]) * per == n


def test_bad_limits_are_reported() -> None:
    with pytest.raises(InvalidRequestError, match="min_tiles <= max_tiles"):
        plan_tiles(100, 100, 5, 2)
    with pytest.raises(InvalidRequestError, match="image size must be positive"):
        plan_tiles(0, 100)
