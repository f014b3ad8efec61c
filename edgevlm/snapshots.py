"""Persistent KV snapshots: a prompt prefix's KV state saved to disk.

When a prompt contains images, the engine saves the KV state of the prefix
that ends with the last image chunk; a later process asking a new question
about the same image(s) restores it instead of encoding and decoding again.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgevlm.cache import atomic_write, cache_dir, evict_lru, remove_file
from edgevlm.errors import EdgeVLMError

LOG = logging.getLogger("edgevlm.cache")

MAGIC = b"EVLMKV\x00\x01"
FORMAT_VERSION = 1


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


def prefix_key(identity: SnapshotIdentity, units: list[tuple[str, Any]]) -> str:
    digest = hashlib.sha256(identity.digest().encode())
    digest.update(json.dumps(units, separators=(",", ":")).encode())
    return digest.hexdigest()


class SnapshotStore:
    """Snapshots under ``<cache>/kv/``, keyed by identity + prefix units."""

    def __init__(self, identity: SnapshotIdentity, root: Path | None = None,
                 *, max_bytes: int = 4 << 30) -> None:
        self.identity = identity
        self.root = (root or cache_dir()) / "kv"
        self.max_bytes = max_bytes

    def path(self, units: list[tuple[str, Any]]) -> Path:
        key = prefix_key(self.identity, units)
        return self.root / key[:2] / f"{key}.kv"

    def save(self, units: list[tuple[str, Any]], n_pos: int, state: bytes) -> Path:
        header = json.dumps({"version": FORMAT_VERSION, "identity": asdict(self.identity),
                             "n_units": len(units), "n_pos": n_pos}).encode()
        path = self.path(units)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = MAGIC + struct.pack("<I", len(header)) + header + hashlib.sha256(state).digest() + state
        atomic_write(path, blob)
        self._evict()
        return path

    def load(self, units: list[tuple[str, Any]]) -> tuple[int, bytes] | None:
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
        evict_lru(list(self.root.glob("*/*.kv")), self.max_bytes)


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
