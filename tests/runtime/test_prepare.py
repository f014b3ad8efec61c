"""``VLM.prepare``: images encoded and the prompt read before the question is written."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edgevlm.chunks import EmbeddingChunk, ImageChunk, TextChunk, settled_prefix
from edgevlm.errors import InvalidRequestError

QUESTION = "What is the genre of this painting?"


def _images(*paths: Path, text: str | None = None) -> dict:
    content = [{"type": "image", "image": str(p)} for p in paths]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _load(path: Path, **kw):
    import edgevlm

    return edgevlm.load(path, n_ctx=1024, kv_type="f32", n_threads=2, cache=False, **kw)


@pytest.fixture(params=["llava", "qwen2vl", "omnifusion", "llava_next", "internvl", "mllama"])
def family_vlm(request):
    """Each runtime family's tiny f32 model (the session-wide ones where they exist)."""
    if request.param == "llava":
        yield request.getfixturevalue("siglip_vlm")
        return
    if request.param == "qwen2vl":
        yield request.getfixturevalue("qwen2vl_vlm")
        return
    if request.param == "omnifusion":
        path = request.getfixturevalue("omnifusion_f32")
    else:
        path = request.getfixturevalue(f"{request.param}_f32_result").llm_path.parent
    vlm = _load(path)
    yield vlm
    vlm.close()


def _prepared_then_asked(vlm, prefix: list[dict], question: dict):
    """Prepare ``prefix``, then evaluate it with ``question`` appended; the question's prefill and logits."""
    with vlm.isolated_caches():  # empty RAM caches: the image is encoded, not found
        prepared = vlm.prepare(prefix)
        calls = vlm.encoder_calls
        logits = vlm.next_token_logits([*prefix[:-1], question])
        return prepared, vlm.last_prefill, vlm.encoder_calls - calls, logits


def test_prepared_question_reads_only_the_question(family_vlm, painting):
    vlm = family_vlm
    prepared, asked, encoded, logits = _prepared_then_asked(vlm, [_images(painting)],
                                                            _images(painting, text=QUESTION))
    question_tokens = len(vlm.tokenize(QUESTION))
    assert prepared.images_encoded >= 1 and prepared.evaluated_positions > 0  # image chunks (tiles)
    assert encoded == 0 and asked.images_encoded == 0 and asked.images_reused == prepared.images_encoded
    assert asked.reused_positions >= prepared.prompt_positions - 1
    assert asked.evaluated_positions <= question_tokens + 12, asked  # the question and the reply's opening
    vlm.reset()
    fresh = vlm.next_token_logits([_images(painting, text=QUESTION)])
    np.testing.assert_allclose(logits, fresh, rtol=0, atol=1e-4)


def test_prepared_follow_up_with_a_new_image(siglip_vlm, painting, square_image):
    other = square_image(40, seed=3)
    history = [_images(painting, text="Describe it."), {"role": "assistant", "content": "A red ellipse."}]
    with siglip_vlm.isolated_caches():
        siglip_vlm.next_token_logits(history[:1])
        prepared = siglip_vlm.prepare([*history, _images(other)])
        assert prepared.images_encoded == 1 and prepared.images_reused == 1
        logits = siglip_vlm.next_token_logits([*history, _images(other, text="And this one?")])
        asked = siglip_vlm.last_prefill
    assert asked.images_encoded == 0 and asked.images_reused == 2
    siglip_vlm.reset()
    np.testing.assert_allclose(logits, siglip_vlm.next_token_logits([*history, _images(other, text="And this one?")]),
                               rtol=0, atol=1e-4)


def test_prepare_with_text_already_typed_and_a_system_prompt(siglip_vlm, painting):
    system = {"role": "system", "content": "You are an art critic."}
    prefix = [system, _images(painting, text="Look closely.")]
    question = _images(painting, text="Look closely. Which genre?")
    prepared, asked, encoded, _ = _prepared_then_asked(siglip_vlm, prefix, question)
    assert encoded == 0 and asked.images_reused == 1
    assert asked.reused_positions >= prepared.prompt_positions - 2


