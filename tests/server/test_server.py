"""``edgevlm serve`` through the official ``openai`` client, against a real server process on a loopback port."""

from __future__ import annotations

import codecs
import concurrent.futures
import json
import math
import time
import urllib.request

import psutil
import pytest

from tests.server.serving import data_url, health, image_message, random_png, running_server

openai = pytest.importorskip("openai")

API_KEY = "test-key-7f3a"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def server(siglip_f32, tmp_path_factory, allowed_dir):
    with running_server(siglip_f32, tmp_path_factory.mktemp("serve-home"), "--ctx", "1024", "--api-key", API_KEY,
                        "--allow-dir", str(allowed_dir), "--max-queue", "16") as (base, proc):
        yield base, proc


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=API_KEY, max_retries=0, timeout=120)


def _ask(client, messages, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model="anything", messages=messages, **kwargs)


def test_models_and_health(server, client):
    models = client.models.list().data
    assert len(models) == 1
    card = models[0].model_dump()
    assert card["id"] == health(server[0])["model"]
    assert card["input_modalities"] == ["text", "image"] and card["context_length"] == 1024
    assert card["id"] == client.models.retrieve(card["id"]).id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert health(server[0])["status"] == "ok"


def test_stream_and_non_stream_give_the_same_text(client, painting):
    messages = [image_message(data_url(painting), "What is in this painting?")]
    whole = _ask(client, messages, max_tokens=24)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length") and text
    assert whole.usage.prompt_tokens > 16 and whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(_ask(client, messages, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_follow_up_reuses_the_conversation(client, painting):
    first_messages = [image_message(data_url(painting), "Describe the colours.")]
    first = _ask(client, first_messages, max_tokens=12)
    follow = first_messages + [{"role": "assistant", "content": first.choices[0].message.content},
                               {"role": "user", "content": "And the shapes?"}]
    second = _ask(client, follow, max_tokens=12)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the image and the first question are reused from the KV cache: only the new turn is evaluated
    # (a random model's reply may re-tokenise differently, so the reply's own tokens can be re-read)
    assert cached >= first.usage.prompt_tokens - 1, (cached, first.usage.prompt_tokens)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert cached < second.usage.prompt_tokens


def test_eight_clients_at_once_get_their_own_answers(client):
    prompts = [f"Question number {i}: what do you see?" for i in range(8)]
    alone = {p: _ask(client, [image_message(data_url(random_png(i)), p)], max_tokens=8).choices[0].message.content
             for i, p in enumerate(prompts)}

    def ask(i: int) -> str:
        local = openai.OpenAI(base_url=client.base_url, api_key=API_KEY, max_retries=0, timeout=300)
        return _ask(local, [image_message(data_url(random_png(i)), prompts[i])], max_tokens=8).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = dict(zip(prompts, pool.map(ask, range(8))))
    assert together == alone  # greedy decoding: the same answer whatever ran before or beside it


def test_json_schema_and_json_object_are_constrained(client, painting):
    schema = {"type": "object", "properties": {"genre": {"type": "string", "enum": ["portrait", "landscape"]},
                                               "score": {"type": "integer"}},
              "required": ["genre", "score"], "additionalProperties": False}
    reply = _ask(client, [image_message(data_url(painting), "Classify it as JSON.")], max_tokens=64,
                 response_format={"type": "json_schema", "json_schema": {"name": "genre", "schema": schema}})
    parsed = json.loads(reply.choices[0].message.content)
    assert set(parsed) == {"genre", "score"} and parsed["genre"] in ("portrait", "landscape")
    assert isinstance(parsed["score"], int)
    any_object = _ask(client, [{"role": "user", "content": "Answer in JSON."}], max_tokens=96, temperature=1.0,
                      seed=3, response_format={"type": "json_object"})
    if any_object.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(any_object.choices[0].message.content), dict)
    else:  # cut at max_tokens: still a prefix of one JSON object
        assert any_object.choices[0].message.content.lstrip().startswith("{")


def test_logprobs(client, painting):
    reply = _ask(client, [image_message(data_url(painting), "Name a colour.")], max_tokens=6, logprobs=True,
                 top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for token in content:
        tops = [t.logprob for t in token.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert token.logprob == pytest.approx(tops[0], abs=1e-6)  # greedy: the most likely token
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-6
        assert bytes(token.bytes).decode("utf-8", "replace") == token.token
    raw = b"".join(bytes(t.bytes) for t in content)  # decoded as streamed: a trailing partial character held back
    assert codecs.getincrementaldecoder("utf-8")("replace").decode(raw).strip() == reply.choices[0].message.content.strip()


def test_bad_inputs_are_openai_errors(client, server, allowed_dir, tmp_path):

    png = random_png(1)
    (allowed_dir / "ok.png").write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)
    cases = [
        (openai.BadRequestError, "invalid_image", [image_message(data_url(b"this is not an image at all"), "hi")]),
        (openai.BadRequestError, "invalid_image", [image_message(data_url(png[:60]), "hi")]),  # truncated
        (openai.PermissionDeniedError, "unsafe_image_source", [image_message(f"file://{tmp_path}/secret.png", "hi")]),
        (openai.PermissionDeniedError, "unsafe_image_source",
         [image_message(f"file://{allowed_dir}/../{tmp_path.name}/secret.png", "hi")]),
        (openai.PermissionDeniedError, "unsafe_image_source", [image_message("http://127.0.0.1:9/x.png", "hi")]),
        (openai.BadRequestError, "context_length_exceeded", [{"role": "user", "content": "word " * 3000}]),
        (openai.BadRequestError, "invalid_request", [{"role": "robot", "content": "hi"}]),
    ]
    for error, code, messages in cases:
        with pytest.raises(error) as info:
            _ask(client, messages, max_tokens=4)
        body = info.value.body
        assert body["code"] == code, body
        assert "Traceback" not in body["message"] and " at 0x" not in body["message"], body
    ok = _ask(client, [image_message(f"file://{allowed_dir}/ok.png", "hi")], max_tokens=2)
    assert ok.usage.prompt_tokens > 16
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, [{"role": "user", "content": "hi"}], max_tokens=4,
             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, [{"role": "user", "content": "hi"}], n=2)
    assert info.value.body["param"] == "n"
    wrong = openai.OpenAI(base_url=server[0], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    _raw_errors(server[0])
    assert health(server[0])["status"] == "ok"


def _raw_errors(base: str) -> None:
    """Malformed JSON and an oversized body, sent without the client's help."""
    def post(body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        request = urllib.request.Request(base + "/chat/completions", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {API_KEY}", **headers})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = post(b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(b"[]", {"Content-Type": "application/json"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(b"{}", {"Content-Length": str(10 ** 12)})
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_a_client_that_goes_away_stops_the_generation(server):
    base = server[0]
    before = health(base)
    client = openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0, timeout=120)
    stream = _ask(client, [{"role": "user", "content": "Tell me a long story."}], max_tokens=900, temperature=1.0,
                  seed=5, stream=True)
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while health(base)["requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = health(base)
    assert after["requests"] == 0
    assert after["cancelled"] == before["cancelled"] + 1
    generated = after["generated_tokens"] - before["generated_tokens"]
    assert 0 < generated < 900


def test_memory_stays_flat_over_many_distinct_images(client, server):
    process = psutil.Process(server[1].pid)

    def ask(i: int) -> None:
        _ask(client, [image_message(data_url(random_png(1000 + i, (64, 48))), "What is it?")], max_tokens=2)

    for i in range(25):  # warm-up: caches and parked conversations fill to their bounds
        ask(i)
    settled = process.memory_info().rss
    for i in range(25, 85):
        ask(i)
    grown = process.memory_info().rss - settled
    assert grown < 24 * 2 ** 20, f"server RSS grew {grown / 2 ** 20:.1f} MiB over 60 new images"


def test_full_queue_answers_503_with_retry_after(siglip_f32, tmp_path_factory):
    with running_server(siglip_f32, tmp_path_factory.mktemp("queue-home"), "--ctx", "1024",
                        "--max-queue", "1") as (base, _proc):
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
        running = _ask(client, [{"role": "user", "content": "Go on and on."}], max_tokens=900, temperature=1.0,
                       seed=1, stream=True)
        next(iter(running))  # the first request is generating
        waiting: concurrent.futures.Future = concurrent.futures.ThreadPoolExecutor(1).submit(
            _ask, client, [{"role": "user", "content": "Second."}], max_tokens=2)
        deadline = time.monotonic() + 30
        while health(base)["requests"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as info:
            _ask(client, [{"role": "user", "content": "Third."}], max_tokens=2)
        assert info.value.status_code == 503
        assert int(info.value.response.headers["retry-after"]) >= 1
        running.close()  # the client goes away: the waiting request runs next
        assert waiting.result(timeout=120).choices[0].message.content is not None


def test_refuses_a_taken_port_in_one_line(siglip_f32, tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "serve", "--model", str(siglip_f32),
                               "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error: cannot listen on 127.0.0.1:"), proc.stderr
