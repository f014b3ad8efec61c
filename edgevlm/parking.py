"""Many conversations in one process: parked KV states.

The context has one llama.cpp sequence. When a request diverges from what
that sequence holds (another conversation, another image), the engine
*parks* the live state before dropping it: the chunk identity units it
covers plus its KV bytes (``llama_state_seq_get_data``), in a RAM LRU with a
byte budget. A later request restores the parked state that shares the
longest prefix with it when that beats the live sequence, so alternating
between conversations A and B evaluates only each one's new turn.

Why state swapping and not a pool of llama.cpp sequences (``n_seq_max > 1``):

* a pool splits one KV cache between the sequences, so each conversation gets
  ``n_ctx / n_seq`` positions (or the cache must be ``n_seq`` times larger,
  allocated up front, whether or not the conversations exist), while a
  parked state costs memory only for the positions it really holds and
  every conversation keeps the full ``n_ctx``;
* swapping needs nothing from the model beyond state save/restore, which
  every llama.cpp architecture has (recurrent and hybrid models included,
  where copying or partially removing sequences is restricted);
* the price is a copy of the state at each switch: about
  ``2 * n_layer * n_embd_kv * bytes_per_element`` per position (12 KiB for a
  0.5B model, 0.5 MiB for a 7B one with an f16 KV cache), i.e. memory-copy
  time, far below re-evaluating even a few tokens on the CPU; a pool switches
  for free.

The budget (:data:`DEFAULT_PARK_BYTES`) bounds the RAM the parked states
take; the least recently used state is dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from edgevlm.chunks import ImageUnit, Unit

#: RAM budget for parked conversation states (bytes).
DEFAULT_PARK_BYTES = 1 << 30
#: At most this many parked states (bounds the prefix search per request).
DEFAULT_PARK_ENTRIES = 16


class ParkedPayload(Protocol):
    """A parked state that is not llama.cpp bytes (an engine's own): its size, and what frees it."""

    @property
    def nbytes(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ParkedState:
    """A sequence's KV state and what it holds.

    Attributes:
        units: chunk identity units in the state.
        starts: each unit's first position, plus the end position.
        state: ``llama_state_seq_get_data`` bytes, or an engine's own payload (closed when dropped).
    """

    units: tuple[Unit, ...]
    starts: tuple[int, ...]
    state: bytes | ParkedPayload

    @property
    def nbytes(self) -> int:
        return len(self.state) if isinstance(self.state, bytes) else self.state.nbytes

    def drop(self) -> None:
        """Free a payload that is not bytes (evicted or cleared, never restored)."""
        if not isinstance(self.state, bytes):
            self.state.close()


class ParkedStates:
    """An LRU of parked sequence states bounded in bytes and entries."""

    def __init__(self, max_bytes: int = DEFAULT_PARK_BYTES,
                 max_entries: int = DEFAULT_PARK_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._items: OrderedDict[int, ParkedState] = OrderedDict()
        self._next_id = 0
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def park(self, entry: ParkedState) -> bool:
        """Keep ``entry`` (most recently used); False if it alone exceeds the budget."""
        if entry.nbytes > self.max_bytes or self.max_entries < 1 or not entry.units:
            return False
        self._items[self._next_id] = entry
        self._next_id += 1
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes or len(self._items) > self.max_entries:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.nbytes
            dropped.drop()
        return True

    def best(self, units: Sequence[Unit], limit: int) -> tuple[int | None, int]:
        """The parked state sharing the longest prefix with ``units``.

        Args:
            units: the request's identity units.
            limit: prefix lengths are capped at this (units that must be evaluated anyway).

        Returns:
            (entry id or None, shared prefix length capped at ``limit``).
        """
        best_id, best_len = None, 0
        for key, entry in self._items.items():
            n = min(common_prefix(entry.units, units), limit)
            if n > best_len:
                best_id, best_len = key, n
        return best_id, best_len

    def take(self, key: int) -> ParkedState:
        """Remove and return a parked state (it becomes the live one)."""
        entry = self._items.pop(key)
        self._bytes -= entry.nbytes
        return entry

    def image_keys(self) -> set[str]:
        """Keys of the image chunks some parked state holds."""
        return {u.key for entry in self._items.values() for u in entry.units if isinstance(u, ImageUnit)}

    def clear(self) -> None:
        """Drop every parked state."""
        for entry in self._items.values():
            entry.drop()
        self._items.clear()
        self._bytes = 0


def common_prefix(a: Sequence[Unit], b: Sequence[Unit]) -> int:
    """Length of the longest common prefix of two sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
