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
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgevlm.errors import InvalidRequestError
from edgevlm.llm import LlamaContext, LlamaModel, Sampler
from edgevlm.prefill import KVPrefix
from edgevlm.stats import GenerationStats, PrefillStats, Reply, TokenAlternative, TokenLogprob

#: Most alternatives a reply can report per token (``logprobs=``), as in the OpenAI API.
MAX_TOP_LOGPROBS = 20


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
    grammar: str | None = None  # GBNF (rule "root") every reply must follow
    logprobs: int | None = None  # None: no log-probabilities; k: each token's and its k best alternatives

    def __post_init__(self) -> None:
        checks = (("max_tokens", self.max_tokens >= 0), ("temperature", self.temperature >= 0),
                  ("top_p", 0 < self.top_p <= 1), ("top_k", self.top_k >= 0),
                  ("min_p", 0 <= self.min_p <= 1), ("repeat_penalty", self.repeat_penalty > 0),
                  ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS))
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
class StreamHooks:
    """How a reply's token loop talks to its :class:`TextStream`.

    Attributes:
        done: receives the reply's statistics when the loop ends, is
            cancelled or is closed (finish reason "cancelled").
        cancelled: asked before each token; True ends the reply.
        logprobs: where each generated token's log-probabilities are appended
            (when the options ask for them).
    """

    done: Callable[[GenerationStats], None]
    cancelled: Callable[[], bool]
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def also_cancel_when(self, stop: Callable[[], bool]) -> None:
        """End the reply when ``stop()`` is true as well (an engine closed while it streams)."""
        asked = self.cancelled
        self.cancelled = lambda: stop() or asked()


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


class TokenDecoder(Protocol):
    """The model side of the token loop: whatever holds the prompt and decodes one token at a time."""

    def sample(self, sampler: Sampler) -> int:
        """The next token under ``sampler`` (accepted into its chain)."""
        ...

    def logits(self) -> np.ndarray:
        """The current next-token logits (n_vocab,)."""
        ...

    def fits(self, n_generated: int) -> bool:
        """Whether the context has room for the ``n_generated``-th generated token."""
        ...

    def append(self, token: int) -> None:
        """Decode ``token`` after what is held; the logits become the next token's."""
        ...


class ContextDecoder:
    """:class:`TokenDecoder` on a llama.cpp context, committing each token to the KV ledger."""

    def __init__(self, ctx: LlamaContext, kv: KVPrefix, prompt_cells: int) -> None:
        self.ctx, self.kv, self.prompt_cells = ctx, kv, prompt_cells

    def sample(self, sampler: Sampler) -> int:
        return sampler.sample(self.ctx)

    def logits(self) -> np.ndarray:
        return self.ctx.logits()

    def fits(self, n_generated: int) -> bool:
        # cells in use once this token is in: the prompt's plus every generated token
        pos = self.kv.cached_positions
        return max(pos + 1, self.prompt_cells + n_generated) <= self.ctx.n_ctx

    def append(self, token: int) -> None:
        pos = self.kv.cached_positions
        self.ctx.decode_tokens([token], pos, logits_last=True)
        self.kv.commit([token], [pos, pos + 1])


def sample_reply(llm: LlamaModel, ctx: LlamaContext, kv: KVPrefix, options: SamplingOptions,
                 prefill: PrefillStats, started_at: float, hooks: StreamHooks) -> Iterator[str]:
    """Sample after a prefill, committing each token to ``kv``; yields text pieces.

    Args:
        llm, ctx: the model and its context (holding the prompt).
        kv: the ledger the generated tokens are committed to.
        options: sampling options.
        prefill: the prompt's prefill statistics.
        started_at: ``time.perf_counter()`` at the request's start (for TTFT).
        hooks: the stream's callbacks (statistics, cancellation, log-probabilities).
    """
    decoder = ContextDecoder(ctx, kv, prefill.kv_cells)
    yield from run_reply(llm, decoder, options, ReplyStart(prefill, started_at, ctx.options.seed,
                                                           kv.recent_tokens(64)), hooks)


@dataclass(frozen=True)
class ReplyStart:
    """Where a reply starts: its prefill, the request's start time, the default seed, recent tokens."""

    prefill: PrefillStats
    started_at: float
    seed: int
    history: tuple[int, ...] | list[int] = ()


