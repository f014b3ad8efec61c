"""Image embeddings: a RAM LRU, the optional disk tier, then the encoder.

An image reappearing after the KV cache moved on (another conversation,
another process) is not encoded again: the RAM LRU holds recent embeddings
and the disk store (:class:`edgevlm.cache.EmbeddingStore`) keeps them across
processes, computing a missing entry under its inter-process lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from edgevlm.cache import EmbeddingStore
from edgevlm.chunks import ImageChunk
from edgevlm.stats import PrefillStats
from edgevlm.vision.encoder import VisionEncoder

#: RAM budget of the in-memory embedding cache (bytes).
DEFAULT_RAM_BYTES = 256 << 20


class EmbeddingLRU:
    """In-memory image-embedding cache with a byte budget."""

    def __init__(self, max_bytes: int = DEFAULT_RAM_BYTES) -> None:
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

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


class ImageEmbeddings:
    """Embeddings of image chunks: RAM cache, then disk cache, then the encoder.

    Args:
        encoder: computes what no cache holds.
        width: the LLM's input width (a cached entry of another shape is recomputed).
        store: the disk tier, or None.
    """

    def __init__(self, encoder: VisionEncoder, width: int, store: EmbeddingStore | None) -> None:
        self.encoder = encoder
        self.width = width
        self.store = store
        self.ram = EmbeddingLRU()

    def get(self, chunk: ImageChunk, stats: PrefillStats | None = None,
            cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """The chunk's embeddings (n_tokens, width); counts encodes and cache hits in ``stats``.

        Raises:
            ComputeCancelled: ``cancelled`` stopped the encoder (nothing is cached).
        """
        cached = self.ram.get(chunk.key)
        computed = cached is None
        if cached is None and self.store is not None:
            cached, computed = self.store.get_or_compute(
                chunk.key, lambda: self.encode(chunk, stats, cancelled), shape=(chunk.n_tokens, self.width))
        elif cached is None:
            cached = self.encode(chunk, stats, cancelled)
        if stats is not None and not computed:
            stats.images_from_cache += 1
        self.ram.put(chunk.key, cached)
        return cached

    def encode(self, chunk: ImageChunk, stats: PrefillStats | None = None,
               cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """Run the encoder (no cache), timing it into ``stats``."""
        t0 = time.perf_counter()
        embd = self.encoder.encode(chunk, cancelled)
        if stats is not None:
            stats.encode_ms += (time.perf_counter() - t0) * 1e3
            stats.images_encoded += 1
        return embd
