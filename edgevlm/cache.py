"""On-disk caches: image embeddings (KV snapshots: ``edgevlm.snapshots``).

Layout under the cache directory (``EDGEVLM_CACHE_DIR``, else the platform
cache home + ``/edgevlm``)::

    embeddings/ab/abcdef....emb     one image chunk's embeddings
    kv/ab/abcdef....kv              one KV snapshot (edgevlm.snapshots)
    locks/emb-ab.lock               inter-process locks (256 per kind)

Each entry is self-checking: a fixed header (magic, format version, dtype,
shape, sha256 of the payload) followed by the float32 payload. A truncated,
bit-flipped or foreign-version entry is ignored, logged and removed, and the
caller recomputes it. Writers write a temp file in the same folder and
``os.replace`` it over the entry, so a reader in another process sees the old
entry or the new one, never a torn file.

Computing an entry happens under an inter-process file lock (``filelock``,
one of 256 lock files chosen by the key's hash), and the entry is looked up
again once the lock is held: two processes asking for the same image at the
same time run the vision encoder once between them. A lock that cannot be
taken within :data:`LOCK_TIMEOUT_S` does not fail the request: the entry is
computed without being cached, and a warning is logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevlm.paths import cache_dir

LOG = logging.getLogger("edgevlm.cache")

MAGIC = b"EVLMEMB\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIII32s")  # magic, version, rows, cols, sha256(payload)

#: Seconds to wait for another process computing the same cache entry.
LOCK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int
    last_used: float


class EmbeddingStore:
    """Disk tier of the image-embedding cache with a byte budget and LRU eviction."""

    def __init__(self, root: Path | None = None, *, max_bytes: int = 2 << 30,
                 lock_timeout: float = LOCK_TIMEOUT_S) -> None:
        self.root = (root or cache_dir()) / "embeddings"
        self.max_bytes = max_bytes
        self.lock_timeout = lock_timeout

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.emb"

    def get_or_compute(self, key: str, compute: Callable[[], np.ndarray],
                       shape: tuple[int, int] | None = None) -> tuple[np.ndarray, bool]:
        """The entry for ``key``, computed (once across processes) when missing.

        Args:
            key: the entry's identity.
            compute: makes the array when it is not cached.
            shape: the expected shape; an entry of another shape is recomputed.

        Returns:
            (array, computed): ``computed`` is False for a cache hit.
        """
        found = self._get_shaped(key, shape)
        if found is not None:
            return found, False
        with entry_lock(self.root.parent, "emb", self._path(key).stem, self.lock_timeout) as held:
            found = self._get_shaped(key, shape) if held else None
            if found is not None:
                return found, False  # another process computed it while we waited
            array = compute()
            if held:
                self.put(key, array)
            return array, True

    def _get_shaped(self, key: str, shape: tuple[int, int] | None) -> np.ndarray | None:
        found = self.get(key)
        if found is not None and shape is not None and found.shape != shape:
            return None  # a stale entry of another shape: recompute
        return found

    def get(self, key: str) -> np.ndarray | None:
        """The cached embeddings for ``key``, or None (missing or corrupt)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            LOG.warning("embedding cache: cannot read %s (%s)", path, exc)
            return None
        array = _decode(data)
        if array is None:
            LOG.warning("embedding cache: %s is corrupt or from another version; rebuilding", path)
            remove_file(path)
            return None
        try:
            os.utime(path)  # LRU: last use = mtime
        except OSError:
            pass
        return array

    def put(self, key: str, array: np.ndarray) -> None:
        """Store ``array`` atomically; failures are logged, never raised."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, _encode(array))
        except OSError as exc:
            LOG.warning("embedding cache: cannot write %s (%s)", path, exc)
            return
        self.evict()

    def entries(self) -> list[CacheEntry]:
        """Every embedding entry, least recently used first."""
        return list_entries(self.root, EMBEDDING_GLOB)

    def evict(self) -> int:
        """Remove least recently used entries beyond the budget; returns bytes freed."""
        return evict_lru(list(self.root.glob(EMBEDDING_GLOB)), self.max_bytes)


#: Embedding files under ``<cache>/embeddings``.
EMBEDDING_GLOB = "*/*.emb"


def list_entries(folder: Path, pattern: str) -> list[CacheEntry]:
    """The files matching ``pattern`` under ``folder``, least recently used first."""
    out = []
    for path in folder.glob(pattern):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        out.append(CacheEntry(path, st.st_size, st.st_mtime))
    return sorted(out, key=lambda e: e.last_used)


def file_identity(path: Path) -> str:
    """A cheap, stable identity for a model file: size + hash of head and tail."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        if size > 1 << 20:
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def evict_lru(paths: list[Path], max_bytes: int) -> int:
    """Delete the least recently modified of ``paths`` until they fit ``max_bytes``."""
    sized = []
    for path in paths:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        sized.append((st.st_mtime, st.st_size, path))
    sized.sort()
    total = sum(size for _, size, _ in sized)
    freed = 0
    for _, size, path in sized:
        if total - freed <= max_bytes:
            break
        remove_file(path)
        freed += size
    return freed


def _encode(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError("embeddings must be 2-D")
    payload = array.tobytes()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, array.shape[0], array.shape[1],
                          hashlib.sha256(payload).digest())
    return header + payload


def _decode(data: bytes) -> np.ndarray | None:
    if len(data) < _HEADER.size:
        return None
    magic, version, rows, cols, digest = _HEADER.unpack_from(data)
    payload = data[_HEADER.size:]
    if magic != MAGIC or version != FORMAT_VERSION or len(payload) != rows * cols * 4:
        return None
    if hashlib.sha256(payload).digest() != digest:
        return None
    return np.frombuffer(payload, dtype=np.float32).reshape(rows, cols).copy()


@contextmanager
def entry_lock(root: Path, kind: str, digest: str, timeout: float) -> Iterator[bool]:
    """Hold the inter-process lock guarding the entries whose hex digest starts like ``digest``.

    Args:
        root: the cache directory (lock files live in ``root/locks``).
        kind: which cache ("emb", "kv").
        digest: the entry's hex digest; its first two characters pick the lock file.
        timeout: seconds to wait.

    Yields:
        True while the lock is held; False if it could not be taken in time
        (or the lock file cannot be created): the caller goes on unlocked and
        must not write the entry.
    """
    from filelock import FileLock, Timeout

    path = root / "locks" / f"{kind}-{digest[:2]}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path), timeout=timeout)
        lock.acquire()
    except (Timeout, OSError) as exc:
        LOG.warning("cache: could not lock %s within %.0f s (%s); computing without caching",
                    path, timeout, type(exc).__name__)
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename it over ``path``.

    Readers in other processes see the old file or the new one, never a torn
    one. There is no fsync (it cost more than the encode it saves on small
    models): every cache file carries a checksum, so one cut short by a
    system crash is detected on read, removed and rebuilt.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        remove_file(Path(tmp))
        raise


def remove_file(path: Path) -> None:
    """Delete ``path`` if it exists; other failures are logged, not raised."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        LOG.warning("cache: cannot remove %s (%s)", path, exc)
