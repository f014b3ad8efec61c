"""Reply options for apps and the server: grammar-constrained replies (JSON schemas) and token log-probabilities."""

from __future__ import annotations

import codecs
import json
import math

import numpy as np
import pytest

import edgevlm
from edgevlm.errors import InvalidRequestError


def _question(painting, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(painting)}, {"type": "text", "text": text}]}]


def test_logprobs_are_the_models_own(siglip_vlm, painting):
    messages = _question(painting, "Name a colour.")
    logits = siglip_vlm.next_token_logits(messages)
    expected = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64) - logits.max()).sum()) - logits.max()
    reply = siglip_vlm.chat(messages, max_tokens=5, temperature=0, logprobs=4)
    assert len(reply.logprobs) == reply.completion_tokens > 0
    first = reply.logprobs[0]
    best = np.argsort(-expected)[:4]
    assert first.logprob == pytest.approx(expected[best[0]], abs=1e-4)  # greedy picked the argmax
    assert [a.logprob for a in first.top] == pytest.approx(list(expected[best]), abs=1e-4)
    assert [a.bytes for a in first.top] == [siglip_vlm_token_bytes(siglip_vlm, int(t)) for t in best]
    for token in reply.logprobs:
        assert token.logprob <= 0 and len(token.top) == 4
        assert sum(math.exp(a.logprob) for a in token.top) <= 1 + 1e-9
    # the reply is decoded incrementally: a trailing partial UTF-8 sequence is held back, not replaced
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(b"".join(t.bytes for t in reply.logprobs))
    assert text.strip() == reply.text.strip()


def siglip_vlm_token_bytes(vlm, token: int) -> bytes:
    """The bytes of one token, through the public detokenisation of a one-token reply."""
    return vlm.engine.model.token_bytes(token)


def test_no_logprobs_unless_asked(siglip_vlm, painting):
    reply = siglip_vlm.chat(_question(painting, "Hi"), max_tokens=3, temperature=0)
    assert reply.logprobs == ()
    with pytest.raises(InvalidRequestError, match="logprobs"):
        siglip_vlm.chat(_question(painting, "Hi"), max_tokens=3, logprobs=21)


def test_json_schema_grammar_constrains_the_reply(siglip_vlm, painting):
    schema = {"type": "object", "properties": {"genre": {"enum": ["portrait", "landscape", "still life"]},
                                               "year": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                                        "maxItems": 2}},
              "required": ["genre", "year", "tags"], "additionalProperties": False}
    grammar = edgevlm.json_grammar(schema)
    for seed in range(3):  # sampled, not greedy: the grammar, not luck, keeps it valid
        reply = siglip_vlm.chat(_question(painting, "JSON please."), max_tokens=80, temperature=1.0, seed=seed,
                                grammar=grammar)
        assert reply.finish_reason == "stop", reply
        parsed = json.loads(reply.text)
        assert set(parsed) == {"genre", "year", "tags"} and parsed["genre"] in schema["properties"]["genre"]["enum"]
        assert isinstance(parsed["year"], int) and len(parsed["tags"]) <= 2
        assert all(isinstance(t, str) and len(t) <= 5 for t in parsed["tags"])


def test_any_json_object_grammar(siglip_vlm):
    reply = siglip_vlm.chat([{"role": "user", "content": "An object, please."}], max_tokens=120, temperature=0.7,
                            seed=1, grammar=edgevlm.json_grammar())
    assert reply.text.lstrip().startswith("{")
    if reply.finish_reason == "stop":
        assert isinstance(json.loads(reply.text), dict)


def test_bad_grammars_and_schemas_are_clear_errors(siglip_vlm):
    with pytest.raises(InvalidRequestError, match="could not parse the grammar"):
        siglip_vlm.chat([{"role": "user", "content": "x"}], max_tokens=2, grammar="root ::= (((")
    with pytest.raises(InvalidRequestError, match="JSON schema"):
        edgevlm.json_grammar({"type": "object", "properties": {"a": {"$ref": "https://example.org/s.json"}}})
    with pytest.raises(InvalidRequestError, match=r"'minimum' \(the schema.properties.year\)"):
        edgevlm.json_grammar({"type": "object", "properties": {"year": {"type": "integer", "minimum": 1000}}})
    with pytest.raises(InvalidRequestError, match="must be an object"):
        edgevlm.json_grammar(["not", "a", "schema"])  # type: ignore[arg-type]
