"""mllama through ``edgevlm.load`` / ``VLM`` (edgevlm.mllama_engine) against transformers.

Greedy replies equal transformers' ``generate`` on the rendered prompt, a follow-up
keeps the text KV cache and the image's cross-attention keys (logits equal an
uncached run), sampling options and stop strings behave as on the llama.cpp engine.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.internvl import gradient_image
from tests.runtime.test_mllama_runtime import _hf_generate


@pytest.fixture(scope="module")
def vlm(mllama_f32_result):
    import edgevlm

    model = edgevlm.load(mllama_f32_result.llm_path.parent, n_ctx=256, kv_type="f32", n_threads=1,
                         n_gpu_layers=0, cache=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def hf(mllama_checkpoint):
    from transformers import PreTrainedTokenizerFast

    from tests.fixtures.mllama import load_model

    return load_model(mllama_checkpoint), PreTrainedTokenizerFast.from_pretrained(mllama_checkpoint)


def _ask(text, images=()):
    return {"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                        {"type": "text", "text": text}]}


def _hf_text(vlm, hf, messages, images, n):
    """transformers' greedy reply to ``messages`` (EOG dropped) and its text, as edgevlm streams it."""
    tokens = _hf_generate(hf, vlm.prompt_text(messages), images, n)
    eog = [i for i, t in enumerate(tokens) if t in (hf[1].eos_token_id, hf[1].convert_tokens_to_ids("<|eom_id|>"))]
    tokens = tokens[:eog[0]] if eog else tokens
    return tokens, hf[1].decode(tokens).strip()


@pytest.mark.parametrize("sizes", [[(168, 50)], [(100, 100), (56, 56)], []])
def test_chat_greedy_equals_transformers(vlm, hf, sizes):
    images = [gradient_image(*s, seed=i) for i, s in enumerate(sizes)]
    messages = [_ask("what is in the picture? it is", images)]
    tokens, text = _hf_text(vlm, hf, messages, images, 12)
    reply = vlm.chat(messages, max_tokens=12, temperature=0)
    print(f"{len(images)} images: {reply.text!r} ({reply.finish_reason}, {reply.completion_tokens} tokens)")
    assert reply.completion_tokens == len(tokens)
    assert reply.text == text
    assert reply.finish_reason == ("length" if len(tokens) == 12 else "stop")


def test_stream_pieces_join_to_the_chat_text(vlm):
    messages = [_ask("describe it", [gradient_image(112, 56)])]
    reply = vlm.chat(messages, max_tokens=10, temperature=0)
    stream = vlm.stream(messages, max_tokens=10, temperature=0)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces).strip() == reply.text
    assert stream.stats is not None and stream.stats.completion_tokens == reply.completion_tokens
    assert stream.stats.prefill.images_encoded == 0  # the same request again: all but its last token reused
    assert stream.stats.prefill.evaluated_positions == 1


def test_follow_up_reuses_the_prefix_and_the_image(vlm):
    image = gradient_image(168, 50, seed=7)
    first = [_ask("what is in the picture?", [image])]
    reply = vlm.chat(first, max_tokens=6, temperature=0)
    calls = vlm.encoder_calls
    follow = first + [{"role": "assistant", "content": reply.text}, _ask("and the sky?")]
    stream = vlm.stream(follow, max_tokens=4, temperature=0)
    "".join(stream)
    pre = stream.stats.prefill
    print(f"follow-up: {pre.reused_positions} of {pre.prompt_positions} positions reused, "
          f"{pre.evaluated_positions} read")
    assert vlm.encoder_calls == calls
    assert pre.images_encoded == 0 and pre.images_from_cache == 0 and pre.images_reused == 1
    assert pre.reused_positions >= len(vlm.prompt_chunks(first)[0].tokens) - 1
    assert pre.evaluated_positions == pre.prompt_positions - pre.reused_positions
    cached = vlm.next_token_logits(follow + [{"role": "assistant", "content": "a"}, _ask("why?")])
    assert vlm.last_prefill.reused_positions > pre.reused_positions
    vlm.reset()
    fresh = vlm.next_token_logits(follow + [{"role": "assistant", "content": "a"}, _ask("why?")])
    assert vlm.last_prefill.reused_positions == 0 and vlm.last_prefill.images_from_cache == 1
    assert vlm.encoder_calls == calls
    print(f"cached vs fresh logits: max-abs {np.abs(cached - fresh).max():.2e}")
    np.testing.assert_allclose(cached, fresh, atol=1e-4)


