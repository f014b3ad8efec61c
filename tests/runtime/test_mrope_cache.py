"""KV-prefix caching is exact for M-RoPE models (Qwen2-VL).

With M-RoPE an image chunk takes ``n_tokens`` KV cells but advances the
position by only ``max(grid_w, grid_h)``, every image cell shares its
temporal position, and text after it continues from there. A follow-up that
reuses the cached prefix must give the same logits as evaluating it from
scratch: bitwise on CPU (same batch split), else within 1e-4. The follow-ups
built from images transformers sees unresized are also checked against
transformers' full forward (max-abs <= 2e-3, measured ~2e-4), so the reused
positions are not just self-consistent but right.
"""

from __future__ import annotations

import numpy as np
import pytest

import edgevlm
from edgevlm import native
from edgevlm.errors import ContextOverflowError
from tests.cache_helpers import assert_cached_matches_full
from tests.reference import hf_logits, reference_ids

ATOL = 1e-4 if native.llama().llama_supports_gpu_offload() else 0.0
IMAGE_TOKEN = "<|image_pad|>"


def _image(path):
    return {"type": "image", "image": str(path)}


def _text(text):
    return {"type": "text", "text": text}


def _layouts(square_image):
    a, b = square_image(112, seed=11), square_image(168, seed=12, height=56)
    return {
        "image_first": ([{"role": "user", "content": [_image(a), _text("What is this?")]}], [a]),
        "image_middle": ([{"role": "user", "content": [
            _text("Look at"), _image(b), _text("and tell me the genre.")]}], [b]),
        "two_images": ([{"role": "user", "content": [
            _image(a), _image(b), _text("Compare them.")]}], [a, b]),
    }


def _follow(turns):
    return turns + [{"role": "assistant", "content": "It is a test picture."},
                    {"role": "user", "content": "Say more about the colours."}]


@pytest.mark.parametrize("layout", ["image_first", "image_middle", "two_images"])
def test_follow_up_equals_full_evaluation(qwen2vl_vlm, qwen2vl_checkpoint, square_image, layout):
    turns, images = _layouts(square_image)[layout]
    follow = _follow(turns)
    run = assert_cached_matches_full(qwen2vl_vlm, turns, follow, atol=ATOL)
    pre = run.stats
    assert run.encoder_calls == 0, "the follow-up ran the vision encoder"
    assert pre.images_encoded == 0 and pre.images_from_cache == 0
    assert pre.reused_positions == run.first_positions, "the first turn was not reused whole"
    assert pre.evaluated_positions == pre.prompt_positions - run.first_positions
    image_id = qwen2vl_vlm.engine.model.tokenize(IMAGE_TOKEN, add_special=False)[0]
    ids = reference_ids(qwen2vl_vlm.prompt_chunks(follow), image_id)
    ref = hf_logits(qwen2vl_checkpoint, ids, images, image_id)[-1]
    assert float(np.abs(run.cached - ref).max()) <= 2e-3


def test_new_question_truncates_after_the_image(qwen2vl_vlm, square_image):
    """Same image, other question: the KV tail after the image is dropped, not the image."""
    image = square_image(112, seed=13)
    first = [{"role": "user", "content": [_image(image), _text("What is this?")]}]
    other = [{"role": "user", "content": [_image(image), _text("Which colours dominate?")]}]
    run = assert_cached_matches_full(qwen2vl_vlm, first, other, atol=ATOL)
    assert run.encoder_calls == 0 and run.stats.images_from_cache == 0
    chunks = qwen2vl_vlm.prompt_chunks(other)
    image_end = chunks[0].n_pos + chunks[1].n_pos
    assert image_end <= run.stats.reused_positions < run.first_positions


def test_divergence_before_the_image_redecodes_it(qwen2vl_vlm, square_image):
    """A change before the image removes its cells; it is decoded again from the embedding cache."""
    image = square_image(112, seed=14)
    first = [{"role": "user", "content": [_text("Look at"), _image(image), _text("Genre?")]}]
    other = [{"role": "user", "content": [_text("Now see"), _image(image), _text("Genre?")]}]
    run = assert_cached_matches_full(qwen2vl_vlm, first, other, atol=ATOL)
    assert run.encoder_calls == 0 and run.stats.images_from_cache == 1


def test_snapshot_restore_equals_full_evaluation(qwen2vl_f32_result, square_image):
    """The persistent KV snapshot of an M-RoPE image prefix restores exactly."""
    folder, image = qwen2vl_f32_result.llm_path.parent, square_image(112, seed=15)

    def ask(question):
        return [{"role": "user", "content": [_image(image), _text(question)]}]

    def load(**kw):
        return edgevlm.load(folder, n_ctx=512, kv_type="f32", n_threads=2, **kw)

    with load() as first:
        first.next_token_logits(ask("What genre is it?"))
    with load() as second:
        restored = second.next_token_logits(ask("Which colours dominate?"))
        assert second.engine.last_prefill.snapshot_restored
        assert second.encoder_calls == 0
    with load(cache=False) as fresh:
        full = fresh.next_token_logits(ask("Which colours dominate?"))
    np.testing.assert_allclose(restored, full, rtol=0, atol=ATOL)


# --- KV cells, not positions, bound an M-RoPE context ------------------------------
def test_prompt_needing_more_cells_than_the_context_is_refused(qwen2vl_f32_result, square_image):
    """448x448 -> 256 image cells but only 16 positions: over a 256-cell context.

    The default image budget keeps the image to 3/4 of the context (192 cells); the long
    question then takes the cells over 256.
    """
    question = " ".join(["What is in the picture, and what colours does it have?"] * 6)
    messages = [{"role": "user", "content": [_image(square_image(448)), _text(question)]}]
    with edgevlm.load(qwen2vl_f32_result.llm_path.parent, n_ctx=256, n_threads=2,
                      cache=False) as vlm:
        assert sum(c.n_pos for c in vlm.prompt_chunks(messages)) < 256
        with pytest.raises(ContextOverflowError, match="256"):
            vlm.chat(messages, max_tokens=4, temperature=0)
        assert vlm.encoder_calls == 0, "the image was encoded before the overflow was noticed"


def test_generation_stops_when_the_cells_run_out(qwen2vl_f32_result, square_image):
    """392x392 -> 196 image cells, 14 positions: the reply ends with 'length', no failure."""
    messages = [{"role": "user", "content": [_image(square_image(392)), _text("What?")]}]
    with edgevlm.load(qwen2vl_f32_result.llm_path.parent, n_ctx=256, n_threads=2,
                      cache=False) as vlm:
        cells = sum(getattr(c, "n_tokens", c.n_pos) for c in vlm.prompt_chunks(messages))
        assert cells + 8 < 256 < cells + 64
        reply = vlm.chat(messages, max_tokens=64, temperature=0)
    assert reply.finish_reason == "length"
    assert cells + reply.completion_tokens - 1 <= 256
