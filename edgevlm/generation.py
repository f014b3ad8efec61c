"""Generation: sampling options, the token loop, stop strings, streaming.

:class:`TextStream` is what :meth:`edgevlm.VLM.stream` returns: an iterator
of text pieces whose :attr:`TextStream.stats` holds the typed statistics of
the reply once the iteration has finished.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edgevlm.errors import InvalidRequestError
from edgevlm.llm import LlamaContext, LlamaModel, Sampler
from edgevlm.prefill import KVPrefix
from edgevlm.stats import GenerationStats, PrefillStats, Reply


@dataclass(frozen=True)
class SamplingOptions:
    """OpenAI-style generation options (temperature 0 = greedy)."""

    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = (("max_tokens", self.max_tokens >= 0), ("temperature", self.temperature >= 0),
                  ("top_p", 0 < self.top_p <= 1), ("top_k", self.top_k >= 0),
                  ("min_p", 0 <= self.min_p <= 1), ("repeat_penalty", self.repeat_penalty > 0))
        for name, ok in checks:
            if not ok:
                raise InvalidRequestError(f"invalid sampling option {name}={getattr(self, name)!r}")


class StopMatcher:
    """Streams text while holding back anything that could start a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.buffer = ""
        self.hit = False

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buffer += text
        for stop in self.stops:
            idx = self.buffer.find(stop)
            if idx >= 0:
                out, self.buffer, self.hit = self.buffer[:idx], "", True
                return out, True
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.buffer.endswith(s[:k])), default=0)
        out = self.buffer[:len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def sample_reply(llm: LlamaModel, ctx: LlamaContext, kv: KVPrefix, options: SamplingOptions,
                 prefill: PrefillStats, started_at: float,
                 done: Callable[[GenerationStats], None]) -> Iterator[str]:
    """Sample after a prefill, committing each token to ``kv``; yields text pieces.

    Args:
        llm, ctx: the model and its context (holding the prompt).
        kv: the ledger the generated tokens are committed to.
        options: sampling options.
        prefill: the prompt's prefill statistics.
        started_at: ``time.perf_counter()`` at the request's start (for TTFT).
        done: receives the reply's statistics when the loop ends.
    """
    sampler = Sampler(llm, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                      min_p=options.min_p, repeat_penalty=options.repeat_penalty,
                      seed=options.seed if options.seed is not None else ctx.options.seed)
    try:
        sampler.accept_history(kv.recent_tokens(64))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(options.stop)
        n_generated, finish, first_token_at, started = 0, "length", None, False
        while n_generated < options.max_tokens:
            token = sampler.sample(ctx)
            first_token_at = first_token_at or time.perf_counter()
            if llm.is_eog(token):
                finish = "stop"
                break
            n_generated += 1
            pos = kv.cached_positions
            # cells in use once this token is in: the prompt's plus every generated token
            if max(pos + 1, prefill.kv_cells + n_generated) > ctx.n_ctx:
                break
            ctx.decode_tokens([token], pos, logits_last=True)
            kv.commit([token], [pos, pos + 1])
            text = decoder.decode(llm.token_bytes(token))
            if not started:
                text = text.lstrip()
                started = bool(text)
            emit, hit = stops.feed(text)
            if emit:
                yield emit
            if hit:
                finish = "stop"
                break
        tail = stops.flush() if not stops.hit else ""
        if tail:
            yield tail
        end = time.perf_counter()
        done(GenerationStats(prefill=prefill, completion_tokens=n_generated, finish_reason=finish,
                             ttft_ms=((first_token_at or end) - started_at) * 1e3,
                             total_ms=(end - started_at) * 1e3))
    finally:
        sampler.close()


class TextStream:
    """A streamed reply: iterate for text pieces; :attr:`stats` / :meth:`reply` once finished.

    Closing it (or breaking out of the loop and dropping it) stops decoding;
    the engine stays consistent (the tokens generated so far are in its KV
    ledger, and the next request reuses or drops them like any other prefix).
    """

    def __init__(self, pieces: Callable[[Callable[[GenerationStats], None]], Iterator[str]]) -> None:
        self.stats: GenerationStats | None = None
        self._text: list[str] = []
        self._pieces = pieces(self._finish)

    def _finish(self, stats: GenerationStats) -> None:
        self.stats = stats

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        self._text.append(piece)
        return piece

    def close(self) -> None:
        """Stop generating now."""
        self._pieces.close()

    def reply(self) -> Reply:
        """Run to the end (if not yet) and return the whole reply."""
        for _ in self:
            pass
        if self.stats is None:
            raise InvalidRequestError("the stream was closed before it finished")
        return Reply.from_stats("".join(self._text).rstrip(), self.stats)