def _hf_logits(hf, ids, image):
    """transformers' logits (len(ids), n_vocab) of ``ids`` with one image (or a list of images)."""
    import torch
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

    from tests.fixtures.mllama import image_processor

    model = hf[0]
    batch = image_processor()(images=[image if isinstance(image, list) else [image]], return_tensors="np")
    sparse = get_cross_attention_token_mask(ids, model.config.image_token_index)
    mask = convert_sparse_cross_attention_mask_to_dense([sparse], batch["num_tiles"], 4, len(ids))
    kwargs = {k: torch.from_numpy(batch[k]) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), cross_attention_mask=torch.from_numpy(mask),
                     **kwargs).logits[0].numpy()


@pytest.mark.parametrize(("sizes", "system"), [
    ([(56, 56)], None), ([(112, 56)], None), ([(168, 56)], None), ([(112, 112)], None),  # 1, 2, 3, 4 tiles
    ([(100, 60)], "You describe pictures."),  # text before the image
    ([(56, 112), (168, 56)], None),           # two images
])
def test_tile_layouts_and_prompts_equal_transformers(vlm, hf, sizes, system):
    images = [gradient_image(*size, seed=i + 20) for i, size in enumerate(sizes)]
    messages = ([{"role": "system", "content": system}] if system else []) + [_ask("what is it?", images)]
    got = vlm.next_token_logits(messages)
    ref = _hf_logits(hf, hf[1](vlm.prompt_text(messages)).input_ids, images)[-1]
    tiles = [vlm.image_cost(*size).views for size in sizes]
    print(f"{tiles} tiles{', system first' if system else ''}: max-abs {np.abs(got - ref).max():.2e}")
    np.testing.assert_allclose(got, ref, atol=5e-3)


def test_next_token_logits_equal_transformers(vlm, hf):
    image = gradient_image(100, 60, seed=2)
    messages = [_ask("what colour is it?", [image])]
    got = vlm.next_token_logits(messages)
    ref = _hf_logits(hf, hf[1](vlm.prompt_text(messages)).input_ids, image)[-1]
    assert got.shape == (vlm.n_vocab,) == ref.shape
    print(f"next-token logits vs transformers: max-abs {np.abs(got - ref).max():.2e}")
    np.testing.assert_allclose(got, ref, atol=5e-3)


