"""Choice scoring (VLM.score_choices) and grammar-constrained choices (VLM.generate_choice)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgevlm.chunks import TextChunk, unit_positions
from edgevlm.errors import InvalidRequestError
from edgevlm.prompt import normalize_messages
from edgevlm.scoring import answer_lead, choice_grammar, gbnf_literal, log_softmax, token_paths

PROSE = "Describe everything you see in this picture in great detail, in full sentences."


def _messages(image, text="What colour is the shape?"):
    return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": text}]}]


def _from_scratch(vlm, messages, seq):
    """log-softmax rows after the prompt + seq[:i], for i in 0..len(seq), each evaluated from an empty cache."""
    engine = vlm.engine
    chunks = engine.prompt(normalize_messages(messages)).chunks
    rows = []
    for i in range(len(seq) + 1):
        vlm.reset()
        extra = [TextChunk(tuple(seq[:i]))] if i else []
        with engine.lock:
            engine.kv.prefill(chunks + extra)
            rows.append(log_softmax(engine.ctx.logits()))
    return rows


def test_logprobs_match_a_from_scratch_evaluation(siglip_vlm, painting):
    messages = _messages(painting)
    choices = ["1", "10", "red", "a small house"]
    scores = siglip_vlm.score_choices(messages, choices)
    assert math.isclose(sum(scores.probabilities), 1.0, abs_tol=1e-9)
    assert scores.choice in choices and scores.joint
    by_choice = dict(zip(choices, scores.tokens))
    for choice, seq, logprob in zip(choices, scores.tokens, scores.logprobs):
        rows = _from_scratch(siglip_vlm, messages, seq)
        expected = sum(rows[i][tok] for i, tok in enumerate(seq))
        if choice == "1":  # "10" extends "1": "1" also needs the model not to go on with "10"'s next token
            nxt = by_choice["10"][len(seq)]
            expected += math.log(1.0 - math.exp(rows[len(seq)][nxt]))
        assert abs(logprob - expected) < 1e-3, (choice, logprob, expected)
    np.testing.assert_allclose(scores.next_logprobs, _from_scratch(siglip_vlm, messages, ())[0], atol=1e-4)


def test_choices_are_tokenised_as_written_after_the_prompt(siglip_vlm, painting):
    messages = _messages(painting)
    tail = siglip_vlm.prompt_text(messages).rsplit("<__media__>", 1)[-1]
    assert tail.endswith("ASSISTANT:")  # the LLaVA template: the reply follows a space
    scores = siglip_vlm.score_choices(messages, ["red", "green"])
    base = siglip_vlm.tokenize(tail)
    for choice, seq in zip(["red", "green"], scores.tokens):
        joint = siglip_vlm.tokenize(tail + " " + choice)
        assert joint[:len(base)] == base and tuple(joint[len(base):]) == seq


def test_the_prompt_is_evaluated_once_and_the_kv_ledger_stays_true(siglip_vlm, painting):
    siglip_vlm.reset()
    messages = _messages(painting)
    first = siglip_vlm.score_choices(messages, ["red", "green", "blue"])
    assert first.prefill.evaluated_positions == first.prefill.prompt_positions
    choices = [str(i) for i in range(11)]
    again = siglip_vlm.score_choices(messages, choices)
    assert again.prefill.reused_positions == again.prefill.prompt_positions - 1
    assert again.prefill.evaluated_positions == 1 and again.prefill.images_encoded == 0
    paths = token_paths(again.tokens)
    assert again.decode_calls == len(paths) <= 2  # the digits share their first token(s)
    assert again.evaluated_tokens == sum(len(p) for p in paths) <= 4
    engine = siglip_vlm.engine
    units = unit_positions(engine.prompt(normalize_messages(messages)).chunks)[0]
    assert engine.kv.units == units  # nothing of the choices was committed
    logits = siglip_vlm.next_token_logits(messages)  # the cut-back cache gives the from-scratch logits
    assert siglip_vlm.last_prefill.evaluated_positions == 1
    np.testing.assert_array_equal(log_softmax(logits), again.next_logprobs)


def test_evaluate_after_leaves_the_cache_as_it_was(siglip_vlm, painting):
    engine = siglip_vlm.engine
    siglip_vlm.reset()
    chunks = engine.prompt(normalize_messages(_messages(painting))).chunks
    with engine.lock:
        engine.kv.prefill(chunks)
        held, units = engine.kv.cached_positions, list(engine.kv.units)
        rows = engine.kv.evaluate_after([5, 6, 7])
        assert rows.shape == (3, siglip_vlm.n_vocab)
        assert engine.kv.cached_positions == held and engine.kv.units == units
        engine.kv.prefill(chunks + [TextChunk((9, 10))])  # positions after the prompt were really dropped
        reused = engine.ctx.logits()
    siglip_vlm.reset()
    with engine.lock:
        engine.kv.prefill(chunks + [TextChunk((9, 10))])
        np.testing.assert_array_equal(reused, engine.ctx.logits())
        assert engine.kv.evaluate_after([]).shape == (0, siglip_vlm.n_vocab)


def test_bad_choices_are_refused(siglip_vlm, painting):
    messages = _messages(painting)
    for choices, words in ((["red"], "at least two"), (["red", "red"], "twice"), (["red", " "], "empty"),
                           ("red", "list")):
        with pytest.raises(InvalidRequestError, match=words):
            siglip_vlm.score_choices(messages, choices)


def _top_words(vlm, messages, n):
    """The model's n most likely next tokens that are a space and letters (one-token choices)."""
    lp = vlm.score_choices(messages, ["x", "y"]).next_logprobs
    out = []
    for tok in np.argsort(-lp):
        piece = vlm.engine.model.token_bytes(int(tok)).decode("utf-8", "replace")
        if piece.startswith(" ") and piece[1:].isalpha() and piece[1:] not in out:
            out.append(piece[1:])
        if len(out) == n:
            return out
    raise AssertionError("too few word tokens")


