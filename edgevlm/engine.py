"""The engine: keeps the KV cache in step with prompts, encodes images, generates.

The context remembers which chunk identities it holds (text tokens, image
keys). A new request evaluates only what follows the longest common prefix
with what is cached; the rest of the cache is dropped. A follow-up question in
a chat therefore evaluates only the new turn, and an image already in the
prefix is neither encoded nor decoded again. Image embeddings are also kept in
a small in-memory LRU so that an image reappearing after a divergence is not
re-encoded.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from edgevlm.chunks import Chunk, EmbeddingChunk, ImageChunk, TextChunk, kv_cells, unit_positions
from edgevlm.errors import InvalidRequestError, UnsupportedModelError
from edgevlm.llm import LlamaContext, LlamaModel, Sampler
from edgevlm.prompt import Message, build_prompt
from edgevlm.vision.images import LoadedImage

LOG = logging.getLogger("edgevlm")


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


@dataclass
class PrefillStats:
    """What one prefill did (for --verbose, bench and tests)."""

    prompt_positions: int = 0
    kv_cells: int = 0  # KV cells the prompt fills (> prompt_positions with M-RoPE images)
    reused_positions: int = 0
    evaluated_positions: int = 0
    images_encoded: int = 0
    images_from_cache: int = 0
    encode_ms: float = 0.0
    decode_ms: float = 0.0
    snapshot_restored: bool = False


@dataclass
class Reply:
    """The result of :meth:`edgevlm.VLM.chat`; ``str(reply)`` is the text."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prefill: PrefillStats = field(default_factory=PrefillStats)
    timings: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


