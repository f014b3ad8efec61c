"""The runtime family registry: every family matches what its converter writes; unknown projectors are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgevlm
import edgevlm.families
from edgevlm.descriptor import ModelFiles, describe_model
from edgevlm.errors import UnsupportedModelError
from edgevlm.families import FAMILIES, ImageCost, family_for, load_builtin_families
from edgevlm.resolve import resolve
from tests.helpers import synthetic_descriptor


def _family_of(folder) -> str:
    return family_for(describe_model(resolve(folder))).name


def test_every_builtin_family_is_registered():
    load_builtin_families()
    builtin = {"llava", "llava-next", "internvl", "omnifusion", "qwen2vl", "libmtmd", "text", "mllama"}
    assert builtin <= set(FAMILIES)
    for cls in FAMILIES.values():
        assert cls.name and cls.describes, f"{cls.__name__} must say what it is"
    # every module of edgevlm/families registers a family, and each of those is listed above
    folder = Path(edgevlm.families.__file__).parent
    modules = {f"edgevlm.families.{p.stem}" for p in folder.glob("*.py") if p.stem not in ("__init__", "base")}
    ours = {name: cls.__module__ for name, cls in FAMILIES.items() if cls.__module__.startswith("edgevlm.")}
    assert set(ours.values()) == modules and set(ours) == builtin


def test_fixture_pairs_find_their_families(clip_f32, siglip_f32, omnifusion_f32, qwen2vl_f32_result):
    assert _family_of(clip_f32) == "llava"
    assert _family_of(siglip_f32) == "llava"
    assert _family_of(omnifusion_f32) == "omnifusion"
    assert _family_of(qwen2vl_f32_result.llm_path.parent) == "qwen2vl"
    files = resolve(clip_f32)
    assert family_for(describe_model(ModelFiles(files.llm, None))).name == "text"


@pytest.mark.parametrize("projector_type", ["gemma3", "idefics3", "qwen2.5vl_merger", "ldp"])
def test_other_libmtmd_projectors_fall_back_to_libmtmd(projector_type):
    family = family_for(synthetic_descriptor({"clip.projector_type": projector_type}))
    assert family.name == "libmtmd"
    assert family.choose_engine("auto") == "mtmd"
    assert family.default_chat_format() == ("llava-1.5" if projector_type == "ldp" else "chatml")


def test_unknown_projector_is_refused_listing_the_families():
    with pytest.raises(UnsupportedModelError) as info:
        family_for(synthetic_descriptor({"clip.projector_type": "holographic"}))
    message = str(info.value)
    assert "'holographic'" in message
    for name in ("llava", "omnifusion", "qwen2vl", "libmtmd"):
        assert name in message
    with pytest.raises(UnsupportedModelError, match="edgevlm-future"):
        family_for(synthetic_descriptor({"edgevlm.projector.kind": "edgevlm-future",
                                         "clip.projector_type": "mlp"}))


def test_registering_a_taken_name_is_refused():
    from edgevlm.families.base import Family, register

    class Clash(Family):
        name = "llava"

    with pytest.raises(ValueError, match="already registered"):
        register(Clash)


def _actual_cost(vlm: edgevlm.VLM, image) -> ImageCost:
    chunks = vlm.engine.image_chunks(edgevlm.load_image(image))
    return ImageCost(tokens=sum(c.n_tokens for c in chunks), positions=sum(c.n_pos for c in chunks),
                     cells=sum(c.n_cells for c in chunks), views=sum(c.n_views for c in chunks))


@pytest.mark.parametrize("size", [(32, 32), (61, 45), (40, 96)])
def test_image_cost_is_what_the_encoder_makes(siglip_vlm, qwen2vl_vlm, square_image, tmp_path, size):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", size, (200, 30, 90)).save(path)
    for vlm in (siglip_vlm, qwen2vl_vlm):
        assert vlm.image_cost(*size) == _actual_cost(vlm, path), vlm.family
    # M-RoPE: a Qwen2-VL image advances fewer positions than the cells it fills
    big = qwen2vl_vlm.image_cost(112, 84)
    assert big.cells > big.positions


def test_tiled_image_cost_counts_the_views_the_tower_encodes(llava_next_f32_result, clip_f32):
    from edgevlm.vision.anyres import fit_anyres
    from tests.fixtures.llava_next import TINY_PINPOINTS

    folder = llava_next_f32_result.llm_path.parent
    with edgevlm.load(folder, n_ctx=2048, n_threads=2, cache=False, vision_engine="kernels") as vlm:
        for size, budget in (((64, 64), None), ((300, 100), None), ((64, 64), 40)):
            plan = fit_anyres(*size, [tuple(p) for p in TINY_PINPOINTS], 32, 8, budget)
            cost = vlm.image_cost(*size, max_image_tokens=budget)
            assert (cost.tokens, cost.views) == (plan.n_tokens, plan.n_views), (size, budget)
        assert vlm.image_cost(64, 64).views == 5  # the 2x2 grid + the base view
    with edgevlm.load(folder, n_ctx=2048, n_threads=2, cache=False, vision_engine="mtmd") as vlm:
        assert vlm.image_cost(64, 64).views == 5  # libmtmd: one chunk per view
    with edgevlm.load(clip_f32, n_ctx=2048, n_threads=2, cache=False) as vlm:
        per_view = vlm.image_cost(64, 32).tokens
    with edgevlm.load(clip_f32, n_ctx=2048, n_threads=2, cache=False, tiles="grid") as vlm:
        wide = vlm.image_cost(64, 32)  # the 1x2 grid + the overview
        assert (wide.views, wide.tokens) == (3, 3 * per_view)
        assert vlm.image_cost(64, 32, max_image_tokens=per_view).views == 1  # the overview alone


def test_omnifusion_image_cost_counts_its_delimiters(omnifusion_f32, wide_png):
    with edgevlm.load(omnifusion_f32, n_ctx=1024, n_threads=2, cache=False) as vlm:
        cost = vlm.image_cost(70, 45)
        chunks = vlm.prompt_chunks([{"role": "user", "content": [{"type": "image", "image": str(wide_png)}]}])
        soi = next(i for i, c in enumerate(chunks) if getattr(c, "key", "").startswith("SOI/"))
        eoi = next(i for i, c in enumerate(chunks) if getattr(c, "key", "").startswith("EOI/"))
        assert cost.tokens == sum(c.n_cells for c in chunks[soi:eoi + 1])


@pytest.fixture()
def wide_png(tmp_path):
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.new("RGB", (70, 45), (10, 200, 30)).save(path)
    return path
