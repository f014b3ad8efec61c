"""Generation: sampling options, the token loop, stop strings, streaming.

:class:`TextStream` is what :meth:`edgevlm.VLM.stream` returns: an iterator
of text pieces whose :attr:`TextStream.stats` holds the typed statistics of
the reply once the iteration has finished.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

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


class CancelToken(Protocol):
    """What ``cancel=`` takes: anything with ``is_set()``, e.g. a :class:`threading.Event`."""

    def is_set(self) -> bool: ...


@dataclass
class _Run:
    """The token loop's running state: what its statistics are made of."""

    started_at: float
    n_generated: int = 0
    finish: str = "length"
    first_token_at: float | None = None

    def stats(self, prefill: PrefillStats) -> GenerationStats:
        end = time.perf_counter()
        return GenerationStats(prefill=prefill, completion_tokens=self.n_generated, finish_reason=self.finish,
                               ttft_ms=((self.first_token_at or end) - self.started_at) * 1e3,
                               total_ms=(end - self.started_at) * 1e3)


def sample_reply(llm: LlamaModel, ctx: LlamaContext, kv: KVPrefix, options: SamplingOptions,
                 prefill: PrefillStats, started_at: float, done: Callable[[GenerationStats], None],
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """Sample after a prefill, committing each token to ``kv``; yields text pieces.

    Args:
        llm, ctx: the model and its context (holding the prompt).
        kv: the ledger the generated tokens are committed to.
        options: sampling options.
        prefill: the prompt's prefill statistics.
        started_at: ``time.perf_counter()`` at the request's start (for TTFT).
        done: receives the reply's statistics when the loop ends, is
            cancelled or is closed (finish reason "cancelled").
        cancelled: asked before each token; True ends the reply (nothing
            more is sampled).
    """
    sampler = Sampler(llm, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                      min_p=options.min_p, repeat_penalty=options.repeat_penalty,
                      seed=options.seed if options.seed is not None else ctx.options.seed)
    run = _Run(started_at)
    try:
        sampler.accept_history(kv.recent_tokens(64))
        yield from _token_loop(llm, ctx, kv, sampler, options, prefill.kv_cells, run, cancelled)
    except GeneratorExit:  # closed: every token so far is committed, the engine is consistent
        run.finish = "cancelled"
        done(run.stats(prefill))
        raise
    finally:
        sampler.close()
    done(run.stats(prefill))


def _token_loop(llm: LlamaModel, ctx: LlamaContext, kv: KVPrefix, sampler: Sampler, options: SamplingOptions,
                prompt_cells: int, run: _Run, cancelled: Callable[[], bool]) -> Iterator[str]:
    """Sample, decode and commit one token at a time, streaming text past the stop strings."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopMatcher(options.stop)
    started = False
    while run.n_generated < options.max_tokens:
        if cancelled():
            run.finish = "cancelled"
            break
        token = sampler.sample(ctx)
        run.first_token_at = run.first_token_at or time.perf_counter()
        if llm.is_eog(token):
            run.finish = "stop"
            break
        run.n_generated += 1
        pos = kv.cached_positions
        # cells in use once this token is in: the prompt's plus every generated token
        if max(pos + 1, prompt_cells + run.n_generated) > ctx.n_ctx:
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
            run.finish = "stop"
            break
    tail = stops.flush() if not stops.hit else ""
    if tail:
        yield tail


class TextStream:
    """A streamed reply: iterate for text pieces; :attr:`stats` / :meth:`reply` once finished.

    Decoding stops, within one token, when the ``cancel`` token is set (from
    any thread) or the stream is closed; the reply then ends with finish
    reason "cancelled" and :attr:`stats` is set. The engine stays consistent:
    the tokens generated so far are in its KV ledger, and the next request
    reuses or drops them like any other prefix. The engine is busy (other
    requests wait) until the stream has ended or been closed.

    Args:
        pieces: makes the generator of text pieces from the ``done`` callback
            and the ``cancelled`` predicate.
        cancel: the caller's cancel token (None: only :meth:`close` stops it).
    """

    def __init__(self, pieces: Callable[[Callable[[GenerationStats], None], Callable[[], bool]], Iterator[str]],
                 cancel: CancelToken | None = None) -> None:
        self.stats: GenerationStats | None = None
        self._text: list[str] = []
        self._cancel = cancel
        self._closed = threading.Event()
        self._owner: int | None = None  # the thread iterating (it holds the engine's lock)
        self._pieces = pieces(self._finish, self.cancelled)

    def _finish(self, stats: GenerationStats) -> None:
        self.stats = stats

    def cancelled(self) -> bool:
        """Whether the stream was closed or its cancel token set."""
        return self._closed.is_set() or (self._cancel is not None and self._cancel.is_set())

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        if self._owner is None:
            self._owner = threading.get_ident()
        piece = next(self._pieces)
        self._text.append(piece)
        return piece

    @property
    def text(self) -> str:
        """The text streamed so far."""
        return "".join(self._text)

    def close(self) -> None:
        """Stop generating: at once from the thread iterating, within one token from another.

        From another thread the stream ends at the iterating thread's next
        step (which then gets no more pieces); :attr:`stats` is set once it
        has. A stream closed before its first piece was asked for does no work
        and has no statistics.
        """
        self._closed.set()
        if self._owner is None or self._owner == threading.get_ident():
            try:
                self._pieces.close()
            except ValueError:  # pragma: no cover - another thread started iterating just now
                pass

    def reply(self) -> Reply:
        """Run to the end (if not yet) and return the whole reply.

        Raises:
            InvalidRequestError: the stream was closed before it started.
        """
        for _ in self:
            pass
        if self.stats is None:
            raise InvalidRequestError("the stream was closed before it started; there is no reply")
        return Reply.from_stats(self.text.rstrip(), self.stats)