def test_a_cancelled_preparation_evaluates_nothing_and_the_turn_still_answers(siglip_vlm, painting):
    siglip_vlm.reset()
    cancel = threading.Event()
    cancel.set()
    prepared = siglip_vlm.prepare([_images(painting)], cancel=cancel)
    assert prepared.evaluated_positions == 0 and prepared.images_encoded == 0
    logits = siglip_vlm.next_token_logits([_images(painting, text=QUESTION)])
    siglip_vlm.reset()
    np.testing.assert_array_equal(logits, siglip_vlm.next_token_logits([_images(painting, text=QUESTION)]))


def test_a_request_waits_for_a_preparation_in_another_thread(siglip_vlm, painting):
    siglip_vlm.reset()
    worker = threading.Thread(target=siglip_vlm.prepare, args=([_images(painting)],))
    worker.start()
    reply = siglip_vlm.chat([_images(painting, text=QUESTION)], max_tokens=4, temperature=0)
    worker.join()
    pre = reply.prefill  # whichever ran first, the image reached the context once
    assert pre.images_encoded + pre.images_reused + pre.images_from_cache == 1
    siglip_vlm.reset()
    assert siglip_vlm.chat([_images(painting, text=QUESTION)], max_tokens=4, temperature=0).text == reply.text


def test_a_preparation_arriving_after_its_request_keeps_the_conversation(siglip_vlm, painting):
    """The question was answered before the preparation got the model: the preparation does
    nothing, and a follow-up reuses the whole first turn from the live KV cache."""
    first = [_images(painting, text=QUESTION)]
    with siglip_vlm.isolated_caches():
        reply = siglip_vlm.chat(first, max_tokens=4, temperature=0)
        late = siglip_vlm.prepare([_images(painting)])
        assert late.evaluated_positions == 0 and late.images_encoded == 0
        follow = [*first, {"role": "assistant", "content": reply.text}, {"role": "user", "content": "Why?"}]
        siglip_vlm.next_token_logits(follow)
        again = siglip_vlm.last_prefill
    assert not again.parked_restored and again.images_reused == 1
    assert again.reused_positions >= reply.prefill.prompt_positions, again


@pytest.mark.parametrize("name", ["siglip_f32", "qwen2vl"])
def test_a_prepared_image_is_snapshotted_for_the_next_process(request, name, painting):
    """The prefix a preparation evaluates is saved as a KV snapshot even where it ends at the
    image (Qwen2-VL's prompt continues with a token the question may merge with), so a new
    process asking about the same image restores it instead of encoding."""
    import edgevlm

    path = (request.getfixturevalue(name) if name == "siglip_f32"
            else request.getfixturevalue("qwen2vl_f32_result").llm_path.parent)
    with edgevlm.load(path, n_ctx=1024, n_threads=2, cache=True) as vlm:
        prepared = vlm.prepare([_images(painting)])
    assert prepared.snapshots_saved >= 1, prepared
    with edgevlm.load(path, n_ctx=1024, n_threads=2, cache=True) as fresh:
        fresh.next_token_logits([_images(painting, text=QUESTION)])
        asked = fresh.last_prefill
    assert asked.snapshot_restored and asked.images_encoded == 0, asked


def test_prepare_refuses_what_a_request_would(siglip_f32, painting):
    vlm = _load(siglip_f32)
    with pytest.raises(InvalidRequestError, match="role"):
        vlm.prepare([{"role": "painter", "content": "hi"}])
    vlm.close()
    with pytest.raises(InvalidRequestError):
        vlm.prepare([_images(painting)])


