"""Image-token budgets on the generic libmtmd family (SmolVLM2, Qwen2.5-VL, Gemma 3, ...).

Fixture: the tiny Qwen2-VL pair run by the generic family (its own family switched off, as a
Qwen2.5-VL ``qwen2.5vl_merger`` projector would be): libmtmd's native dynamic resolution, so
a budget is met by downscaling. A projector that libmtmd plans at a fixed count is a stub
encoder here: the budget error says the count is fixed.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import edgevlm
from edgevlm.chunks import ImageChunk
from edgevlm.errors import ContextOverflowError
from edgevlm.families.base import blank_image
from edgevlm.families.libmtmd import LibmtmdFamily
from edgevlm.families.qwen2vl import Qwen2VLFamily
from edgevlm.prompt_layout import ImageBudget, check_image_tokens


@pytest.fixture(scope="module")
def generic_vlm(qwen2vl_f32_result):
    patch = pytest.MonkeyPatch()
    patch.setattr(Qwen2VLFamily, "matches", classmethod(lambda cls, model: False))
    try:
        vlm = edgevlm.load(qwen2vl_f32_result.llm_path.parent, n_ctx=1024, n_threads=2, cache=False)
    finally:
        patch.undo()
    yield vlm
    vlm.close()


def _tokens(vlm, path, budget) -> int:
    chunks = vlm.prompt_chunks([{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                             {"type": "text", "text": "Hi"}]}],
                               max_image_tokens=budget)
    return sum(c.n_tokens for c in chunks if isinstance(c, ImageChunk))


def test_the_generic_family_meets_a_budget_by_downscaling(generic_vlm, tmp_path):
    assert generic_vlm.family == "libmtmd"
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (168, 224, 3), dtype=np.uint8)).save(path)
    full = generic_vlm.image_cost(224, 168)
    for budget in (full.tokens // 2, full.tokens // 4):
        cost = generic_vlm.image_cost(224, 168, max_image_tokens=budget)
        assert cost.tokens <= budget < full.tokens
        assert _tokens(generic_vlm, path, budget) == cost.tokens
    with pytest.raises(ContextOverflowError, match=r"libmtmd plans qwen2vl_merger images itself and "
                                                   r"downscaling this one costs no fewer than \d+ tokens"):
        _tokens(generic_vlm, path, 1)


class _FixedEncoder:
    """libmtmd's plan of a fixed-resolution projector (e.g. Gemma 3: 256 tokens per image)."""

    def image_chunks(self, image, *, max_tokens=None):
        return [ImageChunk(key=f"{image.digest}/fixed/0", n_tokens=256, n_pos=256, image=image)]


class _Gemma3Like(LibmtmdFamily):
    projector_type = "gemma3"  # not an area type: the count is measured


def test_a_fixed_count_projector_says_no_smaller_budget_exists(generic_vlm):
    family = _Gemma3Like(generic_vlm.engine.family.model)
    image = blank_image(896, 672)
    assert family.prepare_image(image, 100, _FixedEncoder()) is image  # not downscaled in vain
    with pytest.raises(ContextOverflowError, match=r"libmtmd plans gemma3 images itself at a fixed 256 tokens whatever their size.*"
                                                   r"no smaller budget can be met.*at least 256"):
        check_image_tokens(256, ImageBudget(100, explicit=True), family, image)