class EmbeddingLRU:
    """In-memory image-embedding cache with a byte budget."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> np.ndarray | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._items[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.nbytes


class Engine:
    """One model + context + optional vision encoder, with prefix reuse."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, encoder: Any | None, *,
                 template: str | None, family: str, store: Any | None = None,
                 snapshots: Any | None = None, layout: Any | None = None) -> None:
        self.model = model
        self.ctx = ctx
        self.encoder = encoder
        self.template = template
        self.family = family
        self.layout = layout  # builds chunks itself (edgevlm.layouts), else the template does
        self.lock = threading.RLock()
        self.embeddings = EmbeddingLRU()
        self.store = store  # disk tier (edgevlm.cache.EmbeddingStore) or None
        self.snapshots = snapshots  # edgevlm.snapshots.SnapshotStore or None
        self._units: list[tuple[str, Any]] = []
        self._starts: list[int] = [0]
        self.last_prefill = PrefillStats()
        self._bos = model.token_text(model.bos) if model.add_bos and model.bos >= 0 else ""
        self._eos = model.token_text(model.eos) if model.eos >= 0 else ""

    # ------------------------------------------------------------------ prompt
    def prompt_text(self, messages: list[Message], *, gen: bool = True) -> tuple[str, list[LoadedImage]]:
        if self.layout is not None:
            return self.layout.text(messages, gen=gen)
        marker = self.encoder.marker if self.encoder else "<__media__>"
        return build_prompt(messages, marker, template=self.template, family=self.family, gen=gen,
                            bos=self._bos, eos=self._eos)

    def chunks(self, messages: list[Message], *, gen: bool = True) -> list[Chunk]:
        """Messages -> the chunks the context must hold."""
        if self.layout is not None:
            return self.layout.build_chunks(messages, gen=gen)
        text, images = self.prompt_text(messages, gen=gen)
        if images and self.encoder is None:
            raise UnsupportedModelError(
                "this model was loaded without a vision projector; pass mmproj=... / --mmproj")
        if self.encoder is not None:
            return self.encoder.tokenize(text, images, add_special=True)
        return [TextChunk(tuple(self.model.tokenize(text, add_special=True)))]

    # ------------------------------------------------------------------ KV
    def reset(self) -> None:
        with self.lock:
            self.ctx.clear()
            self._units, self._starts = [], [0]

    @property
    def cached_positions(self) -> int:
        return self._starts[len(self._units)] if self._units else 0

    def image_embeddings(self, chunk: ImageChunk, stats: PrefillStats | None = None) -> np.ndarray:
        """Embeddings of an image chunk: RAM cache, then disk cache, then the encoder."""
        cached = self.embeddings.get(chunk.key)
        if cached is None and self.store is not None:
            cached = self.store.get(chunk.key)
            if cached is not None and cached.shape != (chunk.n_tokens, self.model.n_embd_inp):
                cached = None  # a stale entry of another shape: recompute
            if cached is not None:
                self.embeddings.put(chunk.key, cached)
        if cached is not None:
            if stats:
                stats.images_from_cache += 1
            return cached
        t0 = time.perf_counter()
        embd = self.encoder.encode(chunk)
        if stats:
            stats.encode_ms += (time.perf_counter() - t0) * 1e3
            stats.images_encoded += 1
        self.embeddings.put(chunk.key, embd)
        if self.store is not None:
            self.store.put(chunk.key, embd)
        return embd

    def prefill(self, chunks: list[Chunk]) -> PrefillStats:
        """Make the context hold ``chunks`` with logits for the last position."""
        with self.lock:
            units, starts, owners = unit_positions(chunks)
            if not units:
                raise InvalidRequestError("the prompt is empty")
            total, cells = starts[-1], kv_cells(chunks)
            self.ctx.check_fits(max(total, cells))
            keep = _common_prefix(self._units, units)
            if keep == len(units):
                keep -= 1  # re-evaluate the last unit to get fresh logits
            boundary = _snapshot_boundary(units) if self.snapshots is not None else 0
            restored = boundary > keep and self._restore_snapshot(units, starts, boundary)
            if restored:
                keep = boundary
            else:
                keep = min(keep, len(self._units))  # a refused restore leaves the KV empty
                self.ctx.truncate(starts[keep])
                self._units, self._starts = self._units[:keep], self._starts[:keep + 1]
            stats = PrefillStats(prompt_positions=total, kv_cells=cells,
                                 reused_positions=starts[keep],
                                 evaluated_positions=total - starts[keep], snapshot_restored=restored)
            t0 = time.perf_counter()
            save_at = boundary if boundary > keep else 0
            self._evaluate(units, starts, owners, keep, stats, save_at)
            stats.decode_ms = (time.perf_counter() - t0) * 1e3 - stats.encode_ms
            self.last_prefill = stats
            LOG.info("prefill: %d positions, %d reused from the KV cache, %d evaluated; images: "
                     "%d encoded (%.0f ms), %d from the embedding cache",
                     stats.prompt_positions, stats.reused_positions, stats.evaluated_positions,
                     stats.images_encoded, stats.encode_ms, stats.images_from_cache)
            return stats

    def _restore_snapshot(self, units: list, starts: list[int], boundary: int) -> bool:
        found = self.snapshots.load(units[:boundary])
        if found is None or found[0] != starts[boundary]:
            return False
        if not self.ctx.restore_state(found[1]):
            LOG.warning("llama.cpp refused a KV snapshot; evaluating instead")
            self._units, self._starts = [], [0]
            return False
        self._units, self._starts = list(units[:boundary]), list(starts[:boundary + 1])
        LOG.info("restored a KV snapshot of %d positions", starts[boundary])
        return True

    def _save_snapshot(self) -> None:
        try:
            self.snapshots.save(list(self._units), self.cached_positions, self.ctx.save_state())
        except Exception as exc:  # noqa: BLE001 - a cache must never break a request
            LOG.warning("could not save a KV snapshot: %s", exc)

    def _evaluate(self, units: list, starts: list[int], owners: list[Chunk], first: int,
                  stats: PrefillStats, save_at: int = 0) -> None:
        run: list[int] = []
        run_start = starts[first]
        i = first
        while i < len(units):
            owner = owners[i]
            if isinstance(owner, TextChunk):
                if not run:
                    run_start = starts[i]
                run.append(units[i][1])
                i += 1
                continue
            if run:
                self.ctx.decode_tokens(run, run_start, logits_last=False)
                self._commit(units[i - len(run):i], starts[i - len(run):i + 1])
                run = []
            if isinstance(owner, ImageChunk):
                embd = self.image_embeddings(owner, stats)
                self.encoder.decode(self.ctx, owner, embd, starts[i])
            else:
                self.ctx.decode_embeddings(owner.embeddings, starts[i], causal=owner.causal,
                                           logits_last=i == len(units) - 1)
            self._commit(units[i:i + 1], starts[i:i + 2])
            i += 1
            if i == save_at:
                self._save_snapshot()
        if run:
            self.ctx.decode_tokens(run, run_start, logits_last=True)
            self._commit(units[len(units) - len(run):], starts[len(units) - len(run):])

    def _commit(self, units: list, starts: list[int]) -> None:
        """Record units now in the KV cache; ``starts`` has one more entry (the end)."""
        self._units.extend(units)
        self._starts[len(self._starts) - 1:] = starts[:len(units) + 1]

    def logits(self) -> np.ndarray:
        return self.ctx.logits()

    # ------------------------------------------------------------------ generation
    def generate(self, chunks: list[Chunk], options: SamplingOptions,
                 stats_out: dict[str, Any] | None = None) -> Iterator[str]:
        """Prefill ``chunks`` and stream the reply as text pieces."""
        with self.lock:
            t0 = time.perf_counter()
            stats = self.prefill(chunks)
            sampler = Sampler(self.model, temperature=options.temperature, top_k=options.top_k,
                              top_p=options.top_p, min_p=options.min_p,
                              repeat_penalty=options.repeat_penalty,
                              seed=options.seed if options.seed is not None else self.ctx.options.seed)
            try:
                history = [u[1] for u in self._units[-64:] if u[0] == "t"]
                sampler.accept_history(history)
                yield from self._sample_loop(sampler, options, stats, t0, stats_out)
            finally:
                sampler.close()

    def _sample_loop(self, sampler: Sampler, options: SamplingOptions, stats: PrefillStats,
                     t0: float, stats_out: dict[str, Any] | None) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(options.stop)
        n_generated, finish, first_token_at = 0, "length", None
        started = False
        while n_generated < options.max_tokens:
            token = sampler.sample(self.ctx)
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if self.model.is_eog(token):
                finish = "stop"
                break
            n_generated += 1
            pos = self.cached_positions
            # cells in use once this token is in: the prompt's plus every generated token
            if max(pos + 1, stats.kv_cells + n_generated) > self.ctx.n_ctx:
                finish = "length"
                break
            self.ctx.decode_tokens([token], pos, logits_last=True)
            self._commit([("t", token)], [pos, pos + 1])
            text = decoder.decode(self.model.token_bytes(token))
            if not started:
                text = text.lstrip()
                started = bool(text)
            emit, hit = stops.feed(text)
            if emit:
                yield emit
            if hit:
                finish = "stop"
                break
        if not stops.hit:
            tail = stops.flush()
            if tail:
                yield tail
        if stats_out is not None:
            end = time.perf_counter()
            stats_out.update(prefill=stats, completion_tokens=n_generated, finish_reason=finish,
                             prompt_tokens=stats.prompt_positions,
                             ttft_ms=((first_token_at or end) - t0) * 1e3,
                             total_ms=(end - t0) * 1e3)


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


def _snapshot_boundary(units: list) -> int:
    """Units up to and including the last image chunk (0 if none).

    That prefix is what "same image, new question" shares; a prompt that ends
    with it has nothing after it to ask, so it is not snapshotted.
    """
    last = max((i for i, u in enumerate(units) if u[0] == "i"), default=-1)
    return last + 1 if 0 <= last < len(units) - 1 else 0


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
