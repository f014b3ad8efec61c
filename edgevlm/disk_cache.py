"""The on-disk caches as a whole, for ``edgevlm cache`` and applications.

:class:`DiskCache` lists and clears both kinds of entry under one cache
directory — image embeddings (:mod:`edgevlm.cache`) and KV snapshots
(:mod:`edgevlm.snapshots`) — without its callers knowing the folder layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgevlm.cache import CacheEntry, EmbeddingStore, cache_dir, remove_file
from edgevlm.snapshots import DEFAULT_SNAPSHOT_BYTES, snapshot_entries


@dataclass(frozen=True)
class CacheUsage:
    """How much one kind of entry takes.

    Attributes:
        kind: "embeddings" or "kv snapshots".
        entries: number of files.
        nbytes: their total size.
        limit_bytes: the LRU budget for that kind.
    """

    kind: str
    entries: int
    nbytes: int
    limit_bytes: int


class DiskCache:
    """edgevlm's on-disk caches under ``root`` (default: ``EDGEVLM_CACHE_DIR`` or the platform cache).

    Args:
        root: the cache directory.
    """

    KINDS = ("embeddings", "kv snapshots")

    def __init__(self, root: Path | None = None) -> None:
        self.directory = Path(root) if root is not None else cache_dir()
        self._embeddings = EmbeddingStore(self.directory)

    def entries(self, kind: str | None = None) -> list[CacheEntry]:
        """Entries of ``kind`` (None: both), least recently used first."""
        found: list[CacheEntry] = []
        if kind in (None, "embeddings"):
            found += self._embeddings.entries()
        if kind in (None, "kv snapshots"):
            found += snapshot_entries(self.directory)
        return sorted(found, key=lambda e: e.last_used)

    def usage(self) -> list[CacheUsage]:
        """Entries and bytes of each kind, with its budget."""
        limits = {"embeddings": self._embeddings.max_bytes, "kv snapshots": DEFAULT_SNAPSHOT_BYTES}
        out = []
        for kind in self.KINDS:
            entries = self.entries(kind)
            out.append(CacheUsage(kind, len(entries), sum(e.size for e in entries), limits[kind]))
        return out

    def clear(self) -> int:
        """Delete every entry; returns the bytes freed."""
        freed = 0
        for entry in self.entries():
            remove_file(entry.path)
            freed += entry.size
        return freed
