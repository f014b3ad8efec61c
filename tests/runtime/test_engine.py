"""Engine behaviour: prefix reuse, multi-turn equivalence, generation options."""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm.generation import StopMatcher
from tests.cache_helpers import assert_cached_matches_full


def _image_msg(image, text):
    return {"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": text}]}


def test_follow_up_reuses_prefix_and_does_not_reencode(siglip_vlm, painting):
    vlm = siglip_vlm
    vlm.reset()
    first = [_image_msg(painting, "Describe the painting.")]
    reply = vlm.chat(first, max_tokens=8, temperature=0)
    calls = vlm.encoder_calls
    follow = first + [{"role": "assistant", "content": reply.text},
                      {"role": "user", "content": "And the colours?"}]
    stream = vlm.stream(follow, max_tokens=4, temperature=0)
    "".join(stream)
    pre = stream.stats.prefill
    assert vlm.encoder_calls == calls, "the image was encoded again"
    assert pre.images_encoded == 0 and pre.images_from_cache == 0
    assert pre.reused_positions > 0
    assert pre.evaluated_positions < pre.prompt_positions - 10


@pytest.mark.parametrize("layout", ["text", "image_first", "image_middle", "two_images"])
def test_cached_logits_equal_full_evaluation(siglip_vlm, painting, square_image, layout):
    other = square_image(40, seed=9)
    turns = {
        "text": [{"role": "user", "content": "Hello there, who are you?"}],
        "image_first": [_image_msg(painting, "What is this?")],
        "image_middle": [{"role": "user", "content": [
            {"type": "text", "text": "Look at"}, {"type": "image", "image": str(painting)},
            {"type": "text", "text": "and tell me the genre."}]}],
        "two_images": [{"role": "user", "content": [
            {"type": "image", "image": str(painting)}, {"type": "image", "image": str(other)},
            {"type": "text", "text": "Compare them."}]}],
    }[layout]
    follow = turns + [{"role": "assistant", "content": "It is a test picture."},
                      {"role": "user", "content": "Say more about the colours."}]
    assert_cached_matches_full(siglip_vlm, turns, follow)


def test_multi_turn_conversation_equals_from_scratch_generation(siglip_vlm, painting):
    vlm = siglip_vlm
    vlm.reset()
    msgs = [_image_msg(painting, "Describe it.")]
    r1 = vlm.chat(msgs, max_tokens=6, temperature=0)
    msgs += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "Shorter please."}]
    cached = vlm.chat(msgs, max_tokens=6, temperature=0).text
    vlm.reset()
    fresh = vlm.chat(msgs, max_tokens=6, temperature=0).text
    assert cached == fresh


def test_stream_concatenates_to_chat(siglip_vlm, painting):
    msgs = [_image_msg(painting, "Describe it.")]
    text = siglip_vlm.chat(msgs, max_tokens=10, temperature=0).text
    streamed = "".join(siglip_vlm.stream(msgs, max_tokens=10, temperature=0)).rstrip()
    assert streamed == text


def test_max_tokens_and_finish_reason(siglip_vlm):
    reply = siglip_vlm.chat([{"role": "user", "content": "Count."}], max_tokens=3, temperature=0)
    assert reply.completion_tokens <= 3
    assert reply.finish_reason in ("length", "stop")
    if reply.finish_reason == "length":
        assert reply.completion_tokens == 3


def test_seeded_sampling_is_reproducible(siglip_vlm):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    a = siglip_vlm.chat(msgs, max_tokens=8, temperature=1.0, seed=123).text
    b = siglip_vlm.chat(msgs, max_tokens=8, temperature=1.0, seed=123).text
    assert a == b


def test_embed_image_shape_and_cache(siglip_vlm, painting):
    emb = siglip_vlm.embed_image(painting)
    assert emb.ndim == 2 and emb.shape[1] == siglip_vlm.engine.model.n_embd_inp
    calls = siglip_vlm.encoder_calls
    again = siglip_vlm.embed_image(painting)
    assert siglip_vlm.encoder_calls == calls
    np.testing.assert_array_equal(emb, again)


def test_stop_matcher_holds_back_partial_stops():
    m = StopMatcher(("STOP",))
    out1, hit1 = m.feed("abc ST")
    out2, hit2 = m.feed("OP tail")
    assert (out1, hit1) == ("abc ", False)
    assert (out2, hit2) == ("", True)
    m2 = StopMatcher(("END",))
    assert m2.feed("xEN") == ("x", False)
    assert m2.feed("Z") == ("ENZ", False)
