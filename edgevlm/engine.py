"""The engine: keeps the KV cache in step with prompts, encodes images, generates.

The context remembers which chunk identities it holds (text tokens, image
keys). A new request evaluates only what follows the longest common prefix
with what is cached; the rest of the cache is dropped. A follow-up question in
a chat therefore evaluates only the new turn, and an image already in the
prefix is neither encoded nor decoded again. Image embeddings are also kept in
a small in-memory LRU so that an image reappearing after a divergence is not
re-encoded.

Several conversations in one process: when a request diverges from the live
sequence inside its prompt, the live state is parked in RAM
(``edgevlm.parking``) and the parked state sharing the longest prefix with a
later request is restored when it beats the live one. Persistent snapshots
(``edgevlm.snapshots``) cover image prefixes and long text prefixes across
processes.
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

from edgevlm.chunks import Chunk, ImageChunk, TextChunk, kv_cells, unit_positions
from edgevlm.errors import EdgeVLMError, InvalidRequestError, UnsupportedModelError
from edgevlm.llm import LlamaContext, LlamaModel, Sampler
from edgevlm.parking import ParkedState, ParkedStates, common_prefix
from edgevlm.prompt import ImagePart, Message, build_prompt, precompile
from edgevlm.snapshots import snapshot_boundaries
from edgevlm.vision.images import LoadedImage, preload_decoders

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
    parked_restored: bool = False
    restore_ms: float = 0.0
    snapshots_saved: int = 0
    images_reused: int = 0  # images in the reused prefix: neither encoded nor decoded
    saved_ms: float = 0.0  # estimated encode + prefill time avoided (this process's rates)


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
        self.parked = ParkedStates()  # other conversations' KV states (RAM)
        self._units: list[tuple[str, Any]] = []
        self._starts: list[int] = [0]
        self._prompt_end = 0  # units of the last prompt (generated tokens follow)
        self._rates = {"position_ms": 0.0, "image_ms": 0.0}  # last measured prefill costs
        self.last_prefill = PrefillStats()
        self._bos = model.token_text(model.bos) if model.add_bos and model.bos >= 0 else ""
        self._eos = model.token_text(model.eos) if model.eos >= 0 else ""
        # one-time work belongs to load, not to the first request's time to first token
        if template:
            precompile(template)
        if encoder is not None:
            preload_decoders()

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

    def text_prefix(self, messages: list[Message]) -> tuple[int, ...]:
        """Tokens of a text-only prompt before its last user message (for snapshots).

        Args:
            messages: the normalised conversation.

        Returns:
            The tokens of the messages before the last user message, rendered
            without a generation prompt; () when there is nothing to snapshot:
            images in the prompt (their boundaries come from the chunks), no
            earlier message, no snapshot store, or a template that cannot
            render the partial chat.
        """
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if (self.snapshots is None or not users or users[-1] == 0
                or any(isinstance(p, ImagePart) for m in messages for p in m.parts)):
            return ()
        try:
            text, _ = self.prompt_text(messages[:users[-1]], gen=False)
        except InvalidRequestError:
            return ()
        return tuple(self.model.tokenize(text, add_special=True))

    # ------------------------------------------------------------------ KV
    def reset(self) -> None:
        """Forget the live sequence and every parked conversation."""
        with self.lock:
            self.ctx.clear()
            self.parked.clear()
            self._units, self._starts, self._prompt_end = [], [0], 0

    @property
    def cached_positions(self) -> int:
        return self._starts[len(self._units)] if self._units else 0

    def image_embeddings(self, chunk: ImageChunk, stats: PrefillStats | None = None) -> np.ndarray:
        """Embeddings of an image chunk: RAM cache, then disk cache, then the encoder.

        With a disk cache, a missing entry is computed under its inter-process
        lock, so processes asking for the same image at once encode it once.
        """
        cached = self.embeddings.get(chunk.key)
        computed = cached is None
        if cached is None and self.store is not None:
            cached, computed = self.store.get_or_compute(
                chunk.key, lambda: self._encode(chunk, stats),
                shape=(chunk.n_tokens, self.model.n_embd_inp))
        elif cached is None:
            cached = self._encode(chunk, stats)
        if stats and not computed:
            stats.images_from_cache += 1
        self.embeddings.put(chunk.key, cached)
        return cached

    def _encode(self, chunk: ImageChunk, stats: PrefillStats | None) -> np.ndarray:
        t0 = time.perf_counter()
        embd = self.encoder.encode(chunk)
        if stats:
            stats.encode_ms += (time.perf_counter() - t0) * 1e3
            stats.images_encoded += 1
        return embd

    def prefill(self, chunks: list[Chunk], *, text_prefix: tuple[int, ...] = ()) -> PrefillStats:
        """Make the context hold ``chunks`` with logits for the last position.

        Args:
            chunks: the prompt.
            text_prefix: tokens of a text-only prompt before its last user
                message (:meth:`text_prefix`): a prefix worth a KV snapshot.

        Returns:
            What was reused, restored, encoded and evaluated.
        """
        with self.lock:
            units, starts, owners = unit_positions(chunks)
            if not units:
                raise InvalidRequestError("the prompt is empty")
            total, cells = starts[-1], kv_cells(chunks)
            self.ctx.check_fits(max(total, cells))
            stats = PrefillStats(prompt_positions=total, kv_cells=cells)
            boundaries = self._boundaries(units, text_prefix)
            keep = self._reuse(units, starts, boundaries, stats)
            self._prompt_end = len(units)
            stats.reused_positions, stats.evaluated_positions = starts[keep], total - starts[keep]
            t0 = time.perf_counter()
            save_at = {b for b, least in boundaries if b - keep >= least}
            self._evaluate(units, starts, owners, keep, stats, save_at)
            stats.decode_ms = (time.perf_counter() - t0) * 1e3 - stats.encode_ms
            stats.images_reused = sum(u[0] == "i" for u in units[:keep])
            self._estimate_saved(stats)
            self.last_prefill = stats
            _log_prefill(stats)
            return stats

    def _estimate_saved(self, stats: PrefillStats) -> None:
        """Fill ``stats.saved_ms`` at the rates last measured here (this prefill's if none yet)."""
        rates = self._rates
        if stats.evaluated_positions >= 32 or not rates["position_ms"]:
            rates["position_ms"] = stats.decode_ms / max(stats.evaluated_positions, 1)
        if stats.images_encoded:
            rates["image_ms"] = stats.encode_ms / stats.images_encoded
        stats.saved_ms = (stats.reused_positions * rates["position_ms"]
                          + (stats.images_reused + stats.images_from_cache) * rates["image_ms"])

    def _boundaries(self, units: list, text_prefix: tuple[int, ...]) -> list[tuple[int, int]]:
        """Snapshot candidates: (prefix length, least gain over what the KV cache holds)."""
        if self.snapshots is None:
            return []
        n_text = common_prefix([("t", t) for t in text_prefix], units) if text_prefix else 0
        return snapshot_boundaries(units, n_text)

    def _reuse(self, units: list, starts: list[int], boundaries: list[tuple[int, int]],
               stats: PrefillStats) -> int:
        """Put the longest prefix of ``units`` at hand into the KV cache: live, parked or snapshot.

        Returns:
            How many units the KV cache now holds (the last unit is always left out).
        """
        limit = len(units) - 1  # the last unit is always evaluated, for its logits
        live = common_prefix(self._units, units)
        keep = min(live, limit)
        parked_key, parked = self.parked.best(units, limit)
        snapshot = self._find_snapshot(units, starts, boundaries, max(keep, parked))
        entry = self.parked.take(parked_key) if snapshot is None and parked > keep else None
        if live < self._prompt_end:
            self._park()  # the request leaves this conversation: keep it for later
        if snapshot is not None or entry is not None:
            t0 = time.perf_counter()
            if snapshot is not None:
                keep = self._restore(snapshot[1], units[:snapshot[0]], starts[:snapshot[0] + 1])
                stats.snapshot_restored = keep > 0
            else:
                keep = min(self._restore(entry.state, entry.units, entry.starts), parked)
                stats.parked_restored = keep > 0
            stats.restore_ms = (time.perf_counter() - t0) * 1e3
        self.ctx.truncate(self._starts[keep])
        self._units, self._starts = self._units[:keep], self._starts[:keep + 1]
        return keep

    def _find_snapshot(self, units: list, starts: list[int], boundaries: list[tuple[int, int]],
                       have: int) -> tuple[int, bytes] | None:
        """(boundary, state) of the longest stored snapshot worth restoring over ``have`` units."""
        for boundary, least in boundaries:
            if boundary - have < least:
                continue
            found = self.snapshots.load(units[:boundary])
            if found is not None and found[0] == starts[boundary]:
                return boundary, found[1]
        return None

    def _restore(self, state: bytes, units: Any, starts: Any) -> int:
        """Replace the KV cache with ``state`` holding ``units``; returns len(units), 0 if refused."""
        if not self.ctx.restore_state(state):
            LOG.warning("llama.cpp refused a saved KV state; evaluating instead")
            self._units, self._starts = [], [0]
            return 0
        self._units, self._starts = list(units), list(starts)
        LOG.info("restored a KV state of %d positions", self._starts[-1])
        return len(self._units)

    def _park(self) -> None:
        """Keep the live sequence's state in the parked LRU before it is dropped."""
        if not self._units or self.parked.max_bytes <= 0:
            return
        try:
            state = self.ctx.save_state()
        except EdgeVLMError as exc:
            LOG.warning("could not park the conversation's KV state: %s", exc)
            return
        if self.parked.park(ParkedState(tuple(self._units), tuple(self._starts), state)):
            LOG.info("parked a conversation of %d positions (%d parked, %.1f MiB)",
                     self.cached_positions, len(self.parked), self.parked.nbytes / 2**20)

    def _save_snapshot(self, stats: PrefillStats) -> None:
        try:
            if self.snapshots.save_once(list(self._units), self.cached_positions, self.ctx.save_state):
                stats.snapshots_saved += 1
        except Exception as exc:  # noqa: BLE001 - a cache must never break a request
            LOG.warning("could not save a KV snapshot: %s", exc)

    def _evaluate(self, units: list, starts: list[int], owners: list[Chunk], first: int,
                  stats: PrefillStats, save_at: set[int]) -> None:
        """Decode ``units[first:]``: text runs in batches, images and embeddings one by one.

        A snapshot is saved when the KV cache reaches a length in ``save_at``.
        """
        i = first
        while i < len(units):
            owner = owners[i]
            if isinstance(owner, TextChunk):
                j = i + 1
                while j < len(units) and isinstance(owners[j], TextChunk) and j not in save_at:
                    j += 1
                self.ctx.decode_tokens([u[1] for u in units[i:j]], starts[i],
                                       logits_last=j == len(units))
            else:
                j = i + 1
                if isinstance(owner, ImageChunk):
                    self.encoder.decode(self.ctx, owner, self.image_embeddings(owner, stats), starts[i])
                else:
                    self.ctx.decode_embeddings(owner.embeddings, starts[i], causal=owner.causal,
                                               logits_last=j == len(units))
            self._commit(units[i:j], starts[i:j + 1])
            i = j
            if i in save_at:
                self._save_snapshot(stats)

    def _commit(self, units: list, starts: list[int]) -> None:
        """Record units now in the KV cache; ``starts`` has one more entry (the end)."""
        self._units.extend(units)
        self._starts[len(self._starts) - 1:] = starts[:len(units) + 1]

    def logits(self) -> np.ndarray:
        return self.ctx.logits()

    # ------------------------------------------------------------------ generation
    def generate(self, chunks: list[Chunk], options: SamplingOptions,
                 stats_out: dict[str, Any] | None = None, *,
                 text_prefix: tuple[int, ...] = ()) -> Iterator[str]:
        """Prefill ``chunks`` and stream the reply as text pieces."""
        with self.lock:
            t0 = time.perf_counter()
            stats = self.prefill(chunks, text_prefix=text_prefix)
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


def _log_prefill(stats: PrefillStats) -> None:
    source = ("a KV snapshot" if stats.snapshot_restored else
              "a parked conversation" if stats.parked_restored else "the KV cache")
    LOG.info("prefill: %d positions, %d reused from %s%s, %d evaluated; images: %d reused, "
             "%d encoded (%.0f ms), %d from the embedding cache; %d snapshot(s) saved; "
             "about %.0f ms saved", stats.prompt_positions, stats.reused_positions, source,
             f" ({stats.restore_ms:.0f} ms)" if stats.restore_ms else "",
             stats.evaluated_positions, stats.images_reused, stats.images_encoded, stats.encode_ms,
             stats.images_from_cache, stats.snapshots_saved, stats.saved_ms)
