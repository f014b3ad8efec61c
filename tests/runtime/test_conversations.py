"""Several conversations in one process: parked KV states restore exactly; thread safety."""

from __future__ import annotations

import logging
import threading

import numpy as np

from edgevlm.chunks import unit_positions
from edgevlm.parking import ParkedState, ParkedStates, common_prefix


def _image_msg(image, text):
    return {"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": text}]}


def _follow(first, reply, question):
    return first + [{"role": "assistant", "content": reply}, {"role": "user", "content": question}]


def test_alternating_conversations_evaluate_only_their_new_turn(siglip_vlm, painting, square_image, caplog):
    vlm = siglip_vlm
    a1 = [_image_msg(painting, "Describe the painting.")]
    b1 = [_image_msg(square_image(40, seed=3), "What is in this picture?")]
    a2 = _follow(a1, "A painting with a red circle.", "And the colours?")
    b2 = _follow(b1, "Random noise.", "How many shapes are there?")
    # references: each follow-up right after its own first turn (same batch split), and from scratch
    uninterrupted, full = {}, {}
    for name, first, follow in (("a", a1, a2), ("b", b1, b2)):
        vlm.reset()
        vlm.next_token_logits(first)
        uninterrupted[name] = (vlm.next_token_logits(follow), vlm.engine.last_prefill)
        vlm.reset()
        full[name] = vlm.next_token_logits(follow)
    vlm.reset()
    vlm.next_token_logits(a1)
    vlm.next_token_logits(b1)
    for name, follow in (("a", a2), ("b", b2)):
        calls = vlm.encoder_calls
        with caplog.at_level(logging.INFO, logger="edgevlm"):
            logits = vlm.next_token_logits(follow)
        pre, ref = vlm.engine.last_prefill, uninterrupted[name][1]
        assert pre.parked_restored and not pre.snapshot_restored
        assert pre.images_reused == 1 and pre.saved_ms > 0
        assert "reused from a parked conversation" in caplog.text  # what --verbose shows
        assert vlm.encoder_calls == calls and pre.images_encoded == 0 and pre.images_from_cache == 0
        assert (pre.reused_positions, pre.evaluated_positions) == (ref.reused_positions, ref.evaluated_positions)
        assert pre.reused_positions == _shared_positions(vlm, a1 if name == "a" else b1, follow)
        np.testing.assert_array_equal(logits, uninterrupted[name][0])  # bitwise: same batch split
        np.testing.assert_allclose(logits, full[name], rtol=0, atol=1e-4)


def _shared_positions(vlm, first, follow):
    """Positions the follow-up shares with the first turn's prompt (all but the new turn)."""
    units_first = unit_positions(vlm.prompt_chunks(first))[0]
    units, starts, _ = unit_positions(vlm.prompt_chunks(follow))
    return starts[common_prefix(units_first, units)]


def test_generated_replies_alternate_like_separate_sessions(siglip_vlm, painting, square_image):
    vlm = siglip_vlm
    convs = {"a": [_image_msg(painting, "Describe it.")],
             "b": [_image_msg(square_image(40, seed=5), "What is this?")]}
    alone = {}
    for name, first in convs.items():
        vlm.reset()
        reply = vlm.chat(first, max_tokens=4, temperature=0).text
        alone[name] = (reply, vlm.chat(_follow(first, reply, "Shorter."), max_tokens=4, temperature=0).text)
    vlm.reset()
    replies = {name: vlm.chat(first, max_tokens=4, temperature=0).text for name, first in convs.items()}
    for name, first in convs.items():
        second = vlm.chat(_follow(first, replies[name], "Shorter."), max_tokens=4, temperature=0)
        assert second.prefill.parked_restored and second.prefill.images_encoded == 0
        assert (replies[name], second.text) == alone[name]


def test_concurrent_threads_get_their_own_answers(siglip_vlm, painting, square_image):
    vlm = siglip_vlm
    convs = [[_image_msg(painting, "Describe it.")], [_image_msg(square_image(40, seed=6), "What?")],
             [{"role": "user", "content": "Hello, who are you?"}]]
    vlm.reset()
    expected = [vlm.chat(c, max_tokens=5, temperature=0).text for c in convs]
    vlm.reset()
    results: dict[int, list[str]] = {i: [] for i in range(len(convs))}

    def worker(i: int) -> None:
        for _ in range(3):
            results[i].append(vlm.chat(convs[i], max_tokens=5, temperature=0).text)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results[i] == [expected[i]] * 3 for i in range(len(convs)))


def _state(units, nbytes=100):
    return ParkedState(tuple(units), tuple(range(len(units) + 1)), bytes(nbytes))


def test_parked_states_pick_the_longest_prefix_and_respect_budgets():
    parked = ParkedStates(max_bytes=250, max_entries=3)
    assert parked.park(_state([1, 2, 3]))
    assert parked.park(_state([1, 2, 9, 9]))
    request = [1, 2, 9, 7]
    key, n = parked.best(request, limit=3)
    assert n == 3 and parked.take(key).units[2] == 9
    assert parked.best(request, limit=1)[1] == 1  # capped
    assert parked.park(_state([4])) and parked.park(_state([5]))  # 300 bytes > 250: oldest dropped
    assert len(parked) == 2 and parked.nbytes == 200
    assert parked.best([1], limit=1) == (None, 0)
    assert not parked.park(_state([6], nbytes=251))  # larger than the whole budget
    parked.clear()
    assert len(parked) == 0 and parked.nbytes == 0


def test_parking_off_evaluates_again(siglip_vlm, painting, square_image):
    vlm = siglip_vlm
    a1 = [_image_msg(painting, "Describe the painting.")]
    b1 = [_image_msg(square_image(40, seed=3), "What is in this picture?")]
    saved = vlm.engine.kv.parked.max_bytes, vlm.engine.kv.snapshots
    vlm.engine.kv.parked.max_bytes, vlm.engine.kv.snapshots = 0, None
    try:
        vlm.reset()
        vlm.next_token_logits(a1)
        vlm.next_token_logits(b1)
        vlm.next_token_logits(_follow(a1, "A painting.", "Colours?"))
        pre = vlm.engine.last_prefill
        assert not pre.parked_restored and pre.images_from_cache == 1  # the image had to be decoded again
        assert len(vlm.engine.kv.parked) == 0
    finally:
        vlm.engine.kv.parked.max_bytes, vlm.engine.kv.snapshots = saved