def _path_rows(vlm, messages, tokens):
    """log-softmax rows after the prompt and after each of ``tokens`` (len(tokens) + 1 rows)."""
    engine = vlm.engine
    chunks = engine.prompt(normalize_messages(messages)).chunks
    with engine.lock:
        engine.kv.prefill(chunks)
        first = log_softmax(engine.ctx.logits())
        rest = engine.kv.evaluate_after(list(tokens))
    return [first] + [log_softmax(row) for row in rest]


def _check_greedy_under_the_grammar(vlm, messages, choices, generated, scores):
    """What greedy decoding under the choices' grammar must satisfy, checked against the model's own rows.

    Each generated token is the most probable token that keeps the text a prefix of
    some answer (the grammar's admissible set), and the end token is chosen only when
    it beats every continuation. When the grammar spelled its choice as scoring
    tokenised it, its sequence log-probability is the scored one and cannot exceed
    the scored best (scoring maximises over those sequences). Returns the path's
    log-probability.
    """
    model = vlm.engine.model
    tail = vlm.prompt_text(messages).rsplit("<__media__>", 1)[-1]
    answers = [(answer_lead(tail, c) + c).encode() for c in choices]
    pieces = [model.token_bytes(t) for t in range(vlm.n_vocab)]
    eog = [t for t in range(vlm.n_vocab) if model.is_eog(t)]
    rows = _path_rows(vlm, messages, generated.tokens)
    text, total = b"", 0.0
    for i, token in enumerate(generated.tokens):
        allowed = [t for t, piece in enumerate(pieces) if piece and t not in eog
                   and any(a.startswith(text + piece) for a in answers)]
        allowed += eog if text in answers else []
        assert token in allowed
        assert rows[i][token] >= max(rows[i][t] for t in allowed) - 1e-4, (choices, i)
        text += pieces[token]
        total += float(rows[i][token])
    assert text == answers[generated.index]
    if any(a != text and a.startswith(text) for a in answers):  # it stopped on the end token: that beat going on
        going_on = [t for t, piece in enumerate(pieces) if piece and any(a.startswith(text + piece) for a in answers)]
        assert max(rows[-1][t] for t in eog) >= max(rows[-1][t] for t in going_on) - 1e-4
    elif generated.tokens == scores.tokens[generated.index]:
        assert total == pytest.approx(scores.logprobs[generated.index], abs=1e-3)
        assert total <= max(scores.logprobs) + 1e-3
    return total


def test_constrained_generation_always_answers_a_choice(siglip_vlm, square_image, capsys):
    sets = [["red", "green", "blue"], ["1", "2", "3", "10"], ["a cat", "a dog on the road", "the house"]]
    agree = total = canonical = 0
    for seed in range(6):
        messages = _messages(square_image(32, seed), PROSE)  # a prompt that invites prose
        for choices in sets:
            scores = siglip_vlm.score_choices(messages, choices)
            generated = siglip_vlm.generate_choice(messages, choices)
            assert scores.choice in choices and generated.choice == choices[generated.index]
            _check_greedy_under_the_grammar(siglip_vlm, messages, choices, generated, scores)
            total += 1
            agree += scores.choice == generated.choice
            canonical += generated.tokens == scores.tokens[generated.index]
    with capsys.disabled():
        print(f"\nscoring vs constrained generation (multi-token choices): {agree}/{total} agree; the grammar "
              f"spelled its choice as scoring tokenises it {canonical}/{total} times")


def test_scoring_and_constrained_generation_agree_on_one_token_choices(siglip_vlm, square_image):
    for seed in range(3):
        messages = _messages(square_image(32, seed), PROSE)
        words = _top_words(siglip_vlm, messages, 3)
        for choices in (words, words[::-1]):
            scores = siglip_vlm.score_choices(messages, choices)
            generated = siglip_vlm.generate_choice(messages, choices)
            assert all(len(t) == 1 for t in scores.tokens)
            # the top choice's token is the best token the grammar admits: greedy takes it and stops
            assert generated.choice == scores.choice == words[0]
            assert generated.tokens == scores.tokens[generated.index]


def test_grammar_literals_are_escaped():
    assert gbnf_literal('a "b"\\\n') == '"a \\"b\\"\\\\\\n"'
    assert choice_grammar([" x", "y"]) == 'root ::= " x" | "y"\n'
