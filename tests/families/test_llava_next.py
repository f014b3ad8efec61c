"""LLaVA-NeXT through the runtime: what the LLM receives equals transformers' packed features.

Tolerances (f32 GGUF, f32 KV): per-token cosine >= 0.9999 and equal token counts for five
image shapes selecting different pinpoints; next-token logits of an image prompt max-abs
<= 5e-3 against LlavaNextForConditionalGeneration. libmtmd's run of the same files is
recorded as different (token count), so an upstream fix shows up here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import edgevlm
from tests.kernels.test_llava_next import SHAPES, hf_packed_features
from tests.reference import cosine_rows, hf_logits, reference_ids


@pytest.fixture(scope="module")
def next_vlm(llava_next_f32_result):
    vlm = edgevlm.load(llava_next_f32_result.llm_path.parent, n_ctx=1024, kv_type="f32", n_threads=2,
                       cache=False)
    yield vlm
    vlm.close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("next_images")
    out = {}
    for name, (w, h) in SHAPES.items():
        rng = np.random.default_rng(w * 7 + h)
        path = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        out[name] = path
    return out


def test_loads_as_llava_next_on_the_kernels(next_vlm):
    assert next_vlm.family == "llava-next" and next_vlm.vision_engine == "kernels"


@pytest.mark.parametrize("name", ["square", "wide", "tall", "tiny", "elongated"])
def test_embed_image_is_transformers_packed_features(next_vlm, llava_next_checkpoint, pictures, name):
    path = pictures[name]
    ours = next_vlm.embed_image(path)
    with Image.open(path) as img:
        ref = hf_packed_features(llava_next_checkpoint, img.convert("RGB"))
    assert ours.shape == ref.shape
    cost = next_vlm.image_cost(*SHAPES[name])
    assert cost.tokens == ours.shape[0] and cost.views >= 1
    assert cosine_rows(ours, ref).min() >= 0.9999


def test_image_prompt_logits_match_transformers(next_vlm, llava_next_checkpoint, pictures):
    messages = [{"role": "user", "content": [{"type": "image", "image": str(pictures["wide"])},
                                             {"type": "text", "text": "What is shown here?"}]}]
    chunks = next_vlm.prompt_chunks(messages)
    image_id = json.loads((llava_next_checkpoint / "config.json").read_text())["image_token_index"]
    ids = reference_ids(chunks, image_id)
    ours = next_vlm.next_token_logits(messages)
    ref = hf_logits(llava_next_checkpoint, ids, pictures["wide"])[-1]
    print(f"LLaVA-NeXT image-prompt logits max-abs {np.abs(ours - ref).max():.2e}")
    assert float(np.abs(ref).max()) > 0.1
    assert float(np.abs(ours - ref).max()) <= 5e-3


def test_follow_up_neither_encodes_nor_rereads(next_vlm, pictures):
    first = [{"role": "user", "content": [{"type": "image", "image": str(pictures["square"])},
                                          {"type": "text", "text": "Describe it."}]}]
    reply = next_vlm.chat(first, max_tokens=3, temperature=0)
    follow = first + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "More?"}]
    second = next_vlm.chat(follow, max_tokens=2, temperature=0)
    assert second.prefill.images_encoded == 0 and second.prefill.reused_positions > 88


def test_libmtmd_gap_is_recorded(llava_next_f32_result, pictures, next_vlm):
    """libmtmd concatenates overview + tiles (no unpad, no newline): another token count."""
    with edgevlm.load(llava_next_f32_result.llm_path.parent, n_ctx=1024, n_threads=2, cache=False,
                      vision_engine="mtmd") as mtmd:
        assert mtmd.family == "llava-next" and mtmd.vision_engine == "mtmd"
        theirs = mtmd.embed_image(pictures["square"])
    assert theirs.shape[0] != next_vlm.embed_image(pictures["square"]).shape[0]