def run_reply(vocab: LlamaModel, decoder: TokenDecoder, options: SamplingOptions, start: ReplyStart,
              hooks: StreamHooks) -> Iterator[str]:
    """The token loop on any :class:`TokenDecoder`: llama.cpp's sampler chain, stop strings, statistics.

    Args:
        vocab: the model's vocabulary (llama.cpp: sampler, grammar, token text).
        decoder: holds the prompt; decodes the sampled tokens.
        options: sampling options (``seed`` None: ``start.seed``).
        start: the prefill statistics, start time, default seed and the prompt's last tokens
            (the repeat-penalty window).
        hooks: the stream's callbacks.
    """
    sampler = Sampler(vocab, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                      min_p=options.min_p, repeat_penalty=options.repeat_penalty,
                      seed=options.seed if options.seed is not None else start.seed,
                      grammar=options.grammar)
    run = _Run(start.started_at)
    try:
        sampler.accept_history(list(start.history))
        yield from _token_loop(vocab, decoder, sampler, options, run, hooks)
    except GeneratorExit:  # closed: every token so far is committed, the engine is consistent
        run.finish = "cancelled"
        hooks.done(run.stats(start.prefill))
        raise
    finally:
        sampler.close()
    hooks.done(run.stats(start.prefill))


def token_logprob(llm: LlamaModel, logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` and the ``n_top`` most likely tokens'."""
    shifted = logits.astype(np.float64) - float(np.max(logits))
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top: tuple[TokenAlternative, ...] = ()
    if n_top > 0:
        best = np.argpartition(-logprobs, min(n_top, len(logprobs) - 1))[:n_top]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        top = tuple(_alternative(llm, int(t), float(logprobs[t])) for t in best)
    chosen = _alternative(llm, token, float(logprobs[token]))
    return TokenLogprob(chosen.token, chosen.bytes, chosen.logprob, top)


def _alternative(llm: LlamaModel, token: int, logprob: float) -> TokenAlternative:
    raw = llm.token_bytes(token)
    return TokenAlternative(raw.decode("utf-8", errors="replace"), raw, logprob)


def _token_loop(llm: LlamaModel, decoder: TokenDecoder, sampler: Sampler, options: SamplingOptions,
                run: _Run, hooks: StreamHooks) -> Iterator[str]:
    """Sample, decode and commit one token at a time, streaming text past the stop strings."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopMatcher(options.stop)
    started = False
    while run.n_generated < options.max_tokens:
        if hooks.cancelled():
            run.finish = "cancelled"
            break
        token = decoder.sample(sampler)
        run.first_token_at = run.first_token_at or time.perf_counter()
        if llm.is_eog(token):
            run.finish = "stop"
            break
        run.n_generated += 1
        if not decoder.fits(run.n_generated):
            break
        if options.logprobs is not None:  # before the decode below replaces the logits
            hooks.logprobs.append(token_logprob(llm, decoder.logits(), token, options.logprobs))
        decoder.append(token)
        text = utf8.decode(llm.token_bytes(token))
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
        pieces: makes the generator of text pieces from the stream's hooks
            (statistics callback, cancellation predicate, log-probability list).
        cancel: the caller's cancel token (None: only :meth:`close` stops it).
    """

    def __init__(self, pieces: Callable[[StreamHooks], Iterator[str]], cancel: CancelToken | None = None) -> None:
        self.stats: GenerationStats | None = None
        self._text: list[str] = []
        self._cancel = cancel
        self._closed = threading.Event()
        self._owner: int | None = None  # the thread iterating (it holds the engine's lock)
        self._hooks = StreamHooks(self._finish, self.cancelled)
        self._pieces = pieces(self._hooks)

    def _finish(self, stats: GenerationStats) -> None:
        self.stats = stats

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """Each generated token's log-probabilities so far (empty unless ``logprobs=`` was given).

        A token held back by a stop string is listed before its text is streamed.
        """
        return self._hooks.logprobs

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
        return Reply.from_stats(self.text.rstrip(), self.stats, tuple(self._hooks.logprobs))
