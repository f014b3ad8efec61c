"""Persistent KV snapshots: a prompt prefix's KV state saved to disk.

The engine saves the KV state of two kinds of prefix (see
:func:`snapshot_boundaries`), and a later process whose prompt starts with
the same prefix restores it instead of evaluating it again:

* when a prompt contains images, the prefix that ends with the last image
  chunk: a new question about the same image(s) neither encodes nor decodes
  them;
* a long text prefix (at least :data:`MIN_TEXT_SNAPSHOT_TOKENS` tokens more
  than the KV cache already holds for the request): the text before the
  first image, or, for a text-only prompt, the prompt before the last user
  message (system prompt, instructions, few-shot examples). A batch of
  requests sharing a long instruction prefix reads it once per process
  start, not once per request.

Snapshots are keyed by the model identity, the context parameters and the
chunk identities of the prefix, so a prompt with another prefix never
restores them. Writing one happens under an inter-process lock
(``edgevlm.cache.entry_lock``); a process that finds the snapshot already
written by another skips the write.

A snapshot is valid only for the exact model file, llama.cpp build and
context parameters that made it. Those are stored in the header and checked
on load; a mismatch is refused (:class:`SnapshotMismatchError`), never loaded.

File format (version 1): ``MAGIC`` | u32 header length | header JSON |
sha256(state) (32 bytes) | state bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevlm.cache import (LOCK_TIMEOUT_S, CacheEntry, atomic_write, cache_dir, entry_lock, evict_lru,
                           list_entries, remove_file)
from edgevlm.chunks import ImageUnit, Unit, unit_json
from edgevlm.errors import EdgeVLMError

LOG = logging.getLogger("edgevlm.cache")

MAGIC = b"EVLMKV\x00\x01"
FORMAT_VERSION = 1

#: A text prefix is snapshotted (and restored) only when it holds at least this
#: many tokens beyond what the KV cache already has for the request: shorter
#: ones evaluate about as fast as a snapshot loads, and a chat that is going on
#: in this process does not write its history to disk at every turn.
MIN_TEXT_SNAPSHOT_TOKENS = 128
#: LRU budget of the snapshot files (bytes).
DEFAULT_SNAPSHOT_BYTES = 4 << 30


class SnapshotMismatchError(EdgeVLMError, ValueError):
    """A snapshot belongs to another model, build or context configuration."""


@dataclass(frozen=True)
class SnapshotIdentity:
    """What a KV state depends on; all fields must match to reuse it."""

    model: str          # LLM file identity
    projector: str      # projector file identity ("" without one)
    build: str          # llama-cpp-python version + llama.cpp system info
    n_ctx: int
    kv_type: str
    flash_attn: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def prefix_key(identity: SnapshotIdentity, units: Sequence[Unit]) -> str:
    digest = hashlib.sha256(identity.digest().encode())
    digest.update(json.dumps([unit_json(u) for u in units], separators=(",", ":")).encode())
    return digest.hexdigest()


class SnapshotStore:
    """Snapshots under ``<cache>/kv/``, keyed by identity + prefix units."""

    def __init__(self, identity: SnapshotIdentity, root: Path | None = None,
                 *, max_bytes: int = DEFAULT_SNAPSHOT_BYTES, lock_timeout: float = LOCK_TIMEOUT_S) -> None:
        self.identity = identity
        self.root = (root or cache_dir()) / "kv"
        self.max_bytes = max_bytes
        self.lock_timeout = lock_timeout

    def path(self, units: Sequence[Unit]) -> Path:
        key = prefix_key(self.identity, units)
        return self.root / key[:2] / f"{key}.kv"

    def save_once(self, units: Sequence[Unit], n_pos: int,
                  state: Callable[[], bytes]) -> bool:
        """Save the snapshot of ``units`` unless some process already has.

        Args:
            units: the prefix's identity units.
            n_pos: positions the prefix occupies.
            state: returns the KV state bytes (called only when writing).

        Returns:
            True if this call wrote the file.
        """
        path = self.path(units)
        if path.exists():
            return False
        with entry_lock(self.root.parent, "kv", path.stem, self.lock_timeout) as held:
            if not held or path.exists():
                return False
            self.save(units, n_pos, state())
            return True

    def save(self, units: Sequence[Unit], n_pos: int, state: bytes) -> Path:
        header = json.dumps({"version": FORMAT_VERSION, "identity": asdict(self.identity),
                             "n_units": len(units), "n_pos": n_pos}).encode()
        path = self.path(units)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = MAGIC + struct.pack("<I", len(header)) + header + hashlib.sha256(state).digest() + state
        atomic_write(path, blob)
        self._evict()
        return path

    def load(self, units: Sequence[Unit]) -> tuple[int, bytes] | None:
        """(n_pos, state) for this prefix, or None if absent, corrupt or foreign."""
        path = self.path(units)
        if not path.exists():
            return None
        try:
            return read_snapshot(path, self.identity)
        except SnapshotMismatchError as exc:
            LOG.warning("%s", exc)
        except (OSError, ValueError) as exc:
            LOG.warning("KV snapshot %s is unreadable (%s); rebuilding", path, exc)
        remove_file(path)
        return None

    def _evict(self) -> None:
        evict_lru(list(self.root.glob(SNAPSHOT_GLOB)), self.max_bytes)

    def entries(self) -> list[CacheEntry]:
        """Every snapshot file (any model), least recently used first."""
        return snapshot_entries(self.root.parent)


#: Snapshot files under ``<cache>/kv``.
SNAPSHOT_GLOB = "*/*.kv"


def snapshot_entries(root: Path | None = None) -> list[CacheEntry]:
    """The snapshot files under the cache directory ``root``, least recently used first."""
    return list_entries((root or cache_dir()) / "kv", SNAPSHOT_GLOB)


def read_snapshot(path: Path, identity: SnapshotIdentity) -> tuple[int, bytes]:
    """Read and verify a snapshot file.

    Raises:
        SnapshotMismatchError: it was made by another model, build or context setup.
        ValueError: it is truncated, corrupt or of another format version.
    """
    data = path.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise ValueError("not an edgevlm KV snapshot")
    (n_header,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(data[start:start + n_header])
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"snapshot format {header.get('version')} (expected {FORMAT_VERSION})")
    theirs = header.get("identity", {})
    ours = asdict(identity)
    different = [k for k in ours if theirs.get(k) != ours[k]]
    if different:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} != {ours[k]!r}" for k in different)
        raise SnapshotMismatchError(f"KV snapshot {path.name} was made with another setup ({detail}); "
                                    "it is refused and will be rebuilt")
    digest = data[start + n_header:start + n_header + 32]
    state = data[start + n_header + 32:]
    if hashlib.sha256(state).digest() != digest:
        raise ValueError("state checksum mismatch")
    return int(header["n_pos"]), state


def snapshot_boundaries(units: Sequence[Unit], text_prefix: int = 0, *,
                        continued: bool = False) -> list[tuple[int, int]]:
    """Prefixes worth a snapshot, longest first, as (length in units, least gain).

    A snapshot is saved, or restored, only when its prefix is at least ``least
    gain`` units longer than what the KV cache already holds for the request.

    Args:
        units: the request's identity units.
        text_prefix: for a text-only prompt, the units before its last user
            message (0 = none).
        continued: the units are a request prepared before its question
            (:meth:`edgevlm.VLM.prepare`): its end is not the end of what is asked.

    Returns:
        The end of the last image chunk when something follows it
        (least gain 1); the start of the first image, or ``text_prefix``
        without images (least gain :data:`MIN_TEXT_SNAPSHOT_TOKENS`). A
        prompt that ends at a boundary has nothing after it to ask, so that
        boundary is left out, unless the prompt is ``continued``.
    """
    media = [i for i, u in enumerate(units) if not isinstance(u, int)]
    images = [i for i in media if isinstance(units[i], ImageUnit)]
    out = []
    if images and (images[-1] + 1 < len(units) or continued):
        out.append((images[-1] + 1, 1))
    text = media[0] if media else text_prefix
    if 0 < text < len(units) + continued:
        out.append((text, MIN_TEXT_SNAPSHOT_TOKENS))
    return out