def test_max_tokens_stop_strings_and_seeds(vlm):
    messages = [_ask("tell me more", [gradient_image(56, 56)])]
    long = vlm.chat(messages, max_tokens=16, temperature=0)
    short = vlm.chat(messages, max_tokens=3, temperature=0)
    assert short.completion_tokens <= 3 and long.text.startswith(short.text)
    assert vlm.chat(messages, max_tokens=0, temperature=0).text == ""
    stop = long.text[len(long.text) // 2:][:3]
    cut = vlm.chat(messages, max_tokens=16, temperature=0, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == long.text[:long.text.index(stop)].rstrip()
    kwargs = {"max_tokens": 8, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    a, b = (vlm.chat(messages, seed=5, **kwargs) for _ in range(2))
    assert a.text == b.text
    others = {vlm.chat(messages, seed=s, **kwargs).text for s in range(6, 10)}
    assert len(others | {a.text}) > 1, "the seed changes nothing"


def test_logprobs_and_grammar(vlm):
    messages = [_ask("yes or no?", [gradient_image(56, 56)])]
    reply = vlm.chat(messages, max_tokens=4, temperature=0, logprobs=3)
    assert len(reply.logprobs) >= reply.completion_tokens
    assert all(len(t.top) == 3 and t.logprob <= 0 for t in reply.logprobs)
    assert reply.logprobs[0].logprob == pytest.approx(reply.logprobs[0].top[0].logprob)  # greedy: the best
    constrained = vlm.chat(messages, max_tokens=8, temperature=0, grammar='root ::= "yes" | "no"')
    assert constrained.text in ("yes", "no")


def test_properties_and_images(vlm):
    assert (vlm.family, vlm.vision_engine, vlm.caching) == ("mllama", "kernels", False)
    assert vlm.settings.n_ctx == vlm.n_ctx == 256 and vlm.settings.kv_type == "f32"
    emb = vlm.embed_image(gradient_image(168, 50))
    cost = vlm.image_cost(168, 50)
    assert (cost.positions, cost.cells) == (1, 1) and emb.shape == (cost.tokens, 64)
    assert vlm.tokenize("hello") == vlm.tokenize("hello") and vlm.tokenize("hello")
    assert vlm.tower_pixels(gradient_image(168, 50)).shape == (3, 56, 56)
    assert vlm.prompt_chunks([_ask("hi")])[0].tokens[0] == vlm.tokenize("<|begin_of_text|>")[0]


def test_unsupported_features_raise_clear_errors(vlm, mllama_f32_result):
    import edgevlm
    from edgevlm.descriptor import ModelFiles, describe_model
    from edgevlm.errors import InvalidRequestError, UnsupportedModelError
    from edgevlm.families import family_for

    with pytest.raises(InvalidRequestError, match="kv_type"):  # the planner knows the engine's KV types
        edgevlm.plan(mllama_f32_result.llm_path.parent, kv_type="q8_0")
    with pytest.raises(UnsupportedModelError, match="Llama-3.2-Vision"):  # the LLM file without its projector
        family_for(describe_model(ModelFiles(mllama_f32_result.llm_path, None)))
    with pytest.raises(InvalidRequestError, match="kv_type"):
        edgevlm.load(mllama_f32_result.llm_path.parent, kv_type="q8_0", n_gpu_layers=0)
    with pytest.raises(UnsupportedModelError, match="libmtmd cannot run"):
        edgevlm.load(mllama_f32_result.llm_path.parent, vision_engine="mtmd", n_gpu_layers=0)


def test_close_then_use_raises(mllama_f32_result):
    import edgevlm
    from edgevlm.errors import InvalidRequestError

    vlm = edgevlm.load(mllama_f32_result.llm_path.parent, n_ctx=64, kv_type="f32", n_threads=1, n_gpu_layers=0)
    vlm.close()
    vlm.close()
    with pytest.raises(InvalidRequestError, match="closed"):
        vlm.chat([_ask("hi")])


class _AfterChecks:
    """A cancel token that turns true after ``n`` questions (and counts them)."""

    def __init__(self, n):
        self.n, self.asked = n, 0

    def is_set(self):
        self.asked += 1
        return self.asked > self.n


def test_a_preparation_cancelled_inside_the_image_encode_stops_there(vlm):
    """The encode is one graph (24-34 s for the 11B-shaped model's four tiles on 2 cores): the check is
    asked as it starts and while it runs (the preparation asks once before; the second answer, True,
    is the encode's first question, so it stops at the graph's first node)."""
    image = gradient_image(150, 90, seed=11)
    messages = [_ask("what colours are in the cancelled one?", [image])]
    calls = vlm.engine.encoder_calls
    cancel = _AfterChecks(1)
    stats = vlm.prepare([_ask("", [image])], cancel=cancel)
    assert stats.images_encoded == 0 and vlm.engine.encoder_calls == calls, "the encode ran to its end"
    assert cancel.asked == 2
    after_cancel = vlm.next_token_logits(messages).copy()
    assert vlm.engine.encoder_calls == calls + 1, "a half-encoded image was kept"
    vlm.engine.reset()
    vlm.engine.images.clear()
    np.testing.assert_array_equal(vlm.next_token_logits(messages), after_cancel)  # as from scratch


def test_a_preparation_cancelled_inside_the_text_decoder_keeps_nothing_of_its_batch(vlm):
    """Asked: as the preparation starts, before the token batch, then as its graph starts (True)."""
    vlm.engine.reset()
    messages = [{"role": "system", "content": "a long system prompt, read while the user types"}, _ask("hi")]
    cancel = _AfterChecks(2)
    stats = vlm.prepare(messages, cancel=cancel)
    assert cancel.asked == 3 and stats.evaluated_positions == 0
    assert vlm.engine.pipe.text.n_past == 0 and vlm.engine.history == []
    after_cancel = vlm.next_token_logits(messages).copy()
    vlm.engine.reset()
    np.testing.assert_array_equal(vlm.next_token_logits(messages), after_cancel)


def test_a_stream_cancelled_inside_the_image_encode_ends_cancelled(vlm):
    calls = vlm.engine.encoder_calls
    stream = vlm.stream([_ask("and this one?", [gradient_image(150, 90, seed=12)])], max_tokens=5,
                        temperature=0, cancel=_AfterChecks(0))  # nothing asks before the encode
    assert list(stream) == [] and stream.stats.finish_reason == "cancelled"
    assert vlm.engine.encoder_calls == calls and stream.stats.prefill.images_encoded == 0


def _load_events(mllama_f32_result, progress):
    import edgevlm

    return edgevlm.load(mllama_f32_result.llm_path.parent, n_ctx=64, kv_type="f32", n_threads=1,
                        n_gpu_layers=0, cache=False, progress=progress)


def test_load_reports_the_weights_as_they_are_uploaded(mllama_f32_result):
    from edgevlm.progress import LoadStage

    events = []
    _load_events(mllama_f32_result, events.append).close()
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and events[-1].fraction == 1.0
    for stage in (LoadStage.LOADING_LLM, LoadStage.LOADING_PROJECTOR):
        parts = [e.stage_fraction for e in events if e.stage is stage]
        assert len(parts) > 3 and parts == sorted(parts) and parts[-1] == 1.0, (stage, parts)
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages.index(LoadStage.LOADING_LLM) < stages.index(LoadStage.LOADING_PROJECTOR)


class _Abort(Exception):
    pass


@pytest.mark.parametrize("stage_name", ["LOADING_LLM", "LOADING_PROJECTOR"])
def test_a_callback_raising_mid_upload_stops_the_load_and_frees_the_backends(mllama_f32_result, stage_name,
                                                                             monkeypatch):
    """What the chat REPL's /quit during a load relies on: it stops inside the weights, not after them."""
    from edgevlm.kernels.backend import Backend
    from edgevlm.progress import LoadStage

    stage = LoadStage[stage_name]
    opened, original_init = [], Backend.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(Backend, "__init__", init)
    seen = []

    def progress(event):
        if event.stage is stage and 0 < event.stage_fraction < 1:
            seen.append(event.stage_fraction)
            raise _Abort(stage.value)

    with pytest.raises(_Abort):
        _load_events(mllama_f32_result, progress)
    assert seen, f"no {stage.value} event between 0 and 1"
    assert opened and all(not b.ptr for b in opened), "a backend opened before the abort was not freed"
    monkeypatch.undo()
    _load_events(mllama_f32_result, None).close()  # nothing left half-loaded


def test_cli_one_shot(mllama_f32_result, tmp_path):
    from click.testing import CliRunner

    from edgevlm.cli.main import cli

    image = tmp_path / "x.png"
    gradient_image(120, 80).save(image)
    res = CliRunner().invoke(cli, ["chat", "--model", str(mllama_f32_result.llm_path.parent), "--image", str(image),
                                   "--threads", "1", "--ctx", "128", "--gpu-layers", "0", "--no-cache",
                                   "--max-tokens", "6", "--temperature", "0", "-p", "what is it?"])
    assert res.exit_code == 0, res.output
    assert res.output.strip()


def test_vision_states_come_from_the_disk_cache_in_another_load(mllama_f32_result, tmp_path, monkeypatch):
    import edgevlm

    monkeypatch.setenv("EDGEVLM_CACHE_DIR", str(tmp_path / "cache"))
    messages = [_ask("what is it?", [gradient_image(150, 90, seed=4)])]
    logits = []
    for round_ in range(2):
        with edgevlm.load(mllama_f32_result.llm_path.parent, n_ctx=128, kv_type="f32", n_threads=1,
                          n_gpu_layers=0) as model:
            assert model.caching
            logits.append(model.next_token_logits(messages))
            pre = model.last_prefill
            assert (pre.images_encoded, pre.images_from_cache, model.encoder_calls) == (
                (1, 0, 1) if round_ == 0 else (0, 1, 0))
    np.testing.assert_array_equal(logits[0], logits[1])
    assert list((tmp_path / "cache").rglob("*.emb"))


def test_alternating_conversations_are_parked(vlm):
    """A request leaving the live conversation parks it; going back restores it (no re-read, no re-encode)."""
    a = [_ask("what is in the picture?", [gradient_image(120, 60, seed=11)])]
    b = [_ask("describe this one", [gradient_image(60, 120, seed=12)])]
    vlm.reset()
    first_a = vlm.chat(a, max_tokens=4, temperature=0)
    vlm.chat(b, max_tokens=4, temperature=0)
    calls = vlm.encoder_calls
    follow_a = a + [{"role": "assistant", "content": first_a.text}, _ask("and the colours?")]
    got = vlm.next_token_logits(follow_a)
    pre = vlm.last_prefill
    print(f"back to conversation A: parked state restored in {pre.restore_ms:.2f} ms, "
          f"{pre.reused_positions} of {pre.prompt_positions} positions reused")
    assert pre.parked_restored and pre.reused_positions >= len(vlm.prompt_chunks(a)[0].tokens) - 1
    assert pre.images_encoded == 0 and pre.images_from_cache == 0 and vlm.encoder_calls == calls
    again_b = vlm.next_token_logits(b)  # and B was parked when A came back
    assert vlm.last_prefill.parked_restored and vlm.last_prefill.evaluated_positions == 1
    vlm.reset()
    np.testing.assert_allclose(got, vlm.next_token_logits(follow_a), atol=1e-4)
    np.testing.assert_allclose(again_b, vlm.next_token_logits(b), atol=1e-4)


def test_score_choices_equal_transformers(vlm, hf):
    from edgevlm.scoring import log_softmax

    image = gradient_image(90, 70, seed=5)
    messages = [_ask("is it red?", [image])]
    scores = vlm.score_choices(messages, ["yes", "no", "maybe later today"])
    ids = hf[1](vlm.prompt_text(messages)).input_ids
    for choice, tokens, logprob in zip(scores.choices, scores.tokens, scores.logprobs):
        rows = log_softmax(_hf_logits(hf, ids + list(tokens), image)[len(ids) - 1:-1])
        ref = float(sum(rows[i, t] for i, t in enumerate(tokens)))
        print(f"{choice!r}: {len(tokens)} tokens, logprob {logprob:.4f} (transformers {ref:.4f})")
        assert logprob == pytest.approx(ref, abs=1e-2)
    assert sum(scores.probabilities) == pytest.approx(1.0)
    np.testing.assert_allclose(scores.next_logprobs, log_softmax(vlm.next_token_logits(messages)), atol=1e-5)


def test_generate_choice_is_one_of_the_choices(vlm):
    messages = [_ask("is it red?", [gradient_image(90, 70, seed=5)])]
    before = vlm.next_token_logits(messages)
    got = vlm.generate_choice(messages, ["yes", "no", "maybe later today"])
    assert got.choice in ("yes", "no", "maybe later today") and got.tokens
    np.testing.assert_array_equal(before, vlm.next_token_logits(messages))  # the caches were cut back
