"""mllama preprocessing (edgevlm.vision.mllama_tiles) against transformers' MllamaImageProcessor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgevlm.errors import InvalidModelError
from edgevlm.vision.mllama_tiles import best_canvas, mllama_tiles, tile_arrangements
from tests.fixtures.internvl import gradient_image
from tests.fixtures.mllama import IMAGE_MEAN, IMAGE_STD, image_processor

RATIOS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
# (width, height): 1, 2, 3 and 4 tiles, wide and tall, up- and down-scaled, odd sizes.
SIZES = [(56, 56), (30, 20), (112, 56), (56, 112), (168, 50), (40, 150), (100, 100),
         (300, 90), (90, 300), (223, 97), (640, 480), (57, 55)]


def _ours(img: Image.Image, max_image_tiles: int = 4):
    return mllama_tiles(img, tile_size=56, max_image_tiles=max_image_tiles, max_num_tiles=4,
                        aspect_ratios=RATIOS, mean=IMAGE_MEAN, std=IMAGE_STD)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiles_equal_transformers(size):
    img = gradient_image(*size, seed=size[0])
    ref = image_processor()(images=[[img]], return_tensors="np")
    ours = _ours(img)
    assert ours.aspect_ratio_id == int(ref["aspect_ratio_ids"][0, 0])
    np.testing.assert_array_equal(ours.aspect_ratio_mask, ref["aspect_ratio_mask"][0, 0])
    assert ref["num_tiles"] == [[ours.n_tiles]]
    np.testing.assert_array_equal(ours.pixels, ref["pixel_values"][0, 0])


def test_every_tile_count_is_reached():
    counts = {_ours(gradient_image(*size)).n_tiles for size in SIZES}
    assert counts == {1, 2, 3, 4}


def test_fewer_tiles_allowed_than_the_encoder_takes():
    img = gradient_image(300, 90)
    ref = image_processor()(images=[[img]], max_image_tiles=2, return_tensors="np")
    ours = _ours(img, max_image_tiles=2)
    assert ours.arrangement == (1, 2) and ours.aspect_ratio_id == int(ref["aspect_ratio_ids"][0, 0])
    np.testing.assert_array_equal(ours.pixels[:2], ref["pixel_values"][0, 0, :2])
    assert not ours.pixels[2:].any()


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (60, 70), (255, 0, 0, 0))  # fully transparent: white after compositing
    ref = image_processor()(images=[[rgba]], return_tensors="np")
    np.testing.assert_array_equal(_ours(rgba).pixels, ref["pixel_values"][0, 0])


def test_arrangements_and_canvas():
    assert tile_arrangements(4) == RATIOS
    assert best_canvas(50, 168, 4, 56) == (56, 168)
    assert best_canvas(1000, 1000, 4, 56) == (112, 112)


def test_arrangement_unknown_to_the_model_is_refused():
    with pytest.raises(InvalidModelError, match="1x2 tiles"):
        mllama_tiles(gradient_image(112, 56), tile_size=56, max_image_tiles=4, max_num_tiles=4,
                     aspect_ratios=[(1, 1)], mean=IMAGE_MEAN, std=IMAGE_STD)
    with pytest.raises(InvalidModelError, match="exceeds"):
        mllama_tiles(gradient_image(56, 56), tile_size=56, max_image_tiles=5, max_num_tiles=4,
                     aspect_ratios=RATIOS, mean=IMAGE_MEAN, std=IMAGE_STD)
