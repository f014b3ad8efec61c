"""The OpenAI chat-completions schema: requests in, typed; responses and chunks out.

:func:`parse_chat_request` checks a request body field by field and turns it
into a :class:`ChatRequest` (the messages edgevlm's API takes, with images as
bytes fetched under the server's policy, and the sampling keyword arguments);
every refusal is a :class:`~edgevlm.server.sources.RequestRejected` naming the
field. The ``*_body``/``*_chunk`` functions build what the server sends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgevlm.errors import InvalidRequestError
from edgevlm.server.config import ServerConfig
from edgevlm.server.sources import RequestRejected, image_bytes

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.stats import GenerationStats, TokenLogprob

#: Roles accepted, and the one each is given to the model as.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: Request fields edgevlm cannot honour: refused, not silently ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "audio", "modalities", "prediction")
MAX_STOPS = 16


@dataclass
class ChatRequest:
    """A checked chat-completions request.

    Attributes:
        messages: the conversation as :meth:`edgevlm.VLM.stream` takes it (images as bytes).
        sampling: keyword arguments of :meth:`edgevlm.VLM.stream` (max_tokens, temperature, ...).
        stream: answer with server-sent events.
        include_usage: in a stream, end with a chunk carrying ``usage``.
        logprobs: report each token's log-probability.
        n_images: images in the request.
    """

    messages: list[dict[str, Any]]
    sampling: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    n_images: int = 0


def parse_chat_request(body: object, config: ServerConfig, n_ctx: int) -> ChatRequest:
    """Check a ``POST /v1/chat/completions`` body against the schema and the server's limits.

    Args:
        body: the decoded JSON body.
        config: the server's policy and limits.
        n_ctx: the model's context size (the default reply length is bounded by it).

    Raises:
        RequestRejected: the first field at fault, named.
    """
    if not isinstance(body, Mapping):
        raise RequestRejected("the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise RequestRejected(f"'{name}' is not supported by edgevlm serve", param=name,
                                  code="unsupported_parameter")
    if _opt_int(body, "n", 1, 1) != 1:
        raise RequestRejected("only n=1 is supported", param="n", code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _opt_number(body, name, -2.0, 2.0) not in (None, 0):
            raise RequestRejected(f"'{name}' is not supported; use repeat_penalty", param=name,
                                  code="unsupported_parameter")
    messages, n_images = _messages(body.get("messages"), config)
    request = ChatRequest(messages=messages, stream=_opt_bool(body, "stream"), n_images=n_images)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, Mapping):
            raise RequestRejected("'stream_options' must be an object", param="stream_options")
        request.include_usage = bool(options.get("include_usage"))
    request.logprobs = _opt_bool(body, "logprobs")
    request.sampling = _sampling(body, config, n_ctx, request.logprobs)
    return request


# --------------------------------------------------------------------------- fields

def _opt_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestRejected(f"'{name}' must be true or false", param=name)
    return value


def _opt_int(body: Mapping[str, Any], name: str, low: int, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestRejected(f"'{name}' must be an integer >= {low}, got {value!r}", param=name)
    return value


def _opt_number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise RequestRejected(f"'{name}' must be a number from {low:g} to {high:g}, got {value!r}", param=name)
    return float(value)


def _sampling(body: Mapping[str, Any], config: ServerConfig, n_ctx: int, logprobs: bool) -> dict[str, Any]:
    """The keyword arguments of ``VLM.stream`` from the request's sampling fields."""
    limit = config.max_tokens or n_ctx
    max_tokens = _opt_int(body, "max_completion_tokens", 1) or _opt_int(body, "max_tokens", 1) or limit
    if max_tokens > limit:
        raise RequestRejected(f"max_tokens is {max_tokens}; this server allows at most {limit}",
                              param="max_tokens")
    out: dict[str, Any] = {"max_tokens": max_tokens, "stop": _stops(body.get("stop"))}
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0),
                            ("repeat_penalty", 0.01, 10.0)):
        value = _opt_number(body, name, low, high)
        if value is not None:
            out[name] = value
    if out.get("top_p") == 0.0:
        out["top_p"] = 1e-6  # OpenAI allows 0: "only the most likely token"
    for name, low in (("top_k", 0), ("max_image_tokens", 1)):
        value = _opt_int(body, name, low)
        if value is not None:
            out[name] = value
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RequestRejected(f"'seed' must be an integer, got {seed!r}", param="seed")
        out["seed"] = seed
    top = _opt_int(body, "top_logprobs", 0)
    if top is not None and (top > 20 or not logprobs):
        raise RequestRejected("'top_logprobs' must be 0-20 and needs 'logprobs': true", param="top_logprobs")
    if logprobs:
        out["logprobs"] = top or 0
    grammar = _grammar(body.get("response_format"))
    if grammar is not None:
        out["grammar"] = grammar
    return out


