"""Pricing an image by its size: intake's downscale first, and no pixels allocated.

Images over :data:`~edgevlm.vision.images.MAX_SIDE` are shrunk at intake, so a
4100x2562 image is planned as 4096x2560 (the request's size), and pricing a
12000x12000 image must not allocate its 412 MiB of blank pixels.
"""

from __future__ import annotations

import tracemalloc

import pytest
from PIL import Image

import edgevlm
from edgevlm.chunks import ImageChunk
from edgevlm.vision.images import MAX_SIDE, intake_size

BIG = (4100, 2562)


@pytest.fixture(scope="module")
def next_vlm(llava_next_f32_result):
    vlm = edgevlm.load(llava_next_f32_result.llm_path.parent, n_ctx=1024, n_threads=2, cache=False)
    yield vlm
    vlm.close()


@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.png"
    Image.new("RGB", BIG, (40, 120, 200)).save(path)
    return path


def _request_tokens(vlm, path) -> int:
    chunks = vlm.prompt_chunks([{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                             {"type": "text", "text": "Hi"}]}])
    return sum(c.n_tokens for c in chunks if isinstance(c, ImageChunk))


def test_intake_size_is_what_load_image_gives(big_png):
    assert intake_size(*BIG) == (MAX_SIDE, 2560)
    image = edgevlm.load_image(big_png)
    assert (image.width, image.height) == intake_size(*BIG)
    assert intake_size(640, 480) == (640, 480)


def test_cost_of_an_image_over_the_intake_side_is_the_request(next_vlm, qwen2vl_vlm, big_png):
    for vlm in (next_vlm, qwen2vl_vlm):
        assert vlm.image_cost(*BIG).tokens == _request_tokens(vlm, big_png), vlm.family.name
        assert vlm.image_cost(*BIG) == vlm.image_cost(*intake_size(*BIG))


def test_header_only_pricing_plans_the_intake_size(next_vlm):
    family = next_vlm.engine.family
    planned = family.planned_image_cost(*BIG, None, "kernels")
    assert planned is not None and planned.tokens == next_vlm.image_cost(*BIG).tokens
    assert planned == family.planned_image_cost(*intake_size(*BIG), None, "kernels")


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_pricing_a_huge_size_allocates_no_pixels(next_vlm, qwen2vl_vlm):
    """12000x12000 (412 MiB of RGB): the kernels plan reads the size only; libmtmd, which plans
    from a bitmap, gets one of at most the intake size (4096x4096x3 = 48 MiB)."""
    peak = _peak_bytes(lambda: next_vlm.image_cost(12000, 12000))
    assert peak < 2 * 2**20, peak
    peak = _peak_bytes(lambda: qwen2vl_vlm.image_cost(12000, 12000))
    assert peak < MAX_SIDE * MAX_SIDE * 3 + 8 * 2**20, peak