def test_settled_prefix_leaves_out_the_token_a_question_may_merge_with():
    image = ImageChunk("d/p/0", n_tokens=4, n_pos=4)
    soi = EmbeddingChunk("soi", np.zeros((1, 2), np.float32))
    a = [TextChunk((1, 2, 3)), soi, image, TextChunk((7, 8, 9, 10))]
    b = [TextChunk((1, 2, 3)), soi, image, TextChunk((7, 8, 11))]
    assert settled_prefix(a, b) == [*a[:3], TextChunk((7,))]
    assert settled_prefix(a, [TextChunk((1, 2, 3)), soi, image, TextChunk((5,))]) == a[:3]
    assert settled_prefix([TextChunk((1, 2, 3, 4))], [TextChunk((1, 2, 3))]) == [TextChunk((1, 2))]
    other = ImageChunk("e/p/0", n_tokens=4, n_pos=4)
    assert settled_prefix([TextChunk((1, 2)), image], [TextChunk((1, 2)), other]) == [TextChunk((1,))]
    assert settled_prefix([TextChunk((5, 6))], [TextChunk((7, 6))]) == []


def _stop_in_decode(monkeypatch, number: int) -> list[int]:
    """Make the ``number``-th llama_decode stop inside its graph: the abort flag the watcher would set
    is set as that decode starts (no timing involved). Returns the decoded batches' sizes."""
    import ctypes
    from contextlib import contextmanager

    from edgevlm import llm as llm_module
    from edgevlm.kernels import abort

    flags: list[int] = []
    runs: list[int] = []
    real_watched, real_run = abort.watched_flag, llm_module.LlamaContext._run

    @contextmanager
    def exposed(cancelled):
        with real_watched(cancelled) as flag:
            flags.append(flag)
            yield flag

    def run(self, batch):
        runs.append(batch.n_tokens)
        if len(runs) == number:
            ctypes.memset(flags[-1], 1, 1)
        return real_run(self, batch)

    monkeypatch.setattr(abort, "watched_flag", exposed)
    monkeypatch.setattr(llm_module.LlamaContext, "_run", run)
    return runs


def test_a_decode_stopped_mid_graph_drops_its_chunk_and_keeps_the_ones_before(siglip_vlm, painting, monkeypatch,
                                                                             caplog):
    """llama.cpp's abort hook fires inside the last text chunk's decode (the flag the watcher would
    set is set here as that decode starts, so the stop does not depend on timing): llama_decode
    returns ABORTED, that chunk's positions leave the KV cache, the text and image before it stay,
    llama.cpp's error lines about it are debug lines, and the question then reads on from there
    to the logits of a from-scratch turn."""
    import logging

    with siglip_vlm.isolated_caches():
        runs = _stop_in_decode(monkeypatch, 2)  # the text chunks' decodes (the image goes through libmtmd)
        with caplog.at_level(logging.DEBUG, logger="edgevlm.llama"):
            stats = siglip_vlm.prepare([_images(painting)], cancel=threading.Event())
        monkeypatch.undo()
        assert len(runs) == 2 and stats.images_encoded == 1
        kept = stats.prompt_positions - runs[1]
        assert stats.evaluated_positions == kept and siglip_vlm.engine.kv.cached_positions == kept
        aborted = [r for r in caplog.records if "failed to decode" in r.getMessage()]
        assert aborted and all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "edgevlm.llama")
        logits = siglip_vlm.next_token_logits([_images(painting, text=QUESTION)])
        assert siglip_vlm.last_prefill.reused_positions == kept
        siglip_vlm.reset()
        np.testing.assert_array_equal(logits, siglip_vlm.next_token_logits([_images(painting, text=QUESTION)]))


def test_a_stop_inside_a_long_text_keeps_its_batches_read_before(siglip_f32, monkeypatch):
    """A text chunk longer than n_batch is read in batches: stopped inside the third, the first two
    stay in the KV cache and the ledger, and the next request reads on from there."""
    system = "You describe paintings: " + " ".join(f"genre {i} is listed here," for i in range(12))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Which genre?"}]
    with _load(siglip_f32, n_batch=16) as vlm:
        runs = _stop_in_decode(monkeypatch, 3)
        stats = vlm.prepare(messages, cancel=threading.Event())
        monkeypatch.undo()
        assert runs == [16, 16, 16] and stats.prompt_positions > 48
        assert stats.evaluated_positions == 32 and vlm.engine.kv.cached_positions == 32
        logits = vlm.next_token_logits(messages)
        assert vlm.last_prefill.reused_positions == 32
        vlm.reset()
        np.testing.assert_array_equal(logits, vlm.next_token_logits(messages))