def _stops(value: object) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise RequestRejected(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    return [s for s in stops if s]


def _grammar(value: object) -> str | None:
    """The GBNF a ``response_format`` asks for (None: free text)."""
    import edgevlm

    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return None
    try:
        if kind == "json_object":
            return edgevlm.json_grammar(None)
        if kind == "json_schema":
            spec = value.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            if not isinstance(schema, (Mapping, bool)):
                raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object")
            return edgevlm.json_grammar(schema)
    except InvalidRequestError as exc:
        raise RequestRejected(str(exc), param="response_format", code="invalid_schema") from None
    raise RequestRejected("response_format.type must be 'text', 'json_object' or 'json_schema'",
                          param="response_format")


def _messages(value: object, config: ServerConfig) -> tuple[list[dict[str, Any]], int]:
    if not isinstance(value, list) or not value:
        raise RequestRejected("'messages' must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    n_images = 0
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestRejected(f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestRejected(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                                  param=f"{where}.role")
        if message.get("tool_calls"):
            raise RequestRejected(f"{where}: tool calls are not supported", param=f"{where}.tool_calls",
                                  code="unsupported_parameter")
        content, images = _content(message.get("content"), where, config, n_images)
        n_images += images
        out.append({"role": ROLES[str(role)], "content": content})
    return out, n_images


def _content(value: object, where: str, config: ServerConfig, seen: int) -> tuple[str | list[dict[str, Any]], int]:
    if value is None or isinstance(value, str):
        return value or "", 0
    if not isinstance(value, list):
        raise RequestRejected(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    parts: list[dict[str, Any]] = []
    images = 0
    for j, part in enumerate(value):
        place = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if seen + images >= config.max_images:
                raise RequestRejected(f"{place}: more than {config.max_images} images in one request",
                                      param=place, code="too_many_images")
            parts.append({"type": "image", "image": image_bytes(_image_url(part, place), place, config)})
            images += 1
        else:
            raise RequestRejected(f"{place}: a part must be {{'type': 'text', 'text': ...}} or "
                                  f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}", param=place)
    return parts, images


def _image_url(part: Mapping[str, Any], place: str) -> str:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, Mapping) else spec
    if not isinstance(url, str) or not url.strip():
        raise RequestRejected(f"{place}.image_url.url must be a non-empty string", param=f"{place}.image_url")
    return url


# --------------------------------------------------------------------------- responses

def logprobs_body(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[0].logprobs`` for these tokens."""
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes),
                         "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)}
                                          for a in t.top]} for t in tokens], "refusal": None}


def usage_body(stats: GenerationStats) -> dict[str, Any]:
    """``usage``: prompt positions (images included), generated tokens, positions reused from earlier requests."""
    prompt = stats.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": stats.completion_tokens,
            "total_tokens": prompt + stats.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.prefill.reused_positions}}


def finish_reason(stats: GenerationStats) -> str:
    return "length" if stats.finish_reason == "length" else "stop"


@dataclass(frozen=True)
class ResponseHead:
    """What every response and chunk of one completion shares."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def fields(self, kind: str) -> dict[str, Any]:
        from edgevlm import __version__

        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": f"edgevlm-{__version__}"}


def completion_body(head: ResponseHead, text: str, stats: GenerationStats,
                    logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
    """A whole ``chat.completion``."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
              "logprobs": logprobs_body(logprobs) if logprobs is not None else None,
              "finish_reason": finish_reason(stats)}
    return {**head.fields("chat.completion"), "choices": [choice], "usage": usage_body(stats)}


def chunk_body(head: ResponseHead, delta: dict[str, Any], *, finish: str | None = None,
               logprobs: Sequence[TokenLogprob] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a choice."""
    choice = {"index": 0, "delta": delta, "logprobs": logprobs_body(logprobs) if logprobs else None,
              "finish_reason": finish}
    return {**head.fields("chat.completion.chunk"), "choices": [choice]}


def usage_chunk(head: ResponseHead, stats: GenerationStats) -> dict[str, Any]:
    """The last chunk of a stream that asked for usage (no choices)."""
    return {**head.fields("chat.completion.chunk"), "choices": [], "usage": usage_body(stats)}


def error_body(message: str, *, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
