"""examples/make_bench_model.py: builds a loadable GGUF pair (here in a tiny shape)."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

import edgevlm
from tests.fixtures.checkpoints import build_llava_checkpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "make_bench_model.py"


def _example():
    spec = importlib.util.spec_from_file_location("make_bench_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_shape_matches_the_builder():
    params = inspect.signature(build_llava_checkpoint).parameters
    shape = _example().BENCH_SHAPE
    assert set(shape) <= set(params)
    assert (shape["vision_hidden"], shape["image_size"], shape["patch_size"]) == (768, 224, 16)
    assert (shape["text_hidden"], shape["text_layers"], shape["vocab_size"]) == (896, 24, 32000)


def test_make_bench_model_builds_a_loadable_pair(tmp_path, painting):
    tiny = dict(tower="clip", text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_ffn=256,
                vision_hidden=64, vision_layers=2, vision_heads=4, image_size=32, patch_size=8)
    out = _example().make_bench_model(tmp_path / "bench", shape=tiny)
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and any(n.startswith("mmproj-") for n in names)  # checkpoint removed
    with edgevlm.load(out, n_ctx=256, n_threads=1, cache=False) as vlm:
        messages = [{"role": "user", "content": [{"type": "image", "image": str(painting)},
                                                 {"type": "text", "text": "What is it?"}]}]
        assert vlm.next_token_logits(messages).shape == (vlm.n_vocab,)
        assert vlm.engine.last_prefill.images_encoded == 1


def test_llava_next_shape_is_the_llava_v16_layout():
    example = _example()
    shape = example.family_shape("llava-next")
    assert "tower" not in shape and shape["pinpoints"] == [[336, 672], [672, 336], [672, 672],
                                                           [1008, 336], [336, 1008]]
    assert (shape["vision_hidden"], shape["vision_layers"], shape["image_size"], shape["patch_size"]) == (
        1024, 24, 336, 14)
    assert (shape["text_hidden"], shape["text_layers"], shape["vocab_size"]) == (896, 24, 32000)
    assert example.family_shape("llava") == example.BENCH_SHAPE
    with pytest.raises(ValueError, match="CLIP tower"):
        example.family_shape("llava-next", "siglip-l14-336")
    with pytest.raises(ValueError, match="family must be one of"):
        example.family_shape("qwen")


def test_make_bench_model_builds_a_loadable_llava_next_pair(tmp_path, painting):
    from tests.fixtures.llava_next import TINY_PINPOINTS

    tiny = dict(text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_ffn=256, vision_hidden=64,
                vision_layers=2, vision_heads=4, image_size=32, patch_size=8, pinpoints=TINY_PINPOINTS,
                torch_dtype="float16")
    out = _example().make_bench_model(tmp_path / "bench", shape=tiny, family="llava-next")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench-llava-next-Q8_0.gguf", "mmproj-bench-llava-next-f16.gguf"], names
    with edgevlm.load(out, n_ctx=512, n_threads=1, cache=False) as vlm:
        assert vlm.family == "llava-next" and vlm.vision_engine == "kernels"
        cost = vlm.image_cost(64, 64)
        assert cost.views == 5  # the 2x2 pinpoint + the base view
        assert vlm.embed_image(str(painting), cache=False).shape[0] == vlm.image_cost(128, 96).tokens
