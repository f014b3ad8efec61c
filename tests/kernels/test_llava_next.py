"""LLaVA-NeXT image features on the kernels engine against transformers (and libmtmd's gap).

Reference: ``LlavaNextModel.get_image_features(pixel_values, image_sizes)``,
whose ``pooler_output`` in transformers 5 is the list of *packed* per-image
features (base view, unpadded tile grid, a newline per row). Tolerance (f32
GGUF): per-token cosine >= 0.9999 and the same token count, for five shapes
that select different pinpoints. Batched tower vs one view at a time:
max-abs <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm.errors import InvalidModelError
from edgevlm.families.llava_next import encode_anyres, is_anyres, read_anyres_spec
from edgevlm.kernels.anyres import pack_anyres
from edgevlm.kernels.vision import VisionTower
from edgevlm.vision.anyres import plan_anyres
from tests.convert.test_llava_next import mtmd_embeddings
from tests.fixtures.llava_next import TINY_PINPOINTS
from tests.reference import cosine_rows, hf_model

# square, wide, tall, tiny, very elongated: (64, 64), (32, 64), (64, 32), (64, 32)*, (32, 96) pinpoints
SHAPES = {"square": (64, 64), "wide": (90, 45), "tall": (40, 100), "tiny": (20, 15), "elongated": (300, 40),
          "extreme": (300, 20)}
"""Pinpoints (h, w): (64, 64), (32, 64), (96, 32), (32, 64), (32, 96), (32, 96). At 300x20 the unpadded
tile grid has no rows left (transformers' unpad_image rounds 0.8 rows down): base view only."""


def _picture(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed + width + 3 * height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_packed_features(checkpoint, picture) -> np.ndarray:
    """transformers' packed image features (n_tokens, LLM width) for one image."""
    import torch
    from transformers import AutoImageProcessor

    inputs = AutoImageProcessor.from_pretrained(checkpoint)(images=[picture], return_tensors="pt")
    with torch.no_grad():
        out = hf_model(checkpoint).model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    return out.pooler_output[0].float().numpy()


@pytest.fixture(scope="module")
def tower(llava_next_f32_result):
    t = VisionTower(llava_next_f32_result.mmproj_path, device="cpu", n_threads=2)
    yield t
    t.close()


@pytest.fixture(scope="module")
def spec(llava_next_f32_result):
    return read_anyres_spec(llava_next_f32_result.mmproj_path)


def test_spec_reads_the_file(tower, spec, llava_next_checkpoint):
    assert is_anyres(tower.meta)
    assert spec.pinpoints == tuple(tuple(p) for p in TINY_PINPOINTS)
    assert (spec.tile_size, spec.patch_size) == (32, 8)
    ref = hf_model(llava_next_checkpoint).model.image_newline.detach().numpy()
    np.testing.assert_array_equal(spec.newline, ref)


def test_shapes_select_different_pinpoints(spec):
    chosen = {name: spec.plan(*size).best_resolution for name, size in SHAPES.items()}
    assert len(set(chosen.values())) >= 4, chosen


@pytest.mark.parametrize("name", list(SHAPES))
def test_packed_features_match_transformers(tower, spec, llava_next_checkpoint, name):
    picture = _picture(*SHAPES[name])
    ours = encode_anyres(tower, spec, picture)
    ref = hf_packed_features(llava_next_checkpoint, picture)
    plan = spec.plan(*picture.size)
    assert ours.shape == ref.shape == (plan.n_tokens, 128)
    cos = cosine_rows(ours, ref)
    print(f"LLaVA-NeXT {name} {picture.size} -> {plan.best_resolution}: {plan.n_tokens} tokens, "
          f"cosine min {cos.min():.7f}, max-abs {np.abs(ours - ref).max():.2e}")
    assert cos.min() >= 0.9999


def test_batched_views_equal_single_views(tower, spec):
    from edgevlm.vision.anyres import anyres_views

    picture = _picture(64, 64, seed=4)
    plan = spec.plan(*picture.size)
    views = anyres_views(picture, plan, tower.config.image_mean, tower.config.image_std)
    batched = tower.encode_views(views)
    single = np.stack([tower.encode(v) for v in views])
    assert batched.shape == single.shape == (5, 16, 128)
    assert float(np.abs(batched - single).max()) <= 1e-4
    with pytest.raises(InvalidModelError, match=r"\(n, 3, 32, 32\)"):
        tower.encode_views(views[0])


def test_packing_follows_the_plan():
    plan = plan_anyres(90, 45, TINY_PINPOINTS, 32, 8)  # 2 tiles side by side, 2 padding rows each side
    assert plan.grid == (2, 1) and plan.window == (0, 4, 0, 8)
    feats = np.arange(3 * 16 * 2, dtype=np.float32).reshape(3, 16, 2)
    packed = pack_anyres(feats, plan, np.array([-1.0, -2.0], dtype=np.float32))
    assert packed.shape == (16 + 4 * 9, 2)
    np.testing.assert_array_equal(packed[:16], feats[0])
    # first grid row: tile 0's patch row 0, then tile 1's, then the newline
    np.testing.assert_array_equal(packed[16:20], feats[1, 0:4])
    np.testing.assert_array_equal(packed[20:24], feats[2, 0:4])
    np.testing.assert_array_equal(packed[24], [-1.0, -2.0])
    with pytest.raises(InvalidModelError, match="the plan needs"):
        pack_anyres(feats[:2], plan, np.zeros(2, np.float32))


def test_libmtmd_gap_is_as_recorded(llava_next_f32_result, tower, spec):
    """libmtmd (llama-cpp-python 0.3.36) runs the views but neither unpads nor adds newlines.

    It emits one chunk per view (overview first, then tiles), each the full
    16 patch tokens; images within one tile get the overview only. Its
    overview is also resized by its own code, so it is not transformers'
    base view. If this test fails, upstream changed: compare again.
    """
    res = llava_next_f32_result
    for name, size in SHAPES.items():
        picture = _picture(*size)
        plan = spec.plan(*size)
        chunks = mtmd_embeddings(res.llm_path, res.mmproj_path, picture)
        theirs = np.concatenate(chunks)
        ours = encode_anyres(tower, spec, picture)
        fits_one_tile = max(size) <= spec.tile_size
        assert len(chunks) == (1 if fits_one_tile else plan.n_views), name
        assert all(c.shape == (16, 128) for c in chunks) and theirs.shape[0] != ours.shape[0], name
        base_cos = cosine_rows(chunks[0], ours[:16])
        print(f"libmtmd {name} {size}: {theirs.shape[0]} tokens vs {ours.shape[0]}; overview vs base "
              f"view cosine min {base_cos.min():.5f} mean {base_cos.mean():.5f}")
        # its overview is not the reference base view either (own resize; CLS placed last, see
        # edgevlm.kernels.vision's docstring)
        assert base_cos.min() < 0.99, name


def test_third_party_llava16_mmproj_runs_the_same(llava_next_f32_result, llava_next_checkpoint, tower,
                                                   spec, tmp_path):
    """The layout llama.cpp's legacy converter writes for llava-1.6 (tests/llama_cpp_mmproj.py): last
    block dropped, block_count = blocks kept, no post-LN, fc1 stored as ``ffn_down``, no feature_layer,
    no edgevlm keys, ``model.image_newline``. The kernels run every stored block with the FFN unswapped."""
    from tests.llama_cpp_mmproj import write_llama_cpp_mmproj

    path = write_llama_cpp_mmproj(llava_next_f32_result.mmproj_path, llava_next_checkpoint,
                                  tmp_path / "mmproj-model-f16.gguf")
    third = VisionTower(path, device="cpu", n_threads=2)
    try:
        cfg = third.config
        assert "edgevlm.version" not in third.meta and "v.post_ln.weight" not in third.weights
        assert cfg.n_layers == cfg.block_count == tower.config.n_layers and not cfg.post_ln
        third_spec = read_anyres_spec(path)
        np.testing.assert_array_equal(third_spec.newline, spec.newline)
        for name in ("wide", "tall"):
            picture = _picture(*SHAPES[name])
            ours = encode_anyres(third, third_spec, picture)
            ref = hf_packed_features(llava_next_checkpoint, picture)
            assert ours.shape == ref.shape and cosine_rows(ours, ref).min() >= 0.9999, name
    finally:
        third.close()
