"""Prefill with reuse: keep the KV cache in step with prompts, evaluating only what is new.

The context remembers which identity units it holds (:mod:`edgevlm.chunks`:
text tokens, image and embedding keys) and where each starts. A new request
evaluates only what follows the longest prefix at hand, taken from

* the live sequence (a follow-up question evaluates only the new turn, and
  an image already in the prefix is neither encoded nor decoded again);
* a parked conversation (:mod:`edgevlm.parking`): when a request leaves the
  live conversation, its state is parked in RAM first, so alternating
  between conversations evaluates only each one's new turn;
* a persistent snapshot (:mod:`edgevlm.snapshots`) of an image prefix or a
  long text prefix, across processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from edgevlm.chunks import (Chunk, ImageChunk, ImageUnit, TextChunk, Unit, kv_cells, overflow_detail,
                             unit_positions)
from edgevlm.embeddings import ImageEmbeddings
from edgevlm.errors import ComputeCancelled, EdgeVLMError, InvalidRequestError
from edgevlm.llm import LlamaContext
from edgevlm.parking import ParkedState, ParkedStates, common_prefix
from edgevlm.snapshots import SnapshotStore, snapshot_boundaries
from edgevlm.stats import PrefillStats
from edgevlm.vision.encoder import VisionEncoder

LOG = logging.getLogger("edgevlm")


class KVPrefix:
    """The KV ledger of one context, and how a prompt is put into it.

    Args:
        ctx: the llama.cpp context (one sequence).
        encoder: decodes image embeddings into the context (None: text only).
        embeddings: where image embeddings come from (None without an encoder).
        snapshots: the persistent snapshot store, or None.
    """

    def __init__(self, ctx: LlamaContext, encoder: VisionEncoder | None,
                 embeddings: ImageEmbeddings | None, snapshots: SnapshotStore | None) -> None:
        self.ctx = ctx
        self.encoder = encoder
        self.embeddings = embeddings
        self.snapshots = snapshots
        self.parked = ParkedStates()
        self.units: list[Unit] = []
        self.starts: list[int] = [0]
        self._prompt_end = 0  # units of the last prompt (generated tokens follow)
        self._position_ms = 0.0  # last measured prefill cost per position
        self._image_ms = 0.0  # ... and per image encode

    @property
    def cached_positions(self) -> int:
        return self.starts[len(self.units)] if self.units else 0

    def reset(self) -> None:
        """Forget the live sequence and every parked conversation."""
        self.ctx.clear()
        self.parked.clear()
        self.units, self.starts, self._prompt_end = [], [0], 0

    def held_image_keys(self) -> set[str]:
        """Keys of the image chunks the live or a parked KV state holds."""
        live = {u.key for u in self.units if isinstance(u, ImageUnit)}
        return live | self.parked.image_keys()

    def holds(self, chunks: list[Chunk]) -> bool:
        """Whether the live sequence starts with ``chunks`` (it may go on after them)."""
        units = unit_positions(chunks)[0]
        return common_prefix(self.units, units) == len(units)

    def recent_tokens(self, n: int) -> list[int]:
        """Text tokens among the last ``n`` units (the sampler's penalty window)."""
        return [u for u in self.units[-n:] if isinstance(u, int)]

    def commit(self, units: Sequence[Unit], starts: Sequence[int]) -> None:
        """Record units now in the KV cache; ``starts`` has one more entry (the end)."""
        self.units.extend(units)
        self.starts[len(self.starts) - 1:] = starts[:len(units) + 1]

    # ------------------------------------------------------------------ branches
    @contextmanager
    def branch(self) -> Iterator[int]:
        """Decode freely after what the KV cache holds; afterwards the cache is cut back to it.

        Yields the first free position. Nothing decoded inside is committed, so
        the ledger stays true: the next request reuses the prefix as before.
        """
        start = self.cached_positions
        try:
            yield start
        finally:
            self.ctx.truncate(start)

    def evaluate_after(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (len(tokens), n_vocab) of ``tokens`` decoded after what the KV cache holds, then dropped.

        Row i holds the logits after ``tokens[:i + 1]``. The tokens go in one
        batch (at most n_batch of them); the KV cache and the ledger are left
        as they were (the last prompt's logits are gone: read them first).

        Raises:
            RuntimeFailure: more tokens than a batch, or llama.cpp failed.
            ContextOverflowError: they do not fit after the held prefix.
        """
        if not tokens:
            return np.zeros((0, self.ctx.model.n_vocab), dtype=np.float32)
        with self.branch() as start:
            self.ctx.decode_tokens(list(tokens), start, logits_last=False, logits_all=True)
            return np.stack([self.ctx.logits_at(i) for i in range(len(tokens))])

    # ------------------------------------------------------------------ prefill
    def prefill(self, chunks: list[Chunk], text_prefix: tuple[int, ...] = (),
                cancelled: Callable[[], bool] | None = None, *, continued: bool = False) -> PrefillStats:
        """Make the context hold ``chunks`` with logits for the last position.

        Args:
            chunks: the prompt.
            text_prefix: tokens of a text-only prompt before its last user
                message: a prefix worth a KV snapshot.
            cancelled: asked before each chunk is evaluated and, from a watcher thread,
                every 20 ms while it is (see :meth:`LlamaContext.stoppable`); True stops
                there (the KV cache and the ledger keep the chunks evaluated before).
            continued: a request prepared before its question: snapshots may end where it ends.

        Returns:
            What was reused, restored, encoded and evaluated.

        Raises:
            InvalidRequestError: an empty prompt.
            ContextOverflowError: it does not fit the context.
        """
        units, starts, owners = unit_positions(chunks)
        if not units:
            raise InvalidRequestError("the prompt is empty")
        total, cells = starts[-1], kv_cells(chunks)
        if max(total, cells) > self.ctx.n_ctx:
            detail, alternative = overflow_detail(chunks, self.ctx.n_ctx)
            self.ctx.check_fits(max(total, cells), detail=detail, alternative=alternative)
        stats = PrefillStats(prompt_positions=total, kv_cells=cells)
        boundaries = self._boundaries(units, text_prefix, continued)
        keep = self._reuse(units, starts, boundaries, stats, continued)
        self._prompt_end = len(units)
        stats.reused_positions = starts[keep]
        t0 = time.perf_counter()
        save_at = {b for b, least in boundaries if b - keep >= least}
        self._evaluate(units, starts, owners, keep, stats, save_at, cancelled)
        self._prompt_end = len(self.units)  # less than the prompt when cancelled
        stats.evaluated_positions = self.cached_positions - starts[keep]
        stats.decode_ms = (time.perf_counter() - t0) * 1e3 - stats.encode_ms
        stats.images_reused = sum(isinstance(u, ImageUnit) for u in units[:keep])
        self._estimate_saved(stats, complete=len(self.units) == len(units))
        _log_prefill(stats)
        return stats

    def _estimate_saved(self, stats: PrefillStats, complete: bool) -> None:
        """Fill ``stats.saved_ms`` at the rates last measured here (this prefill's if none yet; a
        cancelled prefill's time includes work it dropped, so it does not set the rate)."""
        if complete and (stats.evaluated_positions >= 32 or not self._position_ms):
            self._position_ms = stats.decode_ms / max(stats.evaluated_positions, 1)
        if stats.images_encoded:
            self._image_ms = stats.encode_ms / stats.images_encoded
        stats.saved_ms = (stats.reused_positions * self._position_ms
                          + (stats.images_reused + stats.images_from_cache) * self._image_ms)

    def _boundaries(self, units: list[Unit], text_prefix: tuple[int, ...],
                    continued: bool = False) -> list[tuple[int, int]]:
        """Snapshot candidates: (prefix length, least gain over what the KV cache holds)."""
        if self.snapshots is None:
            return []
        n_text = common_prefix(text_prefix, units) if text_prefix else 0
        return snapshot_boundaries(units, n_text, continued=continued)

    def _reuse(self, units: list[Unit], starts: list[int], boundaries: list[tuple[int, int]],
               stats: PrefillStats, continued: bool = False) -> int:
        """Put the longest prefix of ``units`` at hand into the KV cache: live, parked or snapshot.

        Returns:
            How many units the KV cache now holds (the last unit is left out, unless ``continued``).
        """
        limit = len(units) - (0 if continued else 1)  # the last unit is evaluated for its logits
        live = common_prefix(self.units, units)
        keep = min(live, limit)
        parked_key, parked = self.parked.best(units, limit)
        snapshot = self._find_snapshot(units, starts, boundaries, max(keep, parked))
        take = snapshot is None and parked > keep and parked_key is not None
        entry = self.parked.take(parked_key) if take and parked_key is not None else None
        if live < self._prompt_end:
            self._park()  # the request leaves this conversation: keep it for later
        if snapshot is not None or entry is not None:
            t0 = time.perf_counter()
            if snapshot is not None:
                keep = self._restore(snapshot[1], units[:snapshot[0]], starts[:snapshot[0] + 1])
                stats.snapshot_restored = keep > 0
            elif entry is not None:
                keep = min(self._restore(entry.state, entry.units, entry.starts), parked)
                stats.parked_restored = keep > 0
            stats.restore_ms = (time.perf_counter() - t0) * 1e3
        self.ctx.truncate(self.starts[keep])
        self.units, self.starts = self.units[:keep], self.starts[:keep + 1]
        return keep

    def _find_snapshot(self, units: list[Unit], starts: list[int], boundaries: list[tuple[int, int]],
                       have: int) -> tuple[int, bytes] | None:
        """(boundary, state) of the longest stored snapshot worth restoring over ``have`` units."""
        if self.snapshots is None:
            return None
        for boundary, least in boundaries:
            if boundary - have < least:
                continue
            found = self.snapshots.load(units[:boundary])
            if found is not None and found[0] == starts[boundary]:
                return boundary, found[1]
        return None

    def _restore(self, state: bytes, units: Sequence[Unit], starts: Sequence[int]) -> int:
        """Replace the KV cache with ``state`` holding ``units``; returns len(units), 0 if refused."""
        if not self.ctx.restore_state(state):
            LOG.warning("llama.cpp refused a saved KV state; evaluating instead")
            self.units, self.starts = [], [0]
            return 0
        self.units, self.starts = list(units), list(starts)
        LOG.info("restored a KV state of %d positions", self.starts[-1])
        return len(self.units)

    def _park(self) -> None:
        """Keep the live sequence's state in the parked LRU before it is dropped."""
        if not self.units or self.parked.max_bytes <= 0:
            return
        try:
            state = self.ctx.save_state()
        except EdgeVLMError as exc:
            LOG.warning("could not park the conversation's KV state: %s", exc)
            return
        if self.parked.park(ParkedState(tuple(self.units), tuple(self.starts), state)):
            LOG.info("parked a conversation of %d positions (%d parked, %.1f MiB)",
                     self.cached_positions, len(self.parked), self.parked.nbytes / 2**20)

    def _save_snapshot(self, stats: PrefillStats) -> None:
        if self.snapshots is None:
            return
        try:
            if self.snapshots.save_once(list(self.units), self.cached_positions, self.ctx.save_state):
                stats.snapshots_saved += 1
        except Exception as exc:  # noqa: BLE001 - a cache must never break a request
            LOG.warning("could not save a KV snapshot: %s", exc)

    def _evaluate(self, units: list[Unit], starts: list[int], owners: list[Chunk], first: int,
                  stats: PrefillStats, save_at: set[int], cancelled: Callable[[], bool] | None) -> None:
        """Decode ``units[first:]``: text runs in batches, images and embeddings one by one.

        A snapshot is saved when the KV cache reaches a length in ``save_at``;
        ``cancelled`` returning True stops before the next chunk, or inside the
        LLM's graph (:meth:`LlamaContext.stoppable`): the chunks before stay in
        the KV cache, and of the chunk stopped in its text batches read before.
        """
        i = first
        while i < len(units) and not (cancelled is not None and cancelled()):
            j = self._next_stop(units, owners, i, save_at)
            try:
                with self.ctx.stoppable(cancelled):
                    self._decode_chunk(owners[i], units[i:j], starts[i], j == len(units), stats, cancelled)
            except ComputeCancelled as stop:  # keep the text batches read before the stop
                kept = i + stop.decoded if isinstance(owners[i], TextChunk) else i
                self.ctx.truncate(starts[kept])
                self.commit(units[i:kept], starts[i:kept + 1])
                return
            self.commit(units[i:j], starts[i:j + 1])
            i = j
            if i in save_at:
                self._save_snapshot(stats)

    @staticmethod
    def _next_stop(units: list[Unit], owners: list[Chunk], i: int, save_at: set[int]) -> int:
        """Where the piece decoded from ``i`` ends: a text run up to a snapshot length, else one unit."""
        j = i + 1
        if isinstance(owners[i], TextChunk):
            while j < len(units) and isinstance(owners[j], TextChunk) and j not in save_at:
                j += 1
        return j

    def _decode_chunk(self, owner: Chunk, units: list[Unit], start: int, last: bool, stats: PrefillStats,
                      cancelled: Callable[[], bool] | None) -> None:
        """Decode one piece: text tokens, an image (encoded, ``cancelled`` asked inside the encoder
        where it can stop, or from the caches), or raw embeddings."""
        if isinstance(owner, TextChunk):
            self.ctx.decode_tokens([u for u in units if isinstance(u, int)], start, logits_last=last)
        elif isinstance(owner, ImageChunk):
            if self.encoder is None or self.embeddings is None:
                raise InvalidRequestError("an image chunk reached a model without a vision encoder")
            self.encoder.decode(self.ctx, owner, self.embeddings.get(owner, stats, cancelled), start)
        else:
            self.ctx.decode_embeddings(owner.embeddings, start, causal=owner.causal, logits_last=last)


def _log_prefill(stats: PrefillStats) -> None:
    source = ("a KV snapshot" if stats.snapshot_restored else
              "a parked conversation" if stats.parked_restored else "the KV cache")
    LOG.info("prefill: %d positions, %d reused from %s%s, %d evaluated; images: %d reused, "
             "%d encoded (%.0f ms), %d from the embedding cache; %d snapshot(s) saved; "
             "about %.0f ms saved", stats.prompt_positions, stats.reused_positions, source,
             f" ({stats.restore_ms:.0f} ms)" if stats.restore_ms else "",
             stats.evaluated_positions, stats.images_reused, stats.images_encoded, stats.encode_ms,
             stats.images_from_cache, stats.snapshots_saved, stats.saved_ms)
